"""The one attention processor: exact when idle, observers see per-head values, edits do what they say."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from activations.hooks import RunState, attach, intervene
from activations.models import build_tiny_pipeline, build_tiny_unet
from activations.edits import Observe
from activations.processor import AddVector, HeadEdit, HeadProcessor, Observer, SwapKV

HEADS, D, N, T, C, CTX = 4, 8, 12, 5, 32, 24


@pytest.fixture
def module():
    torch.manual_seed(0)
    attn = Attention(query_dim=C, cross_attention_dim=CTX, heads=HEADS, dim_head=D).eval()
    x = torch.randn(2, N, C)
    ctx = torch.randn(2, T, CTX)
    return attn, x, ctx


def reference_parts(attn, x, ctx):
    """Per-head q, k, v, probs and head outputs computed by hand."""
    q = attn.to_q(x).view(2, N, HEADS, D).transpose(1, 2)
    k = attn.to_k(ctx).view(2, T, HEADS, D).transpose(1, 2)
    v = attn.to_v(ctx).view(2, T, HEADS, D).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / D**0.5).softmax(-1)
    return q, k, v, probs


def merge(attn, out):
    return attn.to_out[0](out.transpose(1, 2).reshape(2, N, HEADS * D))


def run(attn, x, ctx, proc):
    attn.set_processor(proc)
    with torch.no_grad():
        return attn(x, encoder_hidden_states=ctx)


def test_idle_processor_equals_diffusers_default(module):
    attn, x, ctx = module
    ref = run(attn, x, ctx, AttnProcessor2_0())
    assert (run(attn, x, ctx, HeadProcessor("m")) - ref).abs().max() <= 1e-5


def test_probs_observers__output_bit_for_bit_the_idle_one(module):
    """Reading the attention maps (a harvest, the explorer) must not change the image, even by the
    float order of another kernel."""
    attn, x, ctx = module
    idle = run(attn, x, ctx, HeadProcessor("m"))
    for stage_probs in (False, True):
        proc = HeadProcessor("m")
        observe = Observe(stage="probs", fn=lambda x, call: None, sees="before") if stage_probs else \
            Observer(lambda call: None, {"probs"})
        proc.interventions.append(observe)
        assert torch.equal(run(attn, x, ctx, proc), idle)


def test_probs_edit__explicit_path_equals_default_within_1e5(module):
    attn, x, ctx = module
    ref = run(attn, x, ctx, AttnProcessor2_0())
    proc = HeadProcessor("m")
    proc.interventions.append(HeadEdit(stage="probs", heads=[0], scale=1.0))
    assert (run(attn, x, ctx, proc) - ref).abs().max() <= 1e-5


def test_observers_see_per_head_q_k_v_probs_and_outputs(module):
    attn, x, ctx = module
    q, k, v, probs = reference_parts(attn, x, ctx)
    seen = {}
    proc = HeadProcessor("m")
    proc.interventions.append(Observer(lambda call: seen.update(vars(call)), {"q", "k", "v", "probs", "out"}))
    with torch.no_grad():
        run(attn, x, ctx, proc)
    torch.testing.assert_close(seen["q"], q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["k"], k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["v"], v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["probs"], probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["out"], probs @ v, atol=1e-5, rtol=1e-5)
    assert seen["probs"].shape == (2, HEADS, N, T)


def test_scaling_chosen_heads_patches_tokens_of_probs(module):
    attn, x, ctx = module
    q, k, v, probs = reference_parts(attn, x, ctx)
    heads, patches, tokens = [1, 3], [0, 5, 7], [2, 4]
    edited = probs.clone()
    for h in heads:
        for p in patches:
            for t in tokens:
                edited[:, h, p, t] *= -2.0
    expect = merge(attn, edited @ v)
    proc = HeadProcessor("m")
    proc.interventions.append(HeadEdit(stage="probs", heads=heads, mask=patches, tokens=tokens, scale=-2.0))
    torch.testing.assert_close(run(attn, x, ctx, proc), expect, atol=1e-5, rtol=1e-5)


def test_replacing_head_outputs_on_a_patch_mask(module):
    attn, x, ctx = module
    q, k, v, probs = reference_parts(attn, x, ctx)
    out = probs @ v
    mask = torch.zeros(3, 4, dtype=torch.bool)  # a [H, W] mask of the 12 patches
    mask[1, 2] = mask[2, 0] = True
    out[:, 0, mask.flatten()] = 0.5
    proc = HeadProcessor("m")
    proc.interventions.append(HeadEdit(stage="heads", heads=[0], mask=mask, value=0.5))
    torch.testing.assert_close(run(attn, x, ctx, proc), merge(attn, out), atol=1e-5, rtol=1e-5)


def test_function_edit_sees_the_full_tensor(module):
    attn, x, ctx = module
    proc = HeadProcessor("m")
    proc.interventions.append(HeadEdit(stage="heads", fn=lambda t, call: torch.zeros_like(t)))
    torch.testing.assert_close(run(attn, x, ctx, proc), attn.to_out[0].bias.expand(2, N, C))


def test_swap_kv_encodes_another_prompt_on_chosen_heads_and_patches(module):
    attn, x, ctx = module
    other = torch.randn(1, 7, CTX)
    _, _, v, probs = reference_parts(attn, x, ctx)
    out = probs @ v
    # the other prompt's attention, by hand
    q = attn.to_q(x).view(2, N, HEADS, D).transpose(1, 2)
    k2 = attn.to_k(other).view(1, 7, HEADS, D).transpose(1, 2)
    v2 = attn.to_v(other).view(1, 7, HEADS, D).transpose(1, 2)
    alt = (q @ k2.transpose(-1, -2) / D**0.5).softmax(-1) @ v2
    out[:, 2, 3:6] = alt[:, 2, 3:6]
    proc = HeadProcessor("m")
    proc.interventions.append(SwapKV(encoder_hidden_states=other, heads=[2], mask=[3, 4, 5]))
    torch.testing.assert_close(run(attn, x, ctx, proc), merge(attn, out), atol=1e-5, rtol=1e-5)


def test_swap_kv_with_the_same_prompt_changes_nothing(module):
    attn, x, ctx = module
    ref = run(attn, x, ctx, AttnProcessor2_0())
    proc = HeadProcessor("m")
    proc.interventions.append(SwapKV(encoder_hidden_states=ctx))
    torch.testing.assert_close(run(attn, x, ctx, proc), ref, atol=1e-5, rtol=1e-5)


def test_add_vector_to_module_output_and_to_heads(module):
    attn, x, ctx = module
    ref = run(attn, x, ctx, AttnProcessor2_0())
    vec = torch.randn(C)
    proc = HeadProcessor("m")
    proc.interventions.append(AddVector(vector=vec, mask=[0, 1], scale=2.0))
    got = run(attn, x, ctx, proc)
    torch.testing.assert_close(got[:, :2], ref[:, :2] + 2 * vec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 2:], ref[:, 2:], atol=1e-6, rtol=1e-6)
    _, _, v, probs = reference_parts(attn, x, ctx)
    out = probs @ v
    hv = torch.randn(D)
    out[:, 1] += hv
    proc = HeadProcessor("m")
    proc.interventions.append(AddVector(vector=hv, heads=[1]))
    torch.testing.assert_close(run(attn, x, ctx, proc), merge(attn, out), atol=1e-5, rtol=1e-5)


def test_edits_respect_the_guidance_branch(module):
    attn, x, ctx = module
    ref = run(attn, x, ctx, AttnProcessor2_0())
    proc = HeadProcessor("m", RunState(step=0, t=999, cfg=True))  # rows: [uncond, cond]
    proc.interventions.append(HeadEdit(stage="heads", scale=0.0, branch="cond"))
    got = run(attn, x, ctx, proc)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], attn.to_out[0].bias.expand(N, C))


def test_edits_respect_steps_and_windows(module):
    attn, x, ctx = module
    ref = run(attn, x, ctx, AttnProcessor2_0())
    state = RunState(step=3, t=150)
    proc = HeadProcessor("m", state)
    proc.interventions.append(HeadEdit(stage="heads", scale=0.0, when="early"))
    torch.testing.assert_close(run(attn, x, ctx, proc), ref)
    proc.interventions[0] = HeadEdit(stage="heads", scale=0.0, when="late")
    assert not torch.allclose(run(attn, x, ctx, proc), ref)
    proc.interventions[0] = HeadEdit(stage="heads", scale=0.0, when={"steps": [0, 1]})
    torch.testing.assert_close(run(attn, x, ctx, proc), ref)


def test_bad_edits_name_the_problem():
    with pytest.raises(ValueError, match="valid stages: q, k, v, probs, heads, attn_out, block"):
        HeadEdit(stage="prob", scale=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        HeadEdit(stage="heads", scale=1.0, value=0.0)
    with pytest.raises(ValueError, match="valid choices: cond, uncond, both"):
        HeadEdit(stage="heads", scale=1.0, branch="conditional")
    with pytest.raises(ValueError, match="valid: q, k, v, out, probs"):
        Observer(lambda c: None, {"attn"})


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_whole_unet_idle_and_probability_paths_match_default(family):
    unet = build_tiny_unet(family)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8)
    ehs = torch.randn(2, 6, unet.config.cross_attention_dim)
    extra = {}
    if family == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}}
    with torch.no_grad():
        ref = unet(sample, 500, ehs, **extra).sample
        with attach(unet) as tap:
            idle = unet(sample, 500, ehs, **extra).sample
            for proc in tap.processors.values():
                proc.interventions.append(Observer(lambda c: None, {"probs"}))
            explicit = unet(sample, 500, ehs, **extra).sample
    assert (idle - ref).abs().max() <= 1e-5
    assert (explicit - ref).abs().max() <= 1e-5


def test_original_processors_return_after_an_exception():
    pipe = build_tiny_pipeline("sd1")
    before = {n: type(p) for n, p in pipe.unet.attn_processors.items()}
    name = "mid_block.attentions.0.transformer_blocks.0.attn2"

    def boom(call):
        raise RuntimeError("observer failed")

    with pytest.raises(RuntimeError, match="observer failed"), intervene(pipe, Observe(site=name, stage="heads", fn=boom)):
        pipe(["a red cat"], num_inference_steps=2, output_type="latent")
    assert {n: type(p) for n, p in pipe.unet.attn_processors.items()} == before
    assert not hasattr(pipe.unet, "_diffatlas_tap")
    assert "set_timesteps" not in vars(pipe.scheduler)  # our step-tracking wrapper is gone too


def test_nested_attach_shares_one_tap_and_restores_once():
    unet = build_tiny_unet("sd1")
    with attach(unet) as a:
        with attach(unet) as b:
            assert a is b
        assert isinstance(unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2").processor, HeadProcessor)
    assert not isinstance(unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2").processor, HeadProcessor)


def test_a_head_edit_on_a_block_site_is_a_clear_error():
    unet = build_tiny_unet("sd1")
    with pytest.raises(KeyError, match="block site"), intervene(unet, HeadEdit(site="mid_block.attentions.0", stage="heads", scale=0.0)):
        pass
    with pytest.raises(KeyError, match="Closest matches"), \
            intervene(unet, HeadEdit(site="mid_block.attentions.0.transformer_blocks.0.atn2", stage="heads", scale=0.0)):
        pass
