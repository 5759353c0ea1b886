"""``intervene`` / ``attach`` on MMDiT transformers (tiny SD3 and FLUX): the same Tap as for a
U-Net, with the joint-attention processor at head sites, block deltas of the image and text
streams, and the step state in the scheduler's units."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from activations.edits import Apply, HeadEdit, Observe
from activations.hooks import attach, intervene
from activations.joint_processor import JointHeadProcessor, install_joint_processors
from activations.models import build_tiny_transformer
from common.errors import UsageError
from mmdit_helpers import forward

# SD3: a middle block; FLUX: a double-stream block and a single-stream block
BLOCKS = {"sd3": ["transformer_blocks.1"], "flux": ["transformer_blocks.1", "single_transformer_blocks.0"]}
EDIT = dict(site="transformer_blocks.0.attn", stage="probs", heads=[0], tokens=[1], scale=0.0)


def test_intervene_idle_equals_plain_forward_and_restores_diffusers_processors(mmdit):
    family, model, ref = mmdit
    originals = {name: type(m.processor) for name, m in model.named_modules() if name.endswith(".attn")}
    with intervene(model):
        assert all(isinstance(model.get_submodule(s).processor, JointHeadProcessor) for s in originals)
        out = forward(model, family)
    assert (out - ref).abs().max() <= 1e-5
    assert {name: type(model.get_submodule(name).processor) for name in originals} == originals
    assert torch.equal(forward(model, family), ref)


def test_probs_head_edit_through_intervene_equals_the_processor_edit_by_hand(mmdit):
    family, model, ref = mmdit
    with intervene(model, HeadEdit(**EDIT)):
        edited = forward(model, family)
    with install_joint_processors(model) as installed:
        installed.processors[EDIT["site"]].interventions.append(HeadEdit(**EDIT))
        by_hand = forward(model, family)
    assert (edited - ref).abs().max() > 1e-4  # the edit does something
    assert (edited - by_hand).abs().max() <= 1e-6


def block_io(module):
    seen = {}

    def hook(mod, args, kwargs, output):
        seen.update(x=kwargs["hidden_states"], ctx=kwargs["encoder_hidden_states"], out_ctx=output[0], out=output[1])

    return seen, module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_block_observers_see_image_and_text_residual_updates_on_their_grids(family):
    model = build_tiny_transformer(family)
    for block in BLOCKS[family]:
        got = {}
        observers = [Observe(site=block, stage="block", fn=lambda x, c: got.update(img=(x.clone(), c.grid))),
                     Observe(site=f"{block}.context", stage="block", fn=lambda x, c: got.update(txt=(x.clone(), c.grid)))]
        with intervene(model, *observers):
            seen, handle = block_io(model.get_submodule(block))  # registered after the Tap's hooks: sees the output they leave
            forward(model, family)
            handle.remove()
        assert torch.equal(got["img"][0], seen["out"] - seen["x"]) and got["img"][1] == (4, 4), block
        assert torch.equal(got["txt"][0], seen["out_ctx"] - seen["ctx"]) and got["txt"][1] == (1, 5), block


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_block_edit_replaces_the_stream_update_and_leaves_the_other_stream(family):
    model = build_tiny_transformer(family)
    ref = forward(model, family)
    for block in BLOCKS[family]:
        plain, handle = block_io(model.get_submodule(block))
        forward(model, family)
        with intervene(model, Apply(site=block, stage="block", fn=lambda x, c: torch.zeros_like(x))):
            handle.remove()
            seen, handle = block_io(model.get_submodule(block))
            out = forward(model, family)
        handle.remove()
        assert torch.equal(seen["out"], seen["x"]), block  # the image update removed
        assert torch.equal(seen["out_ctx"], plain["out_ctx"]), block  # the text stream as computed
        assert (out - ref).abs().max() > 1e-4
    assert torch.equal(forward(model, family), ref)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_step_state_records_t_in_scheduler_units_and_windows_gate_on_it(family):
    """SD3's pipeline passes t, FLUX's t / 1000: both read t = 700 (tau 0.7) for the same step."""
    model = build_tiny_transformer(family)
    calls = []
    with intervene(model, Observe(site="transformer_blocks.0.attn", stage="heads", fn=lambda x, c: calls.append((c.step, c.t, c.tau))),
                   Observe(site="transformer_blocks.0", stage="block", when={"tau": [0.0, 0.5]}, fn=lambda x, c: calls.append("late"))) as tap:
        forward(model, family)
        forward(model, family)
        assert tap.state.latent == (8, 8)
    assert calls == [(0, 700, 0.7), (1, 700, 0.7)]


@pytest.mark.parametrize("family, cfg", [("sd3", True), ("flux", False)])
def test_guidance_layout_follows_the_family(family, cfg):
    """SD3 batches [uncond; cond] when its pipeline guides; FLUX.1 (guidance-distilled) never does."""
    model = build_tiny_transformer(family)
    pipe = SimpleNamespace(do_classifier_free_guidance=True)
    rows = []
    with attach(model, pipe) as tap, tap.add(Observe(site="transformer_blocks.0.attn", stage="q", fn=lambda x, c: rows.append(c.codes.tolist()))):
        forward(model, family)
    assert tap.state.cfg is cfg
    assert rows == [[0, 1] if cfg else [1, 1]]


def test_flux_two_calls_at_one_timestep_true_cfg_is_refused():
    model = build_tiny_transformer("flux")
    with intervene(SimpleNamespace(transformer=model)):
        forward(model, "flux")
        with pytest.raises(UsageError, match="true CFG"):
            forward(model, "flux")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_bad_head_or_site_on_a_transformer_is_a_usage_error_naming_it(family):
    model = build_tiny_transformer(family)
    with pytest.raises(UsageError, match="head"):
        with intervene(model, HeadEdit(**{**EDIT, "heads": [5]})):
            pass
    with pytest.raises(UsageError, match="transformer_blocks.9.attn"):
        with intervene(model, HeadEdit(**{**EDIT, "site": "transformer_blocks.9.attn"})):
            pass
    assert all(not isinstance(m.processor, JointHeadProcessor) for n, m in model.named_modules() if n.endswith(".attn"))
