"""The joint-attention processor of MMDiTs (SD3, FLUX): idle it is diffusers' own processors on a
full forward pass; its stages are the documented slices of the joint attention; edits change the
image stream only, and do what they say."""

from __future__ import annotations

import pytest
import torch

from activations.edits import Ablate, HeadEdit, Observe, Scale, SwapKV
from activations.joint_processor import JointHeadProcessor, install_joint_processors
from activations.models import build_tiny_transformer, build_tiny_unet
from common.errors import UsageError

from mmdit_helpers import B, N, TEXT, by_hand, capture_inputs, forward

# a FLUX double-stream and a single-stream module, and SD3's first and last (context_pre_only) block
SITES = {"sd3": ["transformer_blocks.0.attn", "transformer_blocks.2.attn"],
         "flux": ["transformer_blocks.1.attn", "single_transformer_blocks.0.attn"]}


def test_idle__full_forward_equals_diffusers_processors_and_remove_restores_them(mmdit):
    family, model, ref = mmdit
    originals = {name: type(m.processor) for name, m in model.named_modules() if name.endswith(".attn")}
    with install_joint_processors(model) as installed:
        assert sorted(installed.processors) == sorted(originals)
        assert all(isinstance(model.get_submodule(s).processor, JointHeadProcessor) for s in originals)
        out = forward(model, family)
    assert (out - ref).abs().max() <= 1e-5
    assert {name: type(model.get_submodule(name).processor) for name in originals} == originals
    assert torch.equal(forward(model, family), ref)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_observers_see_image_queries_text_keys_and_the_text_slice_of_the_joint_softmax(family):
    model = build_tiny_transformer(family)
    idle = forward(model, family)
    for site in SITES[family]:
        attn = model.get_submodule(site)
        seen = {}
        grabbed, handle = capture_inputs(attn)
        with install_joint_processors(model) as installed:
            installed.processors[site].interventions.append(
                Observe(stage="heads", fn=lambda call: seen.update(q=call.q, k=call.k, v=call.v, probs=call.probs, out=call.out),
                        extra_needs={"probs"}))
            assert torch.equal(forward(model, family), idle)  # reading the maps leaves the output bit for bit
        handle.remove()
        q, k, v, txt, img = by_hand(attn, grabbed["x"], grabbed["ctx"], grabbed["rope"], family == "flux")
        heads, d = attn.heads, q.shape[-1]
        assert seen["probs"].shape == (B, heads, N, TEXT) and seen["q"].shape == (B, heads, N, d)
        assert seen["k"].shape == seen["v"].shape == (B, heads, TEXT, d)
        full = (q[:, :, img] @ k.transpose(-1, -2) / d**0.5).softmax(-1)
        torch.testing.assert_close(seen["probs"], full[..., txt], atol=1e-5, rtol=1e-5)
        rows = seen["probs"].sum(-1)
        assert (rows < 1).all() and (rows > 0).all(), site  # the rest of each row went to the image keys
        torch.testing.assert_close(seen["q"], q[:, :, img], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seen["k"], k[:, :, txt], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seen["v"], v[:, :, txt], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seen["out"], full @ v, atol=1e-5, rtol=1e-5)


def forward_with_every_processor(model, family, make):
    """The transformer's output with a fresh ``make()`` intervention on every joint attention."""
    with install_joint_processors(model) as installed:
        for proc in installed.processors.values():
            proc.interventions.append(make())
        return forward(model, family)


def test_probs_edit_by_one__explicit_path_within_1e5_of_idle(mmdit):
    family, model, ref = mmdit
    out = forward_with_every_processor(model, family, lambda: HeadEdit(stage="probs", scale=1.0))
    assert (out - ref).abs().max() <= 1e-5


def run_module(family, site, *interventions):
    """(image output, text output) of one module on the inputs it sees in a forward pass."""
    model = build_tiny_transformer(family)
    attn = model.get_submodule(site)
    grabbed, handle = capture_inputs(attn)
    forward(model, family)
    handle.remove()
    proc = JointHeadProcessor(site, text_tokens=TEXT, text_first=family == "flux", single_stream=site.startswith("single"))
    proc.interventions.extend(interventions)
    attn.set_processor(proc)
    with torch.no_grad():
        out = attn(grabbed["x"], encoder_hidden_states=grabbed["ctx"], image_rotary_emb=grabbed["rope"])
    if site.startswith("single"):  # one stream: [text, image] tokens, no to_out
        return out[:, TEXT:], out[:, :TEXT]
    return out


