"""trace(): in-memory captures with einops shapes; block hooks read and edit Δ = output − input."""

from __future__ import annotations

import pytest
import torch

from activations.edits import Apply, Observe
from activations.hooks import intervene
from activations.models import build_tiny_pipeline
from activations.trace import trace

BLOCK = "mid_block.attentions.0"
HEAD = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sd1")


def generate(pipe, prompts, steps=4, seed=0, **kw):
    g = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, generator=g, output_type="latent", **kw).images


def test_trace_shapes_follow_the_einops_patterns(pipe):
    with trace(pipe, sites=[BLOCK, HEAD], timesteps="all") as tr:
        generate(pipe, ["a red cat", "a blue dog"], steps=4)
    assert tr[BLOCK].shape == (2, 4, 4, 4, 32)  # [image, step, i, j, channel]
    tokens = pipe.tokenizer.model_max_length
    assert tr.probs(HEAD).shape == (2, 4, 2, 8, 8, tokens)  # [image, step, head, i, j, token]
    assert tr.heads(HEAD).shape == (2, 4, 8, 8, 2, 8)  # [image, step, i, j, head, d]
    torch.testing.assert_close(tr.probs(HEAD).sum(-1), torch.ones(2, 4, 2, 8, 8), atol=1e-5, rtol=0)
    assert tr.steps == [0, 1, 2, 3] and tr.timesteps == [int(t) for t in pipe.scheduler.timesteps]


def test_block_delta_is_output_minus_input(pipe):
    seen = []
    module = pipe.unet.get_submodule(BLOCK)
    handle = module.register_forward_hook(lambda m, a, o: seen.append((o[0] - a[0]).detach()))
    try:
        with trace(pipe, sites=BLOCK, timesteps="all", branch="both") as tr:
            generate(pipe, ["a red cat"], steps=2)
    finally:
        handle.remove()
    # the batch is [uncond, cond]; the pipeline's own forward hook saw the same calls
    expect_cond = torch.stack([s[1] for s in seen]).permute(0, 2, 3, 1)  # step, i, j, c
    expect_uncond = torch.stack([s[0] for s in seen]).permute(0, 2, 3, 1)
    torch.testing.assert_close(tr.block(BLOCK, branch="cond")[0], expect_cond)
    torch.testing.assert_close(tr.block(BLOCK, branch="uncond")[0], expect_uncond)


def test_timestep_selection_every_window_and_list(pipe):
    with trace(pipe, sites=BLOCK, timesteps="every:2") as tr:
        generate(pipe, ["a cat"], steps=5)
    assert tr.steps == [0, 2, 4] and tr[BLOCK].shape[1] == 3
    with trace(pipe, sites=BLOCK, timesteps="late") as tr:
        generate(pipe, ["a cat"], steps=5)
    assert all(t < 200 for t in tr.timesteps) and tr.timesteps
    pipe.scheduler.set_timesteps(5)
    chosen = [int(pipe.scheduler.timesteps[1]), int(pipe.scheduler.timesteps[3])]
    with trace(pipe, sites=BLOCK, timesteps={"t": chosen}) as tr:
        generate(pipe, ["a cat"], steps=5)
    assert tr.timesteps == chosen and tr.steps == [1, 3]


def test_timestep_not_in_schedule_lists_the_schedule(pipe):
    with pytest.raises(ValueError, match="not in the schedule; valid timesteps"), trace(pipe, sites=BLOCK, timesteps={"t": [3]}):
        generate(pipe, ["a cat"], steps=3)


def test_several_calls_add_images_and_tracing_changes_nothing(pipe):
    plain = torch.cat([generate(pipe, ["a cat"], seed=0), generate(pipe, ["a dog"], seed=1)])
    with trace(pipe, sites=[BLOCK, HEAD]) as tr:
        traced = torch.cat([generate(pipe, ["a cat"], seed=0), generate(pipe, ["a dog"], seed=1)])
    assert tr[BLOCK].shape[0] == 2 and tr.probs(HEAD).shape[0] == 2
    torch.testing.assert_close(traced, plain, atol=1e-4, rtol=1e-5)  # the explicit path rounds differently


def test_trace_on_sdxl_with_added_conditions():
    pipe = build_tiny_pipeline("sdxl")
    site = "mid_block.attentions.0.transformer_blocks.1.attn2"
    with trace(pipe, sites=["down_blocks.2.attentions.0", site], timesteps="every:2") as tr:
        generate(pipe, ["a red cat"], steps=3)
    assert tr["down_blocks.2.attentions.0"].shape == (1, 2, 2, 2, 32)
    assert tr.probs(site).shape[:5] == (1, 2, 4, 2, 2)


def test_unknown_site_in_trace_suggests_the_closest(pipe):
    with pytest.raises(KeyError, match="Closest matches: mid_block.attentions.0"), trace(pipe, sites="mid_block.attention.0"):
        pass


def test_a_block_apply_sets_output_to_input_plus_fn_of_delta(pipe):
    unet = pipe.unet
    torch.manual_seed(0)
    sample, ehs = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        ref = unet(sample, 500, ehs).sample
        with intervene(unet, Apply(site=BLOCK, stage="block", fn=lambda d: d)):
            same = unet(sample, 500, ehs).sample
        seen = []
        with intervene(unet, Observe(site=BLOCK, stage="block", fn=lambda call: seen.append(call.delta.clone())),
                       Apply(site=BLOCK, stage="block", fn=lambda d: 0 * d)):
            zeroed = unet(sample, 500, ehs).sample
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(zeroed, ref, atol=1e-3)
    assert seen[0].abs().max() == 0  # observers see the edited Δ
    assert seen[0].shape == (1, 16, 32)


def test_a_block_apply_on_one_branch_only(pipe):
    with trace(pipe, sites=BLOCK, branch="both") as tr, intervene(pipe, Apply(site=BLOCK, stage="block", fn=lambda d: 0 * d, branch="uncond")):
        generate(pipe, ["a cat"], steps=2)
    assert tr.block(BLOCK, branch="uncond").abs().max() == 0
    assert tr.block(BLOCK, branch="cond").abs().max() > 0
