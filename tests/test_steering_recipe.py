"""Recipes: saved from Python, run from the command line, the same images bit for bit."""

from __future__ import annotations

import importlib

import numpy as np

import pytest
import torch
from PIL import Image

from sae.config import Placement, SparseCoderConfig
from sae.registry import get_architecture
from steering import FeatureEdit, HeadScale, Recipe, steer

SITE = "up_blocks.2.attentions.0"


def test_recipe__saved_from_python_run_from_the_cli_gives_the_same_images(toy_pipe, tmp_path):
    from activations.generate import sample
    from diffatlas.cli import main

    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=32, k=4), 64)
    sae.placement = Placement(site=SITE)
    folder = sae.save_pretrained(tmp_path / "sae")
    recipe = Recipe(model="toy", prompts=["a red circle on a white background", "a blue square"], seeds=[3, 4], steps=3,
                    guidance=4.0, interventions=[
                        FeatureEdit(sae=str(folder), features=[1], op="spatial", strength=8.0,
                                    region={"quadrant": "top left"}, when="early"),
                        HeadScale(heads=[40, 41], factor=0.0, mask={"box": [0, 0, 0.5, 1]}, when={"steps": [1, 2]})])
    path = recipe.save(tmp_path / "recipe.yaml")
    with steer(toy_pipe, *recipe.interventions, prompts=recipe.prompts):
        expected = sample(toy_pipe, recipe.prompts, recipe.seeds, steps=3, guidance=4.0).images
    plain = sample(toy_pipe, recipe.prompts, recipe.seeds, steps=3, guidance=4.0).images

    assert main(["steer", str(path), "--out", str(tmp_path / "out"), "--wandb", "false"]) == 0
    for k in range(2):
        got = np.asarray(Image.open(tmp_path / "out" / "after" / f"{k:04d}.png"))
        assert np.array_equal(got, np.asarray(expected[k]))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "before" / f"{k:04d}.png")), np.asarray(plain[k]))
    assert (tmp_path / "out" / "before_after.png").is_file()
    assert Recipe.load(tmp_path / "out" / "recipe.yaml").to_dict() == recipe.to_dict()


def test_recipe__bad_fields_and_seed_counts_are_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("prompts: [a red circle]\nsteeps: 3\n")
    with pytest.raises(ValueError, match=r"unknown recipe field\(s\) \['steeps'\].*valid fields: guidance"):
        Recipe.load(path)
    with pytest.raises(ValueError, match="2 prompts, 1 seeds"):
        Recipe(prompts=["a red circle", "a blue square"], seeds=[0])
    with pytest.raises(ValueError, match="unknown intervention kind 'feature_edits'.*feature_edit"):
        Recipe(prompts=["a"], interventions=[{"kind": "feature_edits"}])


# ---- hostile recipes: one line, before any image is drawn or file written ------------------

GOOD = "model: toy\nprompts: [a red circle]\nseeds: [0]\nsteps: 2\nguidance: 4.0\n"


@pytest.fixture
def small_sae(tmp_path):
    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=32, k=4), 64)
    sae.placement = Placement(site=SITE)
    return sae.save_pretrained(tmp_path / "sae")


