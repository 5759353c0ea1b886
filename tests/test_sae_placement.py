"""SAEs that know where they belong: placement in cfg.json, folders of SAEs, width checks, splicing
an SAE into the U-Net (with and without its error term), and the denoising loss under interventions."""

from __future__ import annotations

import json

import pytest
import torch

from activations.edits import Ablate
from activations.evaluate import evaluate
from activations.hooks import intervene
from activations.intervention import load_interventions, save_interventions
from activations.models import build_tiny_pipeline
from sae import SAE, train_quick
from sae.config import Placement, SparseCoderConfig
from sae.registry import get_architecture
from sae.synthetic import write_sparse_store

BLOCK = "mid_block.attentions.0"
OTHER = "down_blocks.1.attentions.0"


def make(d=32, m=64, k=4, site=BLOCK, window=None, revision=None):
    # revision None: no recorded weights fingerprint, so the SAE fits the test's tiny pipeline
    # (a recorded one is checked against the U-Net's: sae.splice.check_sae_fits)
    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=m, k=k), d)
    sae.placement = Placement(site=site, window=window, branch="cond", model="tiny-sd1", model_revision=revision)
    return sae


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sd1")


def latents_of(pipe, *interventions):
    gen = torch.Generator().manual_seed(0)
    with intervene(pipe, *interventions):
        return pipe(["a red cat"], num_inference_steps=3, guidance_scale=2.0, generator=gen, output_type="latent").images


def test_placement__saved_in_cfg_json_and_restored(tmp_path):
    make(window={"tau": [0.6, 1.0]}, revision="abc").save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert cfg["site"] == BLOCK and cfg["window"] == {"tau": [0.6, 1.0]} and cfg["d_in"] == 32
    loaded = SAE.from_pretrained(tmp_path / "a")
    assert loaded.placement == Placement(site=BLOCK, window={"tau": [0.6, 1.0]}, branch="cond", model="tiny-sd1", model_revision="abc")


def test_folder_of_saes__addressed_by_site_and_window(tmp_path):
    make(window="early").save_pretrained(tmp_path / "x1")
    make(window="late").save_pretrained(tmp_path / "x2")
    make(d=16, site=OTHER).save_pretrained(tmp_path / "x3")
    assert SAE.from_pretrained(tmp_path, site=BLOCK, window="late").source == tmp_path / "x2"
    assert SAE.from_pretrained(tmp_path, site=OTHER).d_in == 16
    with pytest.raises(FileNotFoundError, match="several SAEs match"):
        SAE.from_pretrained(tmp_path, site=BLOCK)
    with pytest.raises(FileNotFoundError, match="no SAE with site='up_blocks.0'"):
        SAE.from_pretrained(tmp_path, site="up_blocks.0")


def test_wrong_width__refused_naming_both_widths():
    sae = make(d=64)
    with pytest.raises(ValueError, match="d_in=64 .* got width 32"):
        sae(torch.randn(3, 16, 32))


def test_from_pretrained__missing_folder_and_mismatched_d_in_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SAE.from_pretrained(tmp_path / "nowhere")
    make().save_pretrained(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg["d_in"] = 48
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="d_in=48 but the weights .* take width 32"):
        SAE.from_pretrained(tmp_path / "s")


def test_splice__error_term_without_edit_changes_nothing(pipe):
    ref = latents_of(pipe)
    torch.testing.assert_close(latents_of(pipe, make().splice()), ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(latents_of(pipe, make().splice(error_term=False)), ref, atol=1e-4)


def test_splice__editing_one_latent_adds_only_its_decoder_direction(pipe):
    sae = make()
    seen = []
    from activations.edits import Observe

    def bump(z):
        z = z.clone()
        z[:, 5] += 2.0
        return z

    splice = sae.splice(when={"steps": [0]})
    splice.edit = bump
    before = Observe(site=BLOCK, fn=lambda c: seen.append(c.delta.clone()), sees="before", when={"steps": [0]})
    after = Observe(site=BLOCK, fn=lambda c: seen.append(c.delta.clone()), when={"steps": [0]})
    latents_of(pipe, splice, before, after)
    torch.testing.assert_close(seen[1] - seen[0], (2.0 * sae.W_dec[5]).expand_as(seen[0]), atol=1e-5, rtol=1e-4)


def test_splice__at_another_site_or_width_is_refused(pipe):
    with pytest.raises(ValueError, match=f"trained on site '{BLOCK}' .* cannot be applied at site '{OTHER}'"):
        make().splice(site=OTHER)
    unplaced = make(d=16, site=None)
    with pytest.raises(ValueError, match="takes width 16 .* has width 32"):
        latents_of(pipe, unplaced.splice(site=BLOCK))


def test_splice__written_to_a_recipe_loads_the_same_sae(pipe, tmp_path):
    make().save_pretrained(tmp_path / "sae")
    splice = SAE.from_pretrained(tmp_path / "sae").splice(error_term=False, when="early")
    (back,) = load_interventions(save_interventions(tmp_path / "r.yaml", [splice]))
    assert torch.equal(latents_of(pipe, back), latents_of(pipe, splice))


def test_splice__when_defaults_to_the_saes_window_and_an_explicit_one_wins(tmp_path):
    from activations.timesteps import All, Window

    sae = make(window={"tau": [0.6, 1.0]})
    assert sae.splice().when == Window.tau(0.6, 1.0) and sae.splice(when="all").when == All()
    sae.save_pretrained(tmp_path / "sae")
    splices = [SAE.from_pretrained(tmp_path / "sae").splice(), SAE.from_pretrained(tmp_path / "sae").splice(when="late")]
    back = load_interventions(save_interventions(tmp_path / "r.yaml", splices))
    assert [b.when for b in back] == [Window.tau(0.6, 1.0), Window("late")]


def test_evaluate__scores_interventions_against_the_clean_unet(pipe):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    sets = {"clean": [], "splice": [make().splice()], "zero": [Ablate(site=BLOCK)]}
    losses = evaluate(pipe, sets, images=images, prompts=["a red cat", "a blue dog"], timesteps=[800, 200])
    assert losses["splice"] == pytest.approx(losses["clean"], rel=1e-4)
    assert losses["zero"] != pytest.approx(losses["clean"], rel=1e-3)
    with pytest.raises(ValueError, match="one prompt per image"):
        evaluate(pipe, sets, images=images, prompts=["a red cat"])


def test_trained_sae__knows_its_site_window_and_model(tmp_path):
    write_sparse_store(tmp_path / "store", n=1024, d=8, images=8)
    path, _ = train_quick(str(tmp_path / "store"), out=str(tmp_path / "out"), k=4, expansion_factor=4,
                          batch_size=128, epochs=1, wandb=False, recovered_images=0, window="early")
    placed = SAE.from_pretrained(path).placement
    assert placed.site == BLOCK and placed.window == "early" and placed.normalizer_folded > 0
    assert SAE.from_pretrained(tmp_path / "out", site=BLOCK, window="early").source == path
