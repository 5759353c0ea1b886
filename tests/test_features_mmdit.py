"""Feature analysis on an MMDiT store: the top examples rerun to their stored activations, and each
head's total effect on a block feature by attribution patching (the direct method is refused)."""

from __future__ import annotations

import pytest
import torch

from activations.config import HarvestConfig, PromptSource
from activations.harvest import harvest
from activations.models import build_tiny_pipeline
from activations.sites import list_sites
from activations.store import ActivationStore
from analysis.feature_heads import feature_head_attribution
from analysis.features import compute_feature_stats
from common.errors import UsageError
from sae.config import SparseCoderConfig
from sae.registry import get_architecture

SITE = "transformer_blocks.1"  # SD3's middle block, FLUX's last double-stream block: heads before and after it
LATER = {"sd3": "transformer_blocks.2", "flux": "single_transformer_blocks.0"}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def mmdit_store(request, tmp_path_factory):
    family = request.param
    pipe = build_tiny_pipeline(family)
    out = tmp_path_factory.mktemp("mmdit_feat") / "store"
    harvest(HarvestConfig(model=f"tiny-{family}", out=str(out), sites=[SITE], prompts=PromptSource(kind="list", texts=["a red cat", "a dog", "a blue bird"]),
                          num_inference_steps=3, guidance_scale=4.0, timesteps="all", branch="both" if family == "sd3" else "cond", batch_size=3,
                          progress=False, save_images=False), pipe=pipe)
    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=16, k=3), ActivationStore(out).site(SITE).width)
    sae.placement.site = SITE
    return family, pipe, out, sae


def test_total_attribution_on_an_mmdit__reruns_match_the_store_and_later_heads_get_nothing(mmdit_store):
    family, pipe, out, sae = mmdit_store
    st = compute_feature_stats(sae, ActivationStore(out).site(SITE), progress=False)
    f = int(torch.argmax(st.top_act[:, 0]))
    res = feature_head_attribution(sae, pipe, out, st, method="total", features=[f], examples=2, progress=False)
    torch.testing.assert_close(res["activation"][f], res["store_activation"][f], rtol=5e-3, atol=5e-3)
    att = res["attribution"][f]
    heads = {s.block: s for s in list_sites(pipe) if s.kind == "head"}
    later, earlier = heads[LATER[family]], heads["transformer_blocks.0"]
    assert att[later.head_range].abs().sum() == 0  # a head after the block cannot reach it
    assert att[earlier.head_range].abs().sum() > 0


def test_direct_attribution_on_an_mmdit_is_refused_naming_the_valid_method(mmdit_store):
    family, pipe, out, sae = mmdit_store
    st = compute_feature_stats(sae, ActivationStore(out).site(SITE), progress=False)
    with pytest.raises(UsageError, match="valid methods here: total"):
        feature_head_attribution(sae, pipe, out, st, method="direct", progress=False)