def steer_cli(recipe_text: str, tmp_path, capsys, pipe, monkeypatch, out="out"):
    """Run ``diffatlas steer`` on the text (the given pipeline, drawing guarded): (rc, stderr)."""
    from diffatlas.cli import main

    monkeypatch.setattr("activations.pipeline.load_pipeline", lambda *a, **k: pipe)
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text)
    rc = main(["steer", str(path), "--out", str(tmp_path / out), "--wandb", "false"])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("text, message", [
    (GOOD + "interventions: [\n", "is not valid YAML at line"),
    ("- a red circle\n", "must be a mapping with the keys model, prompts"),
    (GOOD + "interventions: [null]\n", "intervention 0 must be a mapping with a 'kind'"),
    (GOOD + "interventions: [3]\n", "intervention 0 must be a mapping with a 'kind'"),
    (GOOD + "interventions: null\n", "interventions must be a list"),
    (GOOD, "lacks the field(s) ['interventions']"),
    (GOOD.replace("steps: 2", "steps: 0") + "interventions: []\n", "steps must be an integer in 1..1000, got 0"),
    (GOOD.replace("steps: 2", "steps: -3") + "interventions: []\n", "steps must be an integer in 1..1000, got -3"),
    (GOOD.replace("steps: 2", "steps: 1000000000") + "interventions: []\n", "steps must be an integer in 1..1000"),
    (GOOD.replace("steps: 2", "steps: 2.5") + "interventions: []\n", "steps must be an integer"),
    (GOOD.replace("guidance: 4.0", "guidance: .nan") + "interventions: []\n", "guidance must be a finite number in 0..1e+06, got nan"),
    (GOOD.replace("guidance: 4.0", "guidance: -1.0") + "interventions: []\n", "guidance must be a finite number in 0..1e+06"),
    (GOOD.replace("seeds: [0]", "seeds: [-1]") + "interventions: []\n", "seed 0 must be an integer in 0..9223372036854775807, got -1"),
    (GOOD.replace("a red circle", "a purple unicorn") + "interventions: []\n", "outside the toy world's vocabulary: 'unicorn'"),
    (GOOD + "interventions: [{kind: head_scale, heads: [0], factor: .nan}]\n", "intervention 0 (head_scale): factor must be a finite number"),
    (GOOD + "interventions: [{kind: head_scale, heads: [0], factor: .inf}]\n", "factor must be a finite number"),
    (GOOD + "interventions: [{kind: head_scale, heads: [0], factor: 1.0e+308}]\n", "factor must be a finite number in -1e+06..1e+06"),
    (GOOD + "interventions: [{kind: head_scale, heads: [0], factor: 1e308}]\n", "factor must be a finite number in -1e+06..1e+06, got '1e308'"),
])
def test_recipe_file__bad_yaml_fields_and_numbers_are_one_line(tmp_path, capsys, monkeypatch, random_toy_pipe, text, message):
    rc, err = steer_cli(text, tmp_path, capsys, random_toy_pipe, monkeypatch)
    assert rc == 2 and err.startswith("diffatlas steer: error: ") and "\n" not in err, err
    assert message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("intervention, message", [
    ("{kind: head_scale, heads: [999], factor: 0.0}", "global head 999 out of range for this model's 52"),
    ("{kind: head_scale, heads: [0], factor: 0.0, when: {steps: [10, 20]}}", "step(s) [10, 20] out of range for a schedule of 2 steps"),
    ("{kind: head_scale, heads: [0], factor: 0.0, when: {t: [5]}}", "timestep(s) [5] not in the schedule; valid timesteps: [999, 499]"),
    ("{kind: head_scale, heads: [0], factor: 0.0, when: late}", "when late selects no step of this 2-step run (its timesteps: 999, 499)"),
    ("{kind: head_scale, heads: [0], factor: 0.0, mask: {image: MASK}}", "cannot be read as an image"),
    ("{kind: head_scale, heads: [0], factor: 0.0, mask: {patches: [0], grid: [3, 3]}}", "3x3 grid applied at a 16x16 site"),
    ("{kind: head_edit, site: nowhere.attn2, heads: [0], scale: 0.0}", "unknown site 'nowhere.attn2'"),
    ("{kind: head_edit, site: HEADSITE, heads: [99], scale: 0.0}", "head index 99 out of range for 4 heads (valid: 0..3)"),
    ("{kind: head_edit, site: HEADSITE, heads: [0.5], scale: 0.0}", "head indices must be integers"),
    ("{kind: head_edit, site: HEADSITE, heads: [0], tokens: [500], scale: 0.0}", "token index 500 out of range"),
    ("{kind: scale, site: HEADSITE, stage: heads, heads: [7], factor: 2.0}", "Scale at HEADSITE: head index 7 out of range"),
    ("{kind: feature_edit, sae: SAE, features: [0], op: inject, strength: .nan}", "strength must be a finite number"),
    ("{kind: feature_edit, sae: NARROW, features: [0]}", "this SAE takes width 32 but site 'up_blocks.2.attentions.0' of this model has width 64"),
    ("{kind: feature_edit, sae: NANSAE, features: [0]}", "has non-finite weights (NaN or inf) in encoder.weight"),
])
def test_recipe__checked_against_the_model_before_any_image_or_file(tmp_path, capsys, monkeypatch, random_toy_pipe, small_sae,
                                                                     intervention, message):
    narrow = get_architecture("topk")(SparseCoderConfig(num_latents=8, k=2), 32)
    narrow.placement = Placement(site=SITE)
    nan_sae = get_architecture("topk")(SparseCoderConfig(num_latents=8, k=2), 64)
    nan_sae.placement = Placement(site=SITE)
    with torch.no_grad():
        nan_sae.encoder.weight[0, 0] = float("nan")
    (tmp_path / "mask.png").write_text("not an image")
    message = message.replace("HEADSITE", SITE + ".transformer_blocks.0.attn2")
    intervention = (intervention.replace("HEADSITE", SITE + ".transformer_blocks.0.attn2").replace("MASK", str(tmp_path / "mask.png")).replace("NARROW", str(narrow.save_pretrained(tmp_path / "narrow")))
                    .replace("NANSAE", str(nan_sae.save_pretrained(tmp_path / "nan"))).replace("SAE", str(small_sae)))

    def no_drawing(*a, **k):
        raise AssertionError("an image was drawn before the recipe was checked")

    monkeypatch.setattr(importlib.import_module("activations.generate"), "sample", no_drawing)
    rc, err = steer_cli(GOOD + f"interventions: [{intervention}]\n", tmp_path, capsys, random_toy_pipe, monkeypatch)
    assert rc == 2 and err.startswith("diffatlas steer: error: ") and "\n" not in err, err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_recipe__a_word_token_not_in_the_prompt_is_refused_before_drawing(random_toy_pipe, monkeypatch, tmp_path):
    from analysis.concepts import ConceptList
    from analysis.hrv import HRV
    from activations.sites import head_table
    from steering import HRVEdit

    table = head_table(random_toy_pipe.unet)
    votes = torch.randint(0, 5, (2, 2, len(table)), generator=torch.Generator().manual_seed(0))
    folder = HRV(ConceptList(("color", "shape"), (("red",), ("circle",))), votes, table, [999, 499]).save(tmp_path / "hrv")
    monkeypatch.setattr(importlib.import_module("activations.generate"), "sample", lambda *a, **k: pytest.fail("drawn before the check"))
    recipe = Recipe(prompts=["a red circle"], seeds=[0], steps=2, interventions=[HRVEdit(hrv=str(folder), concept="color", token="green")])
    with pytest.raises(ValueError, match="token 'green' is not in the prompt 'a red circle'"):
        run_recipe_(recipe, random_toy_pipe)


