"""The Intervention protocol: open to new kinds, one call context at block and head sites,
observers before and after edits, gates, branches and masks, composition, YAML round trips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from activations.edits import Ablate, AddVector, HeadEdit, Observe, Scale
from activations.hooks import attach, intervene
from activations.intervention import Intervention, load_interventions, register_intervention, save_interventions
from activations.masks import Box, MaskImage, Patches, Quadrant, parse_mask
from activations.models import build_tiny_pipeline
from activations.timesteps import All, Every, Steps, Timesteps, Window, parse_when

BLOCK = "mid_block.attentions.0"
HEAD = "mid_block.attentions.0.transformer_blocks.0.attn2"


# a kind defined outside the package: one class, nothing else touched
@register_intervention("test_negate")
@dataclasses.dataclass(kw_only=True, eq=False)
class Negate(Intervention):
    stage: str = "block"

    def apply(self, x, call):
        return -x


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sd1")


def run(pipe, *interventions, steps=3, guidance=2.0):
    gen = torch.Generator().manual_seed(0)
    with intervene(pipe, *interventions):
        return pipe(["a red cat"], num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="latent").images


def test_a_kind_defined_outside_the_package_runs_and_round_trips(pipe, tmp_path):
    seen = []
    before = Observe(site=BLOCK, fn=lambda call: seen.append(("before", call.delta.clone())), sees="before")
    after = Observe(site=BLOCK, fn=lambda call: seen.append(("after", call.delta.clone())))
    run(pipe, Negate(site=BLOCK, when={"steps": [0]}), before, after)
    (_, d_before), (_, d_after) = seen[0], seen[1]
    torch.testing.assert_close(d_after, -d_before)  # one pass gives "before" and "after"
    assert [kind for kind, _ in seen[2:]] == ["before", "after"] * (len(seen[2:]) // 2)
    torch.testing.assert_close(seen[3][1], seen[2][1])  # the gate closed after step 0
    path = save_interventions(tmp_path / "r.yaml", [Negate(site=BLOCK, when="early", branch="cond", mask={"quadrant": "top left"})])
    (back,) = load_interventions(path)
    assert isinstance(back, Negate) and back.when == Window("early") and back.branch.name == "cond"
    assert back.mask == Quadrant("top left")


def test_block_and_head_interventions_get_the_same_call_context(pipe):
    calls = {}

    def keep(call):
        calls.setdefault(call.stage, []).append((call.step, call.t, call.tau, call.grid, call.rows("cond").tolist(), call.images.tolist()))

    run(pipe, Observe(site=BLOCK, fn=keep), Observe(site=HEAD, stage="heads", fn=keep))
    assert calls["block"] == calls["heads"]
    step, t, tau, grid, cond_rows, images = calls["block"][0]
    assert step == 0 and tau == t / 1000 and grid == (4, 4)
    assert cond_rows == [1] and images == [0, 0]


def test_head_stages_see_their_layouts(pipe):
    shapes = {}
    for stage in ("q", "k", "v", "probs", "heads", "attn_out"):
        run(pipe, Observe(site=HEAD, stage=stage, fn=lambda x, call: shapes.setdefault(call.stage, tuple(x.shape))), steps=1)
    b, heads, n = 2, 2, 16
    assert shapes["q"][:3] == (b, heads, n) and shapes["probs"][:3] == (b, heads, n)
    assert shapes["k"][:2] == (b, heads) and shapes["heads"][:3] == (b, heads, n)
    assert shapes["attn_out"][:2] == (b, n)


def test_block_edit_gated_by_window_branch_and_mask(pipe):
    seen = []
    mask = Patches([0, 5], grid=(4, 4))
    edit = Ablate(site=BLOCK, when={"tau": [0.0, 1.0]}, branch="cond", mask=mask)
    run(pipe, edit, Observe(site=BLOCK, fn=lambda call: seen.append(call.delta.clone())), steps=1)
    delta = seen[0]  # [uncond; cond] x 16 patches
    others = [p for p in range(16) if p not in (0, 5)]
    assert delta[1, [0, 5]].abs().max() == 0  # cond rows, masked patches: ablated
    assert delta[1, others].abs().amax(-1).min() > 0  # other patches untouched
    assert delta[0].abs().amax(-1).min() > 0  # uncond untouched


def test_interventions_compose_in_the_order_given(pipe):
    seen = []
    obs = Observe(site=BLOCK, fn=lambda call: seen.append(call.delta.clone()), sees="before")
    after = Observe(site=BLOCK, fn=lambda call: seen.append(call.delta.clone()))
    run(pipe, Scale(site=BLOCK, factor=2.0), AddVector(site=BLOCK, stage="block", vector=torch.ones(32)), obs, after, steps=1)
    torch.testing.assert_close(seen[1], 2 * seen[0] + 1)
    seen.clear()
    run(pipe, AddVector(site=BLOCK, stage="block", vector=torch.ones(32)), Scale(site=BLOCK, factor=2.0), obs, after, steps=1)
    torch.testing.assert_close(seen[1], 2 * (seen[0] + 1))


def test_probs_edit_scales_chosen_heads_and_tokens_only(pipe):
    seen = []
    edit = HeadEdit(site=HEAD, heads=[1], tokens=[2, 3], scale=-2.0)
    obs = Observe(site=HEAD, stage="probs", fn=lambda x, call: seen.append(x.clone()), sees="before")
    after = Observe(site=HEAD, stage="probs", fn=lambda x, call: seen.append(x.clone()))
    run(pipe, edit, obs, after, steps=1)
    before, got = seen
    expect = before.clone()
    expect[:, 1, :, 2:4] *= -2.0
    torch.testing.assert_close(got, expect)


def test_idle_tap_output_equals_no_tap(pipe):
    ref = run(pipe)
    with attach(pipe.unet, pipe):
        gen = torch.Generator().manual_seed(0)
        idle = pipe(["a red cat"], num_inference_steps=3, guidance_scale=2.0, generator=gen, output_type="latent").images
    assert torch.equal(idle, ref)


def test_a_recipe_file_reproduces_the_python_interventions(pipe, tmp_path):
    ivs = [
        HeadEdit(site=HEAD, heads=[0], tokens=[1], scale=-2.0, when="early"),
        Scale(site=BLOCK, factor=0.5, when={"steps": [1, 2]}, branch="cond", mask=Box(0, 0, 0.5, 1.0)),
        AddVector(site=BLOCK, stage="block", vector=torch.linspace(-1, 1, 32), scale=0.3, when={"tau": [0.2, 0.9]}),
    ]
    path = save_interventions(tmp_path / "recipe.yaml", ivs)
    assert torch.equal(run(pipe, *load_interventions(path)), run(pipe, *ivs))
    assert not torch.equal(run(pipe, *ivs), run(pipe))


def test_bad_interventions_name_the_problem():
    with pytest.raises(ValueError, match="valid stages: q, k, v, probs, heads, attn_out, block"):
        Scale(site=BLOCK, stage="output")
    with pytest.raises(ValueError, match="valid kinds: .*head_edit"):
        load_interventions([{"kind": "head_edits", "site": HEAD}])
    with pytest.raises(ValueError, match="valid fields"):
        load_interventions([{"kind": "scale", "site": BLOCK, "factr": 2}])
    with pytest.raises(ValueError, match="cannot be written to a recipe"):
        Observe(site=BLOCK, fn=print).to_dict()
    with pytest.raises(ValueError, match="no patches"):
        Scale(site=HEAD, stage="k", mask=[0])


def test_a_head_stage_on_a_block_site_is_a_clear_error(pipe):
    with pytest.raises(KeyError, match="is a block site"), intervene(pipe, Scale(site=BLOCK, stage="heads")):
        pass
    with pytest.raises(KeyError, match="is a head site"), intervene(pipe, Scale(site=HEAD, stage="block")):
        pass


# -- gates ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, gate", [
    (None, All()), ("all", All()), ("early", Window("early")), ({"tau": [0.6, 1.0]}, Window.tau(0.6, 1.0)),
    ({"steps": [0, 1, 2]}, Steps([0, 1, 2])), ({"every": 2}, Every(2)), ("every:2", Every(2)), ({"t": [999]}, Timesteps([999])),
])
def test_each_gate_has_one_spelling(spec, gate):
    assert parse_when(spec) == gate
    assert parse_when(gate.to_spec()) == gate


@pytest.mark.parametrize("spec", [(0, 1), [0.6, 1.0], (0.6, 1.0), "earliest", {"tau": [0.8, 0.2]}, {"tau": [0.5, 1.5]},
                                  {"steps": [0.5]}, {"window": "early", "steps": [1]}, 3])
def test_other_gate_forms_are_refused_listing_the_accepted_ones(spec):
    with pytest.raises(ValueError, match=r"early|tau|steps"):
        parse_when(spec)


def test_window_bounds_and_inclusive_top():
    assert Window("early").contains(None, 1000, 1000) and not Window("middle").contains(None, 600, 1000)
    assert Window("middle").contains(None, 200, 1000) and not Window("late").contains(None, 200, 1000)
    assert Steps([2]).select([999, 800, 600, 400], 1000) == [2]
    with pytest.raises(ValueError, match="out of range"):
        Steps([7]).select([999, 800], 1000)


@pytest.mark.parametrize("num_train_timesteps", [1000, 999, 1100])
def test_a_stored_float32_tau_falls_in_the_window_of_its_t(num_train_timesteps):
    # rows on disk carry tau as float32; the one rule on tau must put each in its t's window
    t = np.arange(num_train_timesteps + 1)
    tau32 = torch.from_numpy((t / num_train_timesteps).astype(np.float32))
    for name in ("early", "middle", "late"):
        by_t = Window(name).mask(t, t, num_train_timesteps)
        assert np.array_equal(Window(name).holds(tau32).numpy(), by_t)
        assert np.array_equal(Window(name).holds(tau32.numpy()), by_t)
    assert Window("early").holds(1.0) and not Window("middle").holds(0.6) and Window("late").holds(0.0)


# -- masks ---------------------------------------------------------------------------------------

def test_region_masks_mean_the_same_place_on_every_grid():
    for h in (2, 4, 8):
        m = Quadrant("top right").on_grid(h, h).reshape(h, h)
        assert m[: h // 2, h // 2 :].all() and m.sum() == h * h // 4
    image = torch.zeros(64, 64)
    image[:32, :32] = 1
    assert torch.equal(MaskImage(image).on_grid(4, 4), Quadrant("top left").on_grid(4, 4))
    assert torch.equal(parse_mask({"box": [0, 0, 0.5, 0.5]}).on_grid(8, 8), Quadrant("top left").on_grid(8, 8))


def test_patch_masks_refuse_another_grid_or_range():
    with pytest.raises(ValueError, match="4x4 grid applied at a 8x8"):
        Patches([0], grid=(4, 4)).on_grid(8, 8)
    with pytest.raises(ValueError, match="out of range for a 2x2"):
        Patches([5]).on_grid(2, 2)
    with pytest.raises(ValueError, match="valid quadrants"):
        Quadrant("upper left")
    with pytest.raises(ValueError, match="valid: "):
        parse_mask({"circle": 3})
