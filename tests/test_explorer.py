"""The explorer's API (FastAPI TestClient, the toy architecture with random weights, 2-3 steps):
maps captured once per generation, views from the cache, edits whose recipes reproduce the image
bit for bit, SAE feature edits, and bad input answered as one JSON message."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from steering.recipe import Recipe, run_recipe  # noqa: E402
from steering.explorer.server import make_app  # noqa: E402
from steering.explorer.session import Explorer  # noqa: E402

PROMPT = "a red circle in the top left on a blue background"
OTHER = "a green square in the bottom right on a white background"


def decode(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def explorer(random_toy_pipe):
    return Explorer(random_toy_pipe, model="toy")


@pytest.fixture(scope="module")
def client(explorer):
    return TestClient(make_app(explorer))


@pytest.fixture(scope="module")
def gen(client):
    r = client.post("/api/generate", json={"prompt": PROMPT, "seed": 3, "steps": 3, "guidance": 4.0})
    assert r.status_code == 200, r.text
    return r.json()


def test_generate__image_tokens_and_every_head_map_for_every_step_and_token(explorer, gen):
    assert gen["tokens"][2:4] == ["red", "circle"] and len(gen["tokens"]) == 13
    assert decode(gen["image"]).shape == (64, 64, 3)
    g = explorer.get(gen["gen"])
    assert sum(m.shape[1] for m in g.maps.values()) == len(explorer.head_table) == 52
    for s in explorer.sites:
        m = g.maps[s.name]
        assert m.dtype == torch.float16 and m.shape == (3, s.heads, s.resolution[0] * s.resolution[1], 13)
        # probabilities over all 40 padded tokens sum to 1; the prompt's 13 hold at most that
        assert float(m.float().sum(-1).max()) <= 1.01


def test_generate__capturing_the_maps_leaves_the_image_bit_for_bit_as_a_plain_sample(explorer, gen):
    from activations.generate import sample

    plain = sample(explorer.pipe, [PROMPT], [3], steps=3, guidance=4.0).images[0]
    assert np.array_equal(decode(gen["image"]), np.asarray(plain.convert("RGB")))


def test_grid_and_head_views__served_from_the_cache_without_running_the_unet(explorer, client, gen):
    calls = []
    handle = explorer.pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))  # test-only counter
    try:
        grid = client.get("/api/grid", params={"gen": gen["gen"], "step": 1, "token": 2}).json()["heads"]
        head = client.get("/api/head", params={"gen": gen["gen"], "head": 2}).json()
        one = client.get("/api/head", params={"gen": gen["gen"], "head": 2, "token": 2, "step": 1}).json()
        patch = client.get("/api/patch", params={"gen": gen["gen"], "step": 1, "y": 0.1, "x": 0.9, "token": 2}).json()
    finally:
        handle.remove()
    assert calls == []
    assert [h["head"] for h in grid] == list(range(52))
    assert all(len(h["values"]) == h["grid"][0] * h["grid"][1] for h in grid)
    assert np.asarray(head["maps"]).shape == (3, 13, 256)
    assert one["values"] == grid[2]["values"] == head["maps"][1][2]
    assert len(patch["token_values"]) == 52 and len(patch["pairs"]) <= 10
    assert patch["uniform"] == 1 / 40 and patch["threshold"] == 2 / 40  # the toy's text encoder pads to 40 tokens
    assert all(q["value"] >= patch["threshold"] for q in patch["pairs"])
    assert all(patch["token_values"][h] >= patch["threshold"] for h in patch["heads"])


def test_patch__names_only_heads_well_above_uniform_attention_else_none(explorer, client, gen):
    """A patch where no head attends (the background) names no heads, not the largest of the noise."""
    import dataclasses

    g = explorer.get(gen["gen"])
    assert g.keys == 40
    maps = {name: torch.full_like(m, 1 / g.keys) for name, m in g.maps.items()}  # every head uniform everywhere
    site = explorer.sites[1]  # heads 4..7
    maps[site.name][1, 1, 0, 2] = 0.5    # head 5 from patch 0 to token 2: 20 x uniform
    maps[site.name][1, 3, 0, 2] = 0.06   # head 7: 2.4 x uniform
    maps[site.name][1, 2, 0, 2] = 0.045  # head 6: 1.8 x uniform, not enough
    synthetic = dataclasses.replace(g, id="g-uniform", maps=maps)
    explorer.generations[synthetic.id] = synthetic
    try:
        hot = client.get("/api/patch", params={"gen": synthetic.id, "step": 1, "y": 0.0, "x": 0.0, "token": 2}).json()
        cold = client.get("/api/patch", params={"gen": synthetic.id, "step": 1, "y": 0.9, "x": 0.9, "token": 2}).json()
    finally:
        del explorer.generations[synthetic.id]
    assert hot["heads"] == [5, 7]
    assert [(q["head"], q["token"]) for q in hot["pairs"]] == [(5, 2), (7, 2)]
    assert cold["heads"] == [] and cold["pairs"] == [] and len(cold["token_values"]) == 52


def test_grid__layers_in_forward_order_heads_inside(explorer, client):
    info = client.get("/api/info").json()
    names = [s["name"] for s in info["sites"]]
    assert names[0].startswith("down_blocks.0") and names[-1].startswith("up_blocks.")
    assert any(n.startswith("mid_block") for n in names)
    assert [s["first_head"] for s in info["sites"]] == list(range(0, 52, 4))
    assert info["select_grid"] == [16, 16]


@pytest.mark.parametrize("edit", [
    {"op": "scale", "factor": -2.0, "heads": [0, 1, 17, 40], "patches": list(range(0, 96))},
    {"op": "scale", "factor": 3.0, "heads": [2], "all_patches": True, "when": {"steps": [1, 2]}, "tokens": [2, 3]},
    {"op": "scale", "factor": 3.0, "heads": [2, 45], "all_patches": True, "when": {"tau": [0.5, 1.0]}, "branch": "cond"},
    {"op": "swap", "prompt": OTHER, "heads": list(range(52)), "patches": list(range(128, 256)), "when": "early"},
])
def test_edit__recipe_reproduces_the_shown_image_bit_for_bit(explorer, client, gen, edit, tmp_path):
    r = client.post("/api/edit", json={"gen": gen["gen"], **edit})
    assert r.status_code == 200, r.text
    out = r.json()
    shown = decode(out["image"])
    assert out["max_diff"] > 0 and not np.array_equal(shown, decode(gen["image"]))
    path = tmp_path / "recipe.yaml"
    path.write_text(client.get("/api/recipe", params={"gen": gen["gen"], "edit": out["edit"]}).text)
    import yaml

    assert list(yaml.safe_load(path.read_text())) == ["model", "prompts", "seeds", "steps", "guidance", "interventions"]
    recipe = Recipe.load(path)
    assert recipe.prompts == [PROMPT] and recipe.seeds == [3] and recipe.steps == 3
    image = np.asarray(run_recipe(path, pipe=explorer.pipe, before=False)[1][0].convert("RGB"))
    assert np.array_equal(image, shown)


def test_edit__selection_is_restricted_to_the_selected_patches_at_every_grid(explorer, gen):
    from steering.explorer.session import EditSpec

    coarse = next(s for s in explorer.sites if s.resolution == (8, 8))
    ivs = explorer.interventions(EditSpec(gen=gen["gen"], heads=[0, coarse.first_head + 3], patches=[0, 1, 16, 17]))
    assert [iv.site for iv in ivs] == [explorer.sites[0].name, coarse.name]
    assert [iv.mask.grid for iv in ivs] == [(16, 16), (8, 8)]
    assert [iv.mask.indices for iv in ivs] == [(0, 1, 16, 17), (0,)]  # 2x2 fine patches -> 1 coarse patch
    assert [iv.heads for iv in ivs] == [[0], [3]]


@pytest.mark.parametrize("request_, message", [
    (("get", "/api/grid", {"step": 1, "token": 99}), "token 99 out of range"),
    (("get", "/api/grid", {"step": 7, "token": 1}), "step 7 out of range"),
    (("get", "/api/grid", {"step": "x", "token": 1}), "bad request: step"),
    (("get", "/api/head", {"head": 52}), "head 52 out of range"),
    (("post", "/api/edit", {"heads": [0], "patches": []}), "no patches selected"),
    (("post", "/api/edit", {"heads": [], "patches": [3]}), "no heads selected"),
    (("post", "/api/edit", {"heads": [0], "patches": [3], "when": {"steps": [2, 9]}}), "step(s) [9] out of range for a schedule of 3 steps"),
    (("post", "/api/edit", {"heads": [0], "patches": [3], "op": "paint"}), "unknown edit 'paint'"),
    (("post", "/api/edit", {"heads": [0], "patches": [3], "colour": 1}), "unknown edit field(s) ['colour']"),
    (("post", "/api/edit", {"op": "sae", "patches": [3]}), "no SAE loaded"),
    (("post", "/api/edit", {"op": "swap", "heads": [0], "patches": [3], "prompt": "a purple unicorn"}), "'unicorn'"),
    (("get", "/api/hrv/top", {"concept": "red"}), "no HRVs loaded"),
])
def test_bad_input__one_json_message_and_the_server_keeps_serving(client, gen, request_, message):
    method, path, params = request_
    if method == "get":
        r = client.get(path, params={"gen": gen["gen"], **params})
    else:
        r = client.post(path, json={"gen": gen["gen"], **params})
    assert r.status_code in (400, 404), r.text
    assert message in r.json()["error"] and "Traceback" not in r.text
    assert client.get("/api/grid", params={"gen": gen["gen"], "step": 0, "token": 1}).status_code == 200


def test_bad_input__unknown_prompt_word_and_unknown_generation(client):
    r = client.post("/api/generate", json={"prompt": "a purple unicorn", "seed": 0, "steps": 2})
    assert r.status_code == 400 and "words outside the toy world's vocabulary: 'unicorn';" in r.json()["error"]
    r = client.get("/api/tokens", params={"prompt": "a red circel on a blu background"})
    assert r.status_code == 400
    assert "'circel' (did you mean 'circle'?), 'blu' (did you mean 'blue'?)" in r.json()["error"]
    r = client.get("/api/grid", params={"gen": "g999", "step": 0, "token": 0})
    assert r.status_code == 404 and "unknown generation 'g999'" in r.json()["error"]


def test_prompt_check__is_the_model_plugins_hook_not_the_toys(random_toy_pipe, monkeypatch):
    """Any registered model with a closed vocabulary is checked, through ModelPlugin.check_prompt."""
    from common import plugins

    def check(text):
        if "circle" in text:
            raise ValueError("this model knows no 'circle' (did you mean 'square'?)")

    plugin = plugins.ModelPlugin(load=lambda **_: random_toy_pipe, check_prompt=check)
    monkeypatch.setitem(plugins._registry[plugins.MODELS], "closed-words", plugin)
    client = TestClient(make_app(Explorer(random_toy_pipe, model="closed-words")))
    r = client.post("/api/generate", json={"prompt": PROMPT, "seed": 0, "steps": 1})
    assert r.status_code == 400 and r.json() == {"error": "this model knows no 'circle' (did you mean 'square'?)"}
    assert client.post("/api/generate", json={"prompt": "a unicorn", "seed": 0, "steps": 1}).status_code == 200


def test_server_error__answered_as_json_without_a_traceback(explorer, client, gen, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(explorer, "grid", broken)
    r = client.get("/api/grid", params={"gen": gen["gen"], "step": 0, "token": 0})
    assert r.status_code == 500 and r.json() == {"error": "server error: RuntimeError: disk on fire"}
    monkeypatch.undo()
    assert client.get("/api/grid", params={"gen": gen["gen"], "step": 0, "token": 0}).status_code == 200


def test_page__served_with_its_script(client):
    r = client.get("/")
    assert r.status_code == 200 and "<canvas id=\"overlay\"" in r.text and "/api/edit" in r.text


# ---- SAE features -------------------------------------------------------------------------

SAE_SITE = "down_blocks.0.attentions.0"  # a block site of the toy, width 32, 16x16


def make_sae(folder, model="toy", d=32, site=SAE_SITE):
    from sae.config import Placement, SparseCoderConfig
    from sae.registry import get_architecture

    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=64, k=4), d)
    sae.placement = Placement(site=site, stage="block", model=model)
    sae.save_pretrained(folder)
    from sae.sparse_coder import SparseCoder

    return SparseCoder.from_pretrained(folder)


@pytest.fixture(scope="module")
def sae_client(random_toy_pipe, tmp_path_factory):
    """An explorer with an SAE (no feature analysis) and one generation: (client, generation)."""
    client = TestClient(make_app(Explorer(random_toy_pipe, model="toy", sae=make_sae(tmp_path_factory.mktemp("sae") / "sae"))))
    return client, client.post("/api/generate", json={"prompt": PROMPT, "seed": 1, "steps": 2}).json()


def test_sae_feature_edit__recipe_reproduces_the_image(random_toy_pipe, sae_client):
    client, g = sae_client
    info = client.get("/api/info").json()["sae"]
    assert info["features"] == 64 and info["labels"] is None
    r = client.post("/api/edit", json={"gen": g["gen"], "op": "sae", "feature": 5, "mode": "inject", "value": 50.0,
                                       "patches": list(range(64))})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["max_diff"] > 0 and "feature_edit" in out["recipe"]
    import yaml

    image = np.asarray(run_recipe(yaml.safe_load(out["recipe"]), pipe=random_toy_pipe, before=False)[1][0].convert("RGB"))
    assert np.array_equal(image, decode(out["image"]))
    feats = client.get("/api/features", params={"gen": g["gen"], "step": 1, "y": 0.2, "x": 0.2}).json()
    assert feats["grid"] == [16, 16] and 0 < len(feats["features"]) <= 4  # TopK k=4
    assert all(len(f["heatmap"]) == 256 and 0 < f["density"] <= 1 for f in feats["features"])
    assert all(f["labels"] is None for f in feats["features"])  # no --features: no labels, none guessed


@pytest.mark.parametrize("edit, message", [
    ({"feature": 64}, "feature 64 out of range for this SAE with 64 latents (valid: 0..63)"),
    ({"feature": -1}, "feature -1 out of range"),
    ({"feature": "seven"}, "feature must be an integer, got 'seven'"),
    ({"feature": None}, "feature must be an integer, got None"),
    ({"feature": 3, "mode": "paint"}, "unknown SAE edit mode 'paint'; valid modes: inject, scale, ablate"),
    ({"feature": 3, "site": "mid_block.attentions.9"}, "unknown edit field(s) ['site']"),  # the SAE fixes the site
])
def test_sae_feature_edit__bad_feature_or_site_is_a_message_and_the_server_keeps_serving(sae_client, edit, message):
    client, g = sae_client
    r = client.post("/api/edit", json={"gen": g["gen"], "op": "sae", "patches": [0], **edit})
    assert r.status_code == 400 and message in r.json()["error"] and "Traceback" not in r.text
    ok = client.post("/api/edit", json={"gen": g["gen"], "op": "sae", "feature": 3, "mode": "ablate", "patches": [0]})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("sae_kw, message", [
    ({"model": "sd-1.5"}, "was trained on model 'sd-1.5', not 'toy'; use model 'sd-1.5' or an SAE trained on 'toy'"),
    ({"site": "mid_block.attentions.7"}, "this SAE's site 'mid_block.attentions.7' is not a block site of model 'toy'; "
                                         "valid sites: down_blocks.0.attentions.0, "),
    ({"d": 64}, f"this SAE takes width 64 but site '{SAE_SITE}' of model 'toy' has width 32; sites of width 64: "),
])
def test_sae_that_does_not_fit_the_model__refused_naming_the_value_and_valid_choices(random_toy_pipe, tmp_path, sae_kw, message):
    from activations.sites import list_sites

    with pytest.raises(ValueError) as err:
        Explorer(random_toy_pipe, model="toy", sae=make_sae(tmp_path / "sae", **sae_kw))
    assert message in str(err.value)
    if "d" in sae_kw:  # the valid choices are exactly the sites of the SAE's width and stage (block)
        fits = str(err.value).split("sites of width 64: ")[1].split(", ")
        assert sorted(fits) == sorted(s.name for s in list_sites(random_toy_pipe.unet) if s.width == 64 and s.kind == "block")


@pytest.mark.parametrize("sae_kw, named", [
    ({"site": "mid_block.attentions.7"}, ["'mid_block.attentions.7'", "valid sites: down_blocks.0.attentions.0"]),
    ({"d": 64}, ["takes width 64", "sites of width 64: "]),
])
def test_cli__explore_with_an_sae_that_does_not_fit_is_one_line_exit_2(tmp_path, capsys, sae_kw, named):
    from diffatlas.cli import main

    make_sae(tmp_path / "sae", **sae_kw)
    assert main(["explore", "--sae", str(tmp_path / "sae"), "--device", "cpu", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffatlas explore: error: this SAE") and "\n" not in err
    assert all(n in err for n in named), err


# ---- feature labels from `diffatlas analyze features` --------------------------------------

def test_features__listed_with_the_labels_of_the_feature_analysis(random_toy_pipe, feature_analysis):
    from analysis.feature_report import FeatureLabels
    from sae.sparse_coder import SparseCoder

    sae_dir, out, report = feature_analysis
    ex = Explorer(random_toy_pipe, model="toy", sae=SparseCoder.from_pretrained(sae_dir), labels=FeatureLabels.load(out))
    client = TestClient(make_app(ex))
    assert client.get("/api/info").json()["sae"]["labels"] == str(out)
    g = client.post("/api/generate", json={"prompt": PROMPT, "seed": 1, "steps": 2}).json()
    rows = {r["id"]: r for r in report["features"]}
    listed = {}
    for y in (0.1, 0.5, 0.9):
        for x in (0.1, 0.5, 0.9):
            r = client.get("/api/features", params={"gen": g["gen"], "step": 1, "y": y, "x": x})
            assert r.status_code == 200, r.text
            listed.update({f["feature"]: f["labels"] for f in r.json()["features"]})
    assert len(listed) >= 4
    for f, labels in listed.items():
        row = rows[f]  # the fixture analyses every feature that fires
        assert labels["density"] == pytest.approx(row["density"])
        top = row.get("hrv_concepts") or [{"concept": None, "score": None}]  # none where no head writes it
        assert (labels["hrv_concept"], labels["hrv_score"]) == (top[0]["concept"],
                                                                 pytest.approx(top[0]["score"]) if top[0]["score"] is not None else None)
        assert (labels["truth"], labels["auroc"]) == (row["truth"]["label"], pytest.approx(row["truth"]["auroc"]))
    assert len({labels["truth"] for labels in listed.values()}) > 1  # per feature, not one label for all


def test_feature_labels__truth_for_every_feature_hrv_concept_only_where_the_report_has_one(feature_analysis, tmp_path):
    import json
    import shutil

    from analysis.feature_report import FeatureLabels

    _, out, report = feature_analysis
    full = FeatureLabels.load(out)
    # a folder as an older `analyze features` wrote it (no truth_values), with one feature not shown
    shutil.copytree(out, tmp_path / "a")
    dropped = report["features"][0]["id"]
    old = {**report, "features": report["features"][1:]}
    del old["truth_values"]
    (tmp_path / "a" / "report.json").write_text(json.dumps(old))
    back = FeatureLabels.load(tmp_path / "a")
    assert back.of(dropped)["hrv_concept"] is None and back.of(dropped)["hrv_score"] is None
    assert back.of(dropped)["truth"] == full.of(dropped)["truth"] == report["features"][0]["truth"]["label"]
    assert [back.of(f)["truth"] for f in range(16)] == [full.of(f)["truth"] for f in range(16)]


def test_features__an_analysis_of_another_sae_or_without_its_sae_is_refused(random_toy_pipe, feature_analysis, tmp_path, capsys):
    from analysis.feature_report import FeatureLabels
    from diffatlas.cli import main

    _, out, _ = feature_analysis
    other = make_sae(tmp_path / "other")  # another site, 64 features
    with pytest.raises(ValueError, match=f"at site 'up_blocks.2.attentions.0' with 16 features, but this SAE is of model "
                                         f"'toy' at site '{SAE_SITE}' with 64"):
        Explorer(random_toy_pipe, model="toy", sae=other, labels=FeatureLabels.load(out))
    for argv, message in ([["--features", str(out)], "give that SAE with --sae DIR"],
                          [["--sae", str(tmp_path / "other"), "--features", str(out)], f"at site '{SAE_SITE}' with 64"],
                          [["--sae", str(tmp_path / "other"), "--features", str(tmp_path)], "report.json is missing"]):
        assert main(["explore", *argv, "--port", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("diffatlas explore: error: ") and message in err and "\n" not in err, err


def test_cli__explore_is_a_diffatlas_command():
    from diffatlas.cli import COMMANDS

    assert COMMANDS["explore"][0] == "steering.explorer.server:main"


def test_hrv__heads_coloured_by_top_concept_and_top_n_selection(random_toy_pipe, tmp_path):
    from activations.sites import head_table
    from analysis.concepts import ConceptList
    from analysis.hrv import HRV

    table = head_table(random_toy_pipe.unet)
    votes = torch.zeros(2, 2, len(table), dtype=torch.long)
    votes[:, 0, :10] = 5  # "color" wins heads 0..9, "shape" the rest
    votes[:, 1, 10:] = 3
    votes[:, 0, 7] = 9
    HRV(ConceptList(("color", "shape"), (("red",), ("circle",))), votes, table, [999, 500]).save(tmp_path / "hrv")
    ex = Explorer(random_toy_pipe, model="toy", hrv=HRV.load(tmp_path / "hrv", pipe=random_toy_pipe))
    client = TestClient(make_app(ex))
    info = client.get("/api/info").json()["hrv"]
    assert info["concepts"] == ["color", "shape"] and info["head_concept"][:11] == ["color"] * 10 + ["shape"]
    assert client.get("/api/hrv/top", params={"concept": "color", "n": 3}).json()["heads"] == [7, 0, 1]
    assert "unknown concept 'size'" in client.get("/api/hrv/top", params={"concept": "size", "n": 3}).json()["error"]


def test_cli__explore_with_a_missing_sae_is_one_line_exit_2(tmp_path, capsys):
    from diffatlas.cli import main

    assert main(["explore", "--sae", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffatlas explore: error: ") and "nowhere" in err and "\n" not in err


def test_recipe__diffatlas_steer_reproduces_the_page_image_bit_for_bit(explorer, client, gen, tmp_path):
    steer_cli = pytest.importorskip("steering.cli", reason="diffatlas steer (the steering branch) is not here")
    from PIL import Image

    out = client.post("/api/edit", json={"gen": gen["gen"], "heads": [0, 3, 30], "patches": list(range(40, 120)),
                                         "when": "early"}).json()
    (tmp_path / "recipe.yaml").write_text(out["recipe"])
    cfg = steer_cli.SteerConfig(recipe=str(tmp_path / "recipe.yaml"), out=str(tmp_path / "steer"), wandb=False)
    steer_cli.steer_recipe(cfg, pipe=explorer.pipe)
    after = np.asarray(Image.open(tmp_path / "steer" / "after" / "0000.png").convert("RGB"))
    assert np.array_equal(after, decode(out["image"]))


# ---- hostile requests: a 400 with one JSON line, within stated limits ----------------------

@pytest.mark.parametrize("body, message", [
    ('{"prompt": "a red circle", "seed": 0, "steps": 2, "guidance": NaN}', "guidance must be a finite number in 0..1e+06, got nan"),
    ('{"prompt": "a red circle", "seed": 0, "steps": 2, "guidance": Infinity}', "guidance must be a finite number"),
    ('{"prompt": "a red circle", "seed": NaN, "steps": 2}', "seed must be an integer"),
    ('{"prompt": "a red circle", "seed": 0, "steps": 1000}', "steps must be an integer in 1..100, got 1000"),
    ('{"prompt": "a red circle", "seed": 2.5, "steps": 2}', "seed must be an integer"),
    ('{"prompt": 7, "seed": 0, "steps": 2}', "the prompt must be a text, got 7"),
])
def test_generate__non_finite_or_out_of_limit_numbers_are_a_400_json_line(client, body, message):
    r = client.post("/api/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_info__states_the_request_limits_the_page_shows(client):
    assert client.get("/api/info").json()["limits"]["steps"] == 100
    assert 'id="steps-limit"' in client.get("/").text


@pytest.mark.parametrize("edit, message", [
    ({"heads": "36", "patches": [3]}, "heads must be a list of integers, got '36'"),
    ({"heads": [0], "patches": [3], "factor": "-2"}, "factor must be a finite number in -1e+06..1e+06, got '-2'"),
    ({"heads": [0], "patches": [3], "factor": 1e300}, "factor must be a finite number in -1e+06..1e+06, got 1e+300"),
    ({"heads": [0], "patches": [3], "when": {"tau": [0.0, 0.1]}}, "selects no step of this 3-step run"),
    ({"heads": [0], "patches": [3], "branch": "neither"}, "unknown branch 'neither'; valid choices: cond, uncond, both"),
])
def test_edit__bad_heads_numbers_and_gates_are_a_400_json_line(client, gen, edit, message):
    r = client.post("/api/edit", json={"gen": gen["gen"], **edit})
    assert r.status_code == 400 and message in r.json()["error"], r.text


@pytest.mark.parametrize("body, message", [
    ('"value": NaN', "value must be a finite number"),
    ('"value": 1e308', "value must be a finite number in -1e+06..1e+06, got 1e+308"),
])
def test_sae_feature_edit__nan_or_huge_value_is_a_400_json_line(sae_client, body, message):
    client, g = sae_client
    text = f'{{"gen": "{g["gen"]}", "op": "sae", "feature": 3, "mode": "inject", "patches": [0], {body}}}'
    r = client.post("/api/edit", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"], r.text


@pytest.mark.parametrize("placement, message", [
    ({"model": "toy", "model_revision": "deadbeef"}, "was trained on model 'toy' (weights deadbeef)"),
    ({"model": "toy", "nan": True}, "has non-finite weights (NaN or inf)"),
])
def test_cli__explore_with_an_sae_of_other_weights_is_refused_at_start(tmp_path, capsys, monkeypatch, random_toy_pipe,
                                                                       placement, message):
    from diffatlas.cli import main
    from sae.config import Placement, SparseCoderConfig
    from sae.registry import get_architecture

    sae = get_architecture("topk")(SparseCoderConfig(num_latents=64, k=4), 32)
    sae.placement = Placement(site=SAE_SITE, stage="block", model=placement["model"], model_revision=placement.get("model_revision"))
    if placement.get("nan"):
        with torch.no_grad():
            sae.b_dec[0] = float("nan")
    sae.save_pretrained(tmp_path / "sae")
    monkeypatch.setattr("activations.pipeline.load_pipeline", lambda *a, **k: random_toy_pipe)
    monkeypatch.setattr("uvicorn.Server.run", lambda *a, **k: pytest.fail("the server started"))
    assert main(["explore", "--sae", str(tmp_path / "sae"), "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("diffatlas explore: error: this SAE") and message in captured.err, captured.err
    assert "http://" not in captured.out


def test_cli__explore_on_a_port_in_use_is_one_line_before_the_url(capsys, monkeypatch, random_toy_pipe):
    import socket

    from diffatlas.cli import main

    monkeypatch.setattr("activations.pipeline.load_pipeline", lambda *a, **k: random_toy_pipe)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["explore", "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"diffatlas explore: error: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "\n" not in captured.err.strip() and "http://" not in captured.out


def test_cli__explore_on_port_0_prints_the_port_it_listens_on(capsys, monkeypatch, random_toy_pipe):
    from diffatlas.cli import main

    served = {}
    monkeypatch.setattr("activations.pipeline.load_pipeline", lambda *a, **k: random_toy_pipe)
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets=None: served.setdefault("port", sockets[0].getsockname()[1]))
    assert main(["explore", "--port", "0"]) == 0
    out = capsys.readouterr().out
    assert served["port"] > 0 and f"http://127.0.0.1:{served['port']}/" in out and ":0/" not in out


# ---- real images: opened, inverted, drawn again from their noise ---------------------------

def render_png(i: int, size: int | None = None) -> tuple[bytes, np.ndarray, str, dict]:
    """A toy scene's exact render as PNG bytes, its pixels, its full caption and its scene."""
    from PIL import Image

    from toyworld.prompts import scene_to_prompt
    from toyworld.render import render
    from toyworld.scene import sample_scene

    scene = sample_scene(np.random.default_rng([21, i, 0]))
    pixels = render(scene).image
    image = Image.fromarray(pixels) if size is None else Image.fromarray(pixels).resize((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), np.asarray(image), scene_to_prompt(scene, np.random.default_rng([21, i, 1])), scene


def open_body(data: bytes, caption: str, **extra) -> dict:
    return {"image": "data:image/png;base64," + base64.b64encode(data).decode(), "name": "render.png",
            "caption": caption, "steps": 3, "guidance": 1.0, **extra}


@pytest.fixture
def fresh(random_toy_pipe, tmp_path):
    """An explorer of its own (an opened image is session state) writing inversions under tmp_path."""
    explorer = Explorer(random_toy_pipe, model="toy", inversions=tmp_path / "inv")
    return explorer, TestClient(make_app(explorer)), tmp_path / "inv"


def test_open_image__generations_start_from_its_inverted_noise_as_an_inversion_recipe(fresh, tmp_path):
    """The page's clean image is the recipe path's (`inversion:`) and `invert`'s own drawing,
    bit for bit, whatever the seed; its edits are recipes naming the inversion; back to seeds after."""
    from activations.generate import sample
    from activations.invert import invert, load

    explorer, client, root = fresh
    data, pixels, caption, _ = render_png(0)
    r = client.post("/api/open", json=open_body(data, caption))
    assert r.status_code == 200, r.text
    opened = r.json()
    assert (opened["name"], opened["caption"], opened["steps"], opened["guidance"]) == ("render.png", caption, 3, 1.0)
    assert np.array_equal(decode(opened["image"]), pixels)
    folder = opened["inversion"]
    _, meta = load(folder)
    assert meta["captions"] == [caption] and meta["model"] == "toy"
    assert client.get("/api/info").json()["opened"]["inversion"] == folder

    gens = [client.post("/api/generate", json={"prompt": caption, "seed": s}).json() for s in (3, 11)]
    assert [g["inversion"] for g in gens] == [folder, folder] and gens[0]["steps"] == 3
    shown = decode(gens[0]["image"])
    assert np.array_equal(shown, decode(gens[1]["image"]))  # the seed is unused
    by_recipe = run_recipe(Recipe(model="toy", prompts=[caption], seeds=[], steps=None, guidance=None, interventions=[],
                                  inversion=folder), explorer.pipe)[0][0]
    assert np.array_equal(shown, np.asarray(by_recipe.convert("RGB")))
    again = invert(explorer.pipe, [pixels], [caption], 3, 1.0).sample(explorer.pipe, [caption]).images[0]
    assert np.array_equal(shown, np.asarray(again.convert("RGB")))
    seeded = np.asarray(sample(explorer.pipe, [caption], [3], steps=3, guidance=1.0).images[0].convert("RGB"))
    assert not np.array_equal(shown, seeded)

    edit = client.post("/api/edit", json={"gen": gens[0]["gen"], "heads": [0, 1, 17], "all_patches": True}).json()
    assert edit["max_diff"] > 0
    path = tmp_path / "recipe.yaml"
    path.write_text(client.get("/api/recipe", params={"gen": gens[0]["gen"], "edit": edit["edit"]}).text)
    assert Recipe.load(path).inversion == folder
    assert np.array_equal(np.asarray(run_recipe(path, pipe=explorer.pipe, before=False)[1][0].convert("RGB")),
                          decode(edit["image"]))

    assert client.post("/api/open", json=open_body(data, caption)).json()["inversion"] == folder  # reopened: reused
    assert client.post("/api/close", json={}).json() == {"opened": None}
    back = client.post("/api/generate", json={"prompt": caption, "seed": 3, "steps": 3, "guidance": 1.0}).json()
    assert back["inversion"] is None and np.array_equal(decode(back["image"]), seeded)
    assert [p.name for p in root.iterdir()] == [Path(folder).name]


def test_open_image__the_trained_toy_draws_a_render_again_where_a_seed_misses_it(toy_pipe, tmp_path):
    """The bundled toy: the render's caption drawn from a seed gets its shape and texture wrong;
    drawn from the opened render's inverted noise, the oracle reads every attribute back."""
    from toyworld.oracle import check_image

    client = TestClient(make_app(Explorer(toy_pipe, model="toy", inversions=tmp_path)))
    data, pixels, caption, scene = render_png(2)
    seeded = client.post("/api/generate", json={"prompt": caption, "seed": 5, "steps": 6, "guidance": 1.0}).json()
    assert client.post("/api/open", json=open_body(data, caption, steps=6)).status_code == 200
    redrawn = client.post("/api/generate", json={"prompt": caption, "seed": 5}).json()
    seeded, redrawn = decode(seeded["image"]), decode(redrawn["image"])
    assert not all(check_image(scene, seeded).values())
    assert all(check_image(scene, redrawn).values()), check_image(scene, redrawn)
    assert np.abs(redrawn.astype(float) - pixels).mean() < 0.7 * np.abs(seeded.astype(float) - pixels).mean()


@pytest.mark.parametrize("body, message", [
    ({"image": base64.b64encode(b"just some notes").decode(), "name": "notes.txt"},
     "cannot read image notes.txt: not an image file (e.g. .png, .jpg, .jpeg, .webp)"),
    ({"image": "not base64 at all!"}, "image is not base64 data"),
    ({"image": ""}, "choose an image file"),
    ({"size": 16}, "image render.png is 16 x 16 pixels; model 'toy' takes 64 x 64"),
    ({"caption": "a purple unicorn"}, "words outside the toy world's vocabulary: 'unicorn'"),
    ({"caption": 3}, "caption must be a text"),
    ({"steps": 0}, "steps must be an integer in 1..100, got 0"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"seed": 1}, "unknown field(s) ['seed']"),
])
def test_open_image__bad_input_is_one_message_and_nothing_is_left_behind(fresh, body, message):
    explorer, client, root = fresh
    data, _, caption, _ = render_png(1, size=body.pop("size", None))
    r = client.post("/api/open", content=json.dumps({**open_body(data, caption), **body}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"] and "Traceback" not in r.text, r.text
    assert explorer.opened is None and not root.exists()


def test_open_image__a_failure_while_writing_leaves_no_folder_and_the_previous_image_open(fresh, monkeypatch):
    import activations.invert

    explorer, client, root = fresh
    data, _, caption, _ = render_png(0)
    first = client.post("/api/open", json=open_body(data, caption)).json()["inversion"]

    def save_then_fail(inversion, folder, record):
        save(inversion, folder, record)
        raise OSError(28, "No space left on device")

    save = activations.invert.save
    monkeypatch.setattr(activations.invert, "save", save_then_fail)
    data2, _, caption2, _ = render_png(1)
    r = client.post("/api/open", json=open_body(data2, caption2))
    assert r.status_code == 500 and "No space left on device" in r.json()["error"]
    assert [p.name for p in root.iterdir()] == [Path(first).name]
    assert str(explorer.opened.folder) == first


def test_open_image__generating_at_other_steps_than_its_inversion_is_refused(fresh):
    _, client, _ = fresh
    data, _, caption, _ = render_png(0)
    assert client.post("/api/open", json=open_body(data, caption)).status_code == 200
    r = client.post("/api/generate", json={"prompt": caption, "steps": 5, "guidance": 1.0})
    assert r.status_code == 400
    assert r.json()["error"] == ("steps 5 and guidance 1 differ from the opened image's inversion (3 steps, guidance 1); "
                                 "open it again with them, or go back to seeds")