def run_recipe_(recipe, pipe):
    from steering.recipe import run_recipe

    return run_recipe(recipe, pipe)


# ---- output folders ----------------------------------------------------------------------------

def recipe_text(prompts: list[str]) -> str:
    return (f"model: toy\nprompts: {prompts}\nseeds: {list(range(len(prompts)))}\nsteps: 2\nguidance: 4.0\n"
            "interventions: [{kind: head_scale, heads: [0, 40], factor: 0.0}]\n")


def test_out_folder__another_recipe_is_refused_the_same_recipe_reruns_in_place(tmp_path, capsys, monkeypatch, random_toy_pipe):
    two = recipe_text(["a red circle", "a blue square"])
    assert steer_cli(two, tmp_path, capsys, random_toy_pipe, monkeypatch)[0] == 0
    assert sorted(p.name for p in (tmp_path / "out" / "after").iterdir()) == ["0000.png", "0001.png"]
    rc, err = steer_cli(recipe_text(["a green circle"]), tmp_path, capsys, random_toy_pipe, monkeypatch)
    assert rc == 2 and "--out" in err and "is not empty and holds no run of this recipe" in err and "\n" not in err, err
    assert sorted(p.name for p in (tmp_path / "out" / "after").iterdir()) == ["0000.png", "0001.png"]  # untouched
    assert steer_cli(two, tmp_path, capsys, random_toy_pipe, monkeypatch)[0] == 0  # a rerun of the same recipe
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    rc, err = steer_cli(two, tmp_path, capsys, random_toy_pipe, monkeypatch, out="other")
    assert rc == 2 and "holds notes.txt" in err


def test_out_folder__a_file_or_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch, random_toy_pipe):
    import pathlib

    (tmp_path / "afile").write_text("x")
    rc, err = steer_cli(recipe_text(["a red circle"]), tmp_path, capsys, random_toy_pipe, monkeypatch, out="afile")
    assert rc == 2 and "is a file, not a folder" in err and "\n" not in err, err

    def read_only(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    rc, err = steer_cli(recipe_text(["a red circle"]), tmp_path, capsys, random_toy_pipe, monkeypatch, out="ro")
    assert rc == 2 and err == f"diffatlas steer: error: could not create the folder {tmp_path / 'ro' / 'before'}: Permission denied"


def test_out_folder__a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_png(tmp_path, capsys, monkeypatch,
                                                                                        random_toy_pipe):
    from PIL import Image as PILImage

    real_save = PILImage.Image.save

    def full_disk(self, fp, *a, **k):
        if "after" in str(fp):
            pathlib_fp = str(fp)
            with open(pathlib_fp, "wb") as f:
                f.write(b"\x89PNG")  # a few bytes, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(PILImage.Image, "save", full_disk)
    rc, err = steer_cli(recipe_text(["a red circle"]), tmp_path, capsys, random_toy_pipe, monkeypatch)
    assert rc == 2 and err == f"diffatlas steer: error: could not write {tmp_path / 'out' / 'after' / '0000.png'}: No space left on device"
    assert list((tmp_path / "out" / "after").iterdir()) == []  # neither a partial PNG nor a temporary file


def test_saved_recipe__replays_from_another_folder_and_records_its_numerics(tmp_path, capsys, monkeypatch, random_toy_pipe, small_sae):
    import json

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    rel = "../" + str(small_sae.relative_to(tmp_path))
    text = GOOD + f"interventions: [{{kind: feature_edit, sae: {rel}, features: [1], op: add, strength: 20.0}}]\n"
    assert steer_cli(text, tmp_path, capsys, random_toy_pipe, monkeypatch)[0] == 0
    saved = tmp_path / "out" / "recipe.yaml"
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative path would point nowhere
    recipe = Recipe.load(saved)
    assert recipe.interventions[0].to_dict()["sae"] == str(small_sae.resolve())
    after = np.asarray(Image.open(tmp_path / "out" / "after" / "0000.png"))
    assert np.array_equal(np.asarray(run_recipe_(recipe, random_toy_pipe)[1][0]), after)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["numerics"]["threads"] == torch.get_num_threads()
    assert record["numerics"]["torch"] == torch.__version__.split("+")[0]
    assert (record["numerics"]["device"], record["numerics"]["dtype"]) == ("cpu", "float32")
