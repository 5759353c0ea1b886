"""Feature -> heads (rerun with observers), feature -> HRV concepts, feature -> toy ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SITE = "up_blocks.2.attentions.0"


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory, random_toy_pipe):
    from activations.config import HarvestConfig, PromptSource
    from activations.harvest import harvest

    out = tmp_path_factory.mktemp("feat") / "store"
    random_toy_pipe.set_progress_bar_config(disable=True)
    harvest(HarvestConfig(model="toy", out=str(out), sites=[SITE], seed=0, prompts=PromptSource(kind="toyworld", num_prompts=4),
                          num_inference_steps=3, guidance_scale=4.0, timesteps="all", branch="cond", batch_size=4,
                          progress=False), pipe=random_toy_pipe)
    return out


@pytest.fixture(scope="module")
def block_sae(toy_store):
    from activations.store import ActivationStore
    from sae.config import SparseCoderConfig
    from sae.registry import get_architecture

    width = ActivationStore(toy_store).site(SITE).width
    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=32, k=4), width)
    sae.placement.site = SITE
    return sae


def test_feature_heads__rerun_reproduces_stored_activation_and_stays_in_block(toy_store, block_sae, random_toy_pipe):
    from activations.sites import list_sites
    from activations.store import ActivationStore
    from analysis.feature_heads import feature_head_attribution
    from analysis.features import compute_feature_stats

    st = compute_feature_stats(block_sae, ActivationStore(toy_store).site(SITE), progress=False)
    feats = torch.argsort(st.density, descending=True)[:3].tolist()
    res = feature_head_attribution(block_sae, random_toy_pipe, toy_store, st, features=feats, examples=2, progress=False)
    att = res["attribution"]
    assert att.shape == (32, len(res["head_table"]))
    torch.testing.assert_close(res["activation"][feats], res["store_activation"][feats], rtol=2e-3, atol=2e-3)
    inside = [s for s in list_sites(random_toy_pipe.unet) if s.kind == "head" and s.block == SITE]
    cols = [s.first_head + h for s in inside for h in range(s.heads)]
    outside = torch.ones(att.shape[1], dtype=torch.bool)
    outside[cols] = False
    assert att[:, outside].abs().sum() == 0 and att[feats][:, cols].abs().sum() > 0


def test_feature_heads__head_site_sae_uses_decoder_slices(random_toy_pipe):
    from activations.sites import head_table, list_sites
    from analysis.feature_heads import feature_head_attribution
    from sae.config import SparseCoderConfig
    from sae.registry import get_architecture

    site = next(s for s in list_sites(random_toy_pipe.unet) if s.kind == "head")
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=8, k=2), site.heads * site.head_dim)
    sae.placement.site, sae.placement.stage = site.name, "heads"
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[0, site.head_dim: 2 * site.head_dim] = 1.0  # feature 0 lives in head 1 only
    att = feature_head_attribution(sae, random_toy_pipe, None, None)["attribution"]
    assert att.shape == (8, len(head_table(random_toy_pipe.unet)))
    assert int(att[0].argmax()) == site.first_head + 1 and att[0].sum() == pytest.approx(site.head_dim ** 0.5)


def test_toy_truth__auroc_per_window_and_value(toy_store, block_sae):
    from activations.store import ActivationStore
    from analysis.toy_truth import best_labels, channel_truth, concept_values, feature_truth

    reader = ActivationStore(toy_store).site(SITE)
    res = feature_truth(block_sae, reader, toy_store)
    assert res["auroc"].shape == (3, 32, len(concept_values()))
    assert "color=red" in res["values"] and sum(res["rows"]) == reader.num_rows
    finite = res["auroc"][np.isfinite(res["auroc"])]
    assert finite.size and finite.min() >= 0 and finite.max() <= 1
    ch = channel_truth(reader, toy_store)
    assert ch.shape == (reader.width, len(concept_values())) and np.nanmin(ch) >= 0.5
    assert len(best_labels(res["auroc"][0], res["values"])) == 32


def test_feature_concepts__one_head_feature_gets_that_heads_concept():
    from analysis.feature_concepts import concept_scores, top_concepts

    hrv = torch.tensor([[4.0, 0, 0, 0], [0, 2, 2, 0]])  # rows L1 = H = 4
    att = torch.tensor([[1.0, -3, 0, 0], [0, 0, 0, 0], [0, 0.5, 0.5, 0]])
    s = concept_scores(hrv, att)
    assert top_concepts(s, ["color", "shape"], 0)[0] == ("color", 1.0)
    assert top_concepts(s, ["color", "shape"], 1) == []
    assert top_concepts(s, ["color", "shape"], 2)[0][0] == "shape"
    with pytest.raises(ValueError, match="heads"):
        concept_scores(hrv, att[:, :3])


def test_concept_lift__a_concept_every_feature_shares_stops_topping_every_feature():
    from analysis.feature_concepts import concept_lift

    # style scores high for every feature (its heads write everything); colour only for feature 0
    scores = torch.tensor([[0.30, 0.50], [0.05, 0.50], [0.05, 0.60], [float("nan"), float("nan")]])
    assert scores[:3].argmax(1).tolist() == [1, 1, 1]
    lift = concept_lift(scores)
    assert lift[:3].argmax(1).tolist() == [0, 1, 1]
    assert torch.isnan(lift[3]).all()


def test_total_head_attribution__is_the_derivative_of_the_feature_in_each_heads_scale(toy_store, block_sae, random_toy_pipe):
    """Attribution patching: a head's share is d pre_f / d s at s = 1, where s scales the head's
    output at the example's step; checked against a finite difference of two reruns. Heads after
    the block get 0, heads of earlier blocks get shares (the direct method gives them none)."""
    from activations.edits import HeadEdit, Observe
    from activations.generate import sample
    from activations.hooks import intervene
    from activations.sites import list_sites
    from activations.store import ActivationStore
    from analysis.feature_heads import feature_head_attribution
    from analysis.features import compute_feature_stats

    st = compute_feature_stats(block_sae, ActivationStore(toy_store).site(SITE), progress=False)
    f = int(torch.argmax(st.top_act[:, 0]))
    res = feature_head_attribution(block_sae, random_toy_pipe, toy_store, st, method="total", features=[f], examples=1,
                                   progress=False)
    torch.testing.assert_close(res["activation"][f], res["store_activation"][f], rtol=2e-3, atol=2e-3)
    att = res["attribution"][f]
    sites = [s for s in list_sites(random_toy_pipe.unet) if s.kind == "head"]
    order = [s.block for s in sites]
    after = [s for s in sites if order.index(s.block) > order.index(SITE)]
    before = [s for s in sites if order.index(s.block) < order.index(SITE)]
    assert all(att[s.first_head: s.first_head + s.heads].abs().sum() == 0 for s in after)
    assert sum(att[s.first_head: s.first_head + s.heads].abs().sum() for s in before) > 0

    ex = st.top_examples(f, 1)[0]
    site = max(before, key=lambda s: float(att[s.first_head: s.first_head + s.heads].abs().max()))
    local = int(att[site.first_head: site.first_head + site.heads].abs().argmax())
    prompt = next(r for r in ActivationStore(toy_store).prompts() if int(r["image"]) == ex["image"])
    enc, n = block_sae.encoder.weight.detach()[f], ex["i"] * st.grid[1] + ex["j"]

    def pre_at(scale: float) -> float:
        got = {}
        read = Observe(site=SITE, stage="block", when={"steps": [ex["step"]]}, branch="cond",
                       fn=lambda call: got.update(v=float((call.delta[call.rows("cond")][0, n] - block_sae.b_dec) @ enc
                                                          + block_sae.encoder.bias[f])))
        edit = HeadEdit(site=site.name, stage="heads", heads=[local], scale=scale, when={"steps": [ex["step"]]})
        with torch.no_grad(), intervene(random_toy_pipe, edit, read):
            sample(random_toy_pipe, [prompt["text"]], [int(prompt["seed"])], steps=3, guidance=4.0, output_type="latent")
        return got["v"]

    eps = 1e-2
    finite_difference = (pre_at(1 + eps) - pre_at(1 - eps)) / (2 * eps)
    share = float(att[site.first_head + local])
    assert abs(share) > 1e-4
    assert finite_difference == pytest.approx(share, rel=0.03, abs=1e-4)


def test_feature_head_attribution__unknown_method_names_the_choices(block_sae, random_toy_pipe):
    from analysis.feature_heads import feature_head_attribution

    with pytest.raises(ValueError, match="'sum'.*direct, total"):
        feature_head_attribution(block_sae, random_toy_pipe, None, None, method="sum")
