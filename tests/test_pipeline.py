import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from activations.pipeline import ModelNotFoundError, load_pipeline
from toyworld.plugin import WEIGHTS as TOY_WEIGHTS


def _draw(pipe, prompt="a big red plain square at the top left on a gray background, by day", seed=0, steps=4):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=4.0, generator=generator, output_type="np").images[0]


def test_toy_model__is_sd1_shaped_in_miniature(toy_pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(toy_pipe, StableDiffusionPipeline)
    unet = toy_pipe.unet
    cross = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
    assert len(cross) >= 8
    assert {name.split(".")[0] for name in cross} == {"down_blocks", "mid_block", "up_blocks"}
    assert all(unet.get_submodule(name).heads >= 4 for name in cross)
    assert unet.config.sample_size >= 16 and toy_pipe.vae_scale_factor * unet.config.sample_size == 64


def test_toy_weights__float16_safetensors_under_25_mb():
    files = list(TOY_WEIGHTS.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    assert sum(f.stat().st_size for f in TOY_WEIGHTS.rglob("*") if f.is_file()) <= 25 * 2**20
    from safetensors import safe_open

    with safe_open(str(TOY_WEIGHTS / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_toy_model__same_seed_gives_the_same_image_and_another_seed_does_not(toy_pipe):
    assert np.array_equal(_draw(toy_pipe, seed=3), _draw(toy_pipe, seed=3))
    # a prompt that names every attribute leaves a faithful model little to vary (the world has no
    # jitter), so the seed's effect is checked where the model chooses: on the empty prompt
    assert np.abs(_draw(toy_pipe, "", seed=3) - _draw(toy_pipe, "", seed=4)).max() > 0.05


def test_pipeline__save_and_load_round_trip_gives_identical_images(random_toy_pipe, tmp_path):
    random_toy_pipe.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(tmp_path / "model", device="cpu", dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.tokenizer).__name__ == type(random_toy_pipe.tokenizer).__name__ or loaded.tokenizer.vocab == random_toy_pipe.tokenizer.vocab
    np.testing.assert_allclose(_draw(loaded, steps=2), _draw(random_toy_pipe, steps=2), atol=1e-6)


def test_load_pipeline__hub_id_offline_fails_at_once_with_a_local_path_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=r"could not be found offline.*local folder"):
        load_pipeline("CompVis/stable-diffusion-v1-4", device="cpu")
    assert time.perf_counter() - started < 30  # no retry loop over connection errors


@pytest.mark.parametrize("name", ["./no/such/folder", "not a model id"])
def test_load_pipeline__unknown_name_says_what_is_valid(name):
    with pytest.raises(ModelNotFoundError, match=r"neither a registered model \(toy, toy-mmdit\), nor a diffusers folder, nor a hub id"):
        load_pipeline(name, device="cpu")


def test_generate_cli__writes_one_png_per_prompt_and_seed(tmp_path):
    from diffatlas.cli import main

    prompts = json.dumps(["a small blue striped circle at the center on a white background, at night"])
    code = main(["generate", "--prompts", prompts, "--seeds", "[1, 2]", "--steps", "3", "--out", str(tmp_path)])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [1, 2]
    assert all((tmp_path / r["file"]).exists() for r in rows)
    assert (tmp_path / "generate_config.yaml").exists()


def test_generate_cli__unknown_word_is_refused_before_loading_anything(tmp_path, capsys):
    from diffatlas.cli import main

    code = main(["generate", "--prompts", '["a big red hexagon at the center"]', "--out", str(tmp_path)])
    assert code == 2
    assert "'hexagon'" in capsys.readouterr().err
    assert not list(Path(tmp_path).glob("*.png"))


def test_cli__unknown_command_lists_the_valid_ones(capsys):
    from diffatlas.cli import main

    assert main(["harvset"]) == 2
    assert "unknown command 'harvset'" in capsys.readouterr().err


GOOD_PROMPT = "a small blue striped circle at the center on a white background, at night"


@pytest.mark.parametrize("args, needle", [
    (["--steps", "-2"], "--steps must be an integer >= 1 and <= 1000, got -2"),
    (["--steps", "0"], "--steps must be an integer >= 1 and <= 1000, got 0"),
    (["--steps", "1000000000"], "--steps must be an integer >= 1 and <= 1000, got 1000000000"),
    (["--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),
    (["--seeds", "[0, -3]"], "--seeds must be an integer >= 0 and <= 9223372036854775807, got -3"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0, got -1.0"),
    (["--guidance", ".inf"], "--guidance must be a finite number >= 0, got inf"),
    (["--prompts", '["  "]'], "prompt 0 is empty"),
])
def test_bad_input__generate_numbers_out_of_range_and_empty_prompts_name_the_field(tmp_path, capsys, args, needle):
    from diffatlas.cli import main

    argv = ["generate", "--prompts", json.dumps([GOOD_PROMPT]), "--out", str(tmp_path), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "generations.jsonl").exists()


def test_bad_input__generate_blank_only_prompts_file_is_refused(tmp_path, capsys):
    from diffatlas.cli import main

    (tmp_path / "p.txt").write_text("\n   \n")
    assert main(["generate", "--prompts_file", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "no prompts" in capsys.readouterr().err


@pytest.mark.parametrize("prompt, needle", [
    ("a red circle at the center and a blue square at the center", "two objects at position 'center'"),
    ("a big red plain circle at the center and a small blue plain square at the top left on a gray background, "
     "by day", "would overlap"),
    ("a red circle and a blue square and a green cross", "a scene holds 1 or 2 objects, got 3"),
])
def test_bad_input__generate_refuses_impossible_toy_scenes_as_scene_does(tmp_path, capsys, prompt, needle):
    from diffatlas.cli import main

    assert main(["generate", "--prompts", json.dumps([prompt]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not list(tmp_path.glob("*.png"))


def test_generate_cli__rerun_into_the_same_folder_keeps_one_record_per_file(tmp_path):
    from diffatlas.cli import main

    argv = ["generate", "--prompts", json.dumps([GOOD_PROMPT]), "--steps", "2", "--out", str(tmp_path)]
    assert main([*argv, "--seeds", "[1, 2]"]) == 0
    assert main([*argv, "--seeds", "[1]"]) == 0  # overwrites 0000_seed1.png
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    files = [r["file"] for r in rows]
    assert sorted(files) == sorted(set(files)) == sorted(p.name for p in tmp_path.glob("*.png"))
    assert {r["file"]: r["seed"] for r in rows}["0000_seed1.png"] == 1


def test_model_identity__fingerprint_and_scheduler_live_beside_load_pipeline(random_toy_pipe):
    from activations.pipeline import model_fingerprint, set_scheduler

    assert len(model_fingerprint(random_toy_pipe.unet)) == 16
    with pytest.raises(ValueError, match="unknown scheduler 'Nope'; valid schedulers: .*DDIMScheduler"):
        set_scheduler(random_toy_pipe, "Nope")