@pytest.mark.parametrize("family, site", [(f, s) for f, sites in SITES.items() for s in sites])
def test_zeroing_text_probs_leaves_the_image_its_image_attention_and_the_text_stream_untouched(family, site):
    idle_img, idle_txt = run_module(family, site)
    img, txt = run_module(family, site, HeadEdit(stage="probs", value=0.0))
    assert torch.equal(txt, idle_txt)  # edits act on the image stream only
    assert (img - idle_img).abs().max() > 1e-3
    # not renormalised: the image rows keep only their attention to the image tokens; the same
    # as zeroing the text values
    img_v, txt_v = run_module(family, site, Ablate(stage="v"))
    torch.testing.assert_close(img, img_v, atol=1e-5, rtol=1e-5)
    assert torch.equal(txt_v, idle_txt)


def test_zeroing_all_text_probs_changes_the_transformer_output(mmdit):
    family, model, ref = mmdit
    out = forward_with_every_processor(model, family, lambda: HeadEdit(stage="probs", value=0.0))
    assert (out - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family, site", [("sd3", "transformer_blocks.1.attn"), ("flux", "single_transformer_blocks.1.attn")])
def test_heads_tokens_and_patch_masks_select_what_is_edited(family, site):
    before, after = {}, {}
    edits = [Observe(stage="probs", fn=lambda x, call: before.update(p=x.clone()), sees="before"),
             HeadEdit(stage="probs", heads=[1], tokens=[0, 3], value=0.0),
             Observe(stage="probs", fn=lambda x, call: after.update(p=x.clone()), sees="after"),
             Observe(stage="heads", fn=lambda x, call: before.update(h=x.clone()), sees="before"),
             Scale(stage="heads", factor=0.0, mask=[0, 5]),
             Observe(stage="heads", fn=lambda x, call: after.update(h=x.clone()), sees="after")]
    run_module(family, site, *edits)
    changed = before["p"] != after["p"]
    assert changed[:, 1][:, :, [0, 3]].all() and changed.sum() == B * N * 2
    assert (after["p"][:, 1][:, :, [0, 3]] == 0).all()
    patches = (before["h"] != after["h"]).any(-1).any(1)  # [b, N]
    assert patches[:, [0, 5]].all() and patches.sum() == B * 2


def test_key_edits_reach_the_image_queries_only_and_text_embeddings_to_project_are_refused():
    idle_img, idle_txt = run_module("flux", "transformer_blocks.0.attn")
    img, txt = run_module("flux", "transformer_blocks.0.attn", Scale(stage="k", factor=0.0))
    assert torch.equal(txt, idle_txt) and (img - idle_img).abs().max() > 1e-4
    with pytest.raises(UsageError, match="text embeddings have no fixed key projection at joint attention sites"):
        run_module("sd3", "transformer_blocks.0.attn", SwapKV(encoder_hidden_states=torch.zeros(TEXT, 32)))


def test_install_refuses_a_unet():
    with pytest.raises(UsageError, match="no joint attention"):
        install_joint_processors(build_tiny_unet("sd1"))


def test_idle__sd35_layout_with_qk_norms_and_a_dual_attention_block_equals_diffusers():
    # SD3.5: RMSNorm on q, k and the text's q, k; attn2 (image-only self-attention) keeps diffusers' processor
    from diffusers import SD3Transformer2DModel

    from activations.models import tiny_transformer_config

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**{**tiny_transformer_config("sd3"), "qk_norm": "rms_norm", "dual_attention_layers": (0,)}).eval()
    assert model.transformer_blocks[0].attn.norm_added_q is not None
    ref = forward(model, "sd3")
    with install_joint_processors(model) as installed:
        assert "transformer_blocks.0.attn2" not in installed.processors
        assert (forward(model, "sd3") - ref).abs().max() <= 1e-5
        for proc in installed.processors.values():
            proc.interventions.append(HeadEdit(stage="probs", scale=1.0))
        assert (forward(model, "sd3") - ref).abs().max() <= 1e-5
