"""SAEs on MMDiT sites: trained on a tiny SD3 / FLUX store (an image-stream block site and a
text-stream ``.context`` site), spliced back through ``evaluate``, scored by fraction_recovered."""

from __future__ import annotations

import math

import pytest
import torch

from activations.config import HarvestConfig, PromptSource
from activations.edits import Ablate
from activations.evaluate import evaluate
from activations.harvest import harvest
from activations.models import build_tiny_pipeline
from sae import SAE, train_quick
from sae.metrics import fraction_recovered
from sae.splice import check_sae_fits

PROMPTS = ["a red cat", "a blue dog on the left", "a green bird", "a cat and a dog"]
SITES = {"sd3": ["transformer_blocks.1", "transformer_blocks.1.context"],
         "flux": ["single_transformer_blocks.0", "transformer_blocks.1.context"]}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def mmdit_store(request, tmp_path_factory):
    family = request.param
    pipe = build_tiny_pipeline(family)
    root = tmp_path_factory.mktemp(f"store-{family}")
    harvest(HarvestConfig(model=f"tiny-{family}", out=str(root), sites=SITES[family],
                          prompts=PromptSource(kind="list", texts=PROMPTS), num_inference_steps=2, guidance_scale=3.5,
                          timesteps="all", branch="cond", positions=None, batch_size=4, images_per_shard=4,
                          progress=False, save_images=True), pipe=pipe)
    return family, pipe, root


@pytest.mark.parametrize("which", [0, 1], ids=["block", "context"])
def test_an_sae_trained_on_an_mmdit_site_recovers_a_finite_fraction_and_a_perfect_one_recovers_all(tmp_path, mmdit_store, which):
    family, pipe, root = mmdit_store
    site = SITES[family][which]
    path, metrics = train_quick(str(root), site=site, out=str(tmp_path / "sae"), k=4, expansion_factor=2, batch_size=32,
                                epochs=2, wandb=False, pipeline=pipe, recovered_images=2)
    # LitSAE's own loss-recovered metric ran evaluate on the MMDiT with the SAE spliced in
    assert math.isfinite(metrics["metrics/fraction_recovered"]), metrics
    assert math.isfinite(metrics["metrics/denoising_loss/sae"])
    sae = SAE.from_pretrained(path)
    assert sae.placement.site == site and sae.placement.stage == "block"
    check_sae_fits(sae, pipe)  # fingerprint, site and width checked against the transformer
    sets = {"clean": [], "sae": [sae.splice(error_term=False)], "perfect": [sae.splice(error_term=True)],
            "zero": [Ablate(site=site)]}
    losses = evaluate(pipe, sets, store=root, images=[0, 1, 2], timesteps=[800, 400, 100], guidance=3.5)
    assert losses["zero"] != pytest.approx(losses["clean"], rel=1e-4), losses
    assert math.isfinite(fraction_recovered(losses["clean"], losses["sae"], losses["zero"]))
    # with its error term the splice returns x exactly (up to rounding): all of the loss is recovered
    assert fraction_recovered(losses["clean"], losses["perfect"], losses["zero"]) == pytest.approx(1.0, abs=1e-3)


def test_the_metrics_pipeline_is_loaded_with_its_denoiser_frozen(tmp_path, monkeypatch):
    import activations
    from sae.lit import LitSAE
    from sae.config import SparseCoderConfig

    pipe = build_tiny_pipeline("flux")
    pipe.transformer.requires_grad_(True)
    monkeypatch.setattr(activations, "load_pipeline", lambda model: pipe)
    model = LitSAE(SparseCoderConfig(architecture="topk", expansion_factor=2, k=4))
    assert model._pipeline("tiny-flux") is pipe
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
