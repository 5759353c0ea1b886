"""Complete tiny SD3 and FLUX pipelines through the clients: prompt encoding, sites of a pipeline
call, trace against the joint softmax written out, harvest rows against trace, edits restored after
an exception, branches per family, image sizes and the flow-matching gates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from activations.config import HarvestConfig, PromptSource
from activations.edits import HeadEdit
from activations.generate import sample, schedule
from activations.harvest import harvest
from activations.hooks import intervene
from activations.joint_processor import JointHeadProcessor
from activations.models import build_tiny_pipeline
from activations.sites import latent_size, list_sites
from activations.store import ActivationStore
from activations.text import encode_prompts, semantic_mask, text_layout, text_length, word_positions
from activations.timesteps import WINDOWS, select_steps
from activations.trace import trace
from common.errors import UsageError

from mmdit_helpers import by_hand, capture_inputs

PROMPTS, SEEDS = ["a red cat", "a blue dog on the left"], [0, 1]
# a double-stream (SD3: every) block, its text stream and heads; FLUX: a single-stream block's heads too
SITES = {"sd3": ["transformer_blocks.1", "transformer_blocks.1.context", "transformer_blocks.1.attn"],
         "flux": ["transformer_blocks.0", "transformer_blocks.0.context", "single_transformer_blocks.1.attn"]}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def mmdit_pipe(request):
    return request.param, build_tiny_pipeline(request.param)


def test_encoded_prompts_are_the_text_stream_the_sites_declare(mmdit_pipe):
    family, pipe = mmdit_pipe
    emb = encode_prompts(pipe, PROMPTS)
    # SD3: 16 CLIP tokens then 256 T5 tokens; FLUX: 512 T5 tokens (the pipelines' defaults)
    assert emb.shape == (2, {"sd3": 16 + 256, "flux": 512}[family], pipe.transformer.config.joint_attention_dim)
    assert text_length(pipe) == emb.shape[1]
    context = {s.name: s for s in list_sites(pipe)}[SITES[family][1]]
    assert context.resolution == (1, emb.shape[1]) and context.width == pipe.transformer.inner_dim
    assert latent_size(pipe) == (8, 8) and {s.resolution for s in list_sites(pipe) if s.kind == "head"} == {(4, 4)}


def test_an_image_size_the_patches_cannot_tile_is_refused_naming_the_multiple(mmdit_pipe):
    _, pipe = mmdit_pipe
    assert latent_size(pipe, 24, 32) == (12, 16)
    with pytest.raises(UsageError, match="height must be a positive multiple of 4 pixels"):
        latent_size(pipe, 18, 16)


def test_traced_maps_are_the_image_by_text_slice_of_the_joint_softmax(mmdit_pipe):
    family, pipe = mmdit_pipe
    site = SITES[family][2]
    attn = pipe.transformer.get_submodule(site)
    calls = []
    grabbed, handle = capture_inputs(attn)
    hook = attn.register_forward_hook(lambda *_: calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in grabbed.items()}))
    try:
        with trace(pipe, sites=[site], timesteps="all", branch="cond") as tr:
            sample(pipe, PROMPTS, SEEDS, steps=2, guidance=4.0, output_type="latent")
    finally:
        handle.remove(), hook.remove()
    probs = tr.probs(site)  # [image, step, head, i, j, token]
    text = text_length(pipe)
    assert probs.shape == (2, 2, attn.heads, 4, 4, text)
    for step, seen in enumerate(calls):
        q, k, _, txt, img = by_hand(attn, seen["x"], seen["ctx"], seen["rope"], family == "flux", text)
        full = (q[:, :, img] @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)[..., txt]
        cond = full[-2:]  # SD3 batches [uncond; cond]; FLUX has cond rows only
        torch.testing.assert_close(probs[:, step].flatten(2, 3), cond, atol=1e-5, rtol=1e-5)
        assert (cond.sum(-1) < 1).all()  # normalised over text and image keys together


def harvest_config(out, family, **kw) -> HarvestConfig:
    return HarvestConfig(**{**dict(model=f"tiny-{family}", out=str(out), sites=SITES[family], prompts=PromptSource(kind="list", texts=PROMPTS),
                                   num_inference_steps=2, guidance_scale=4.0, timesteps="all", branch="cond", positions=None,
                                   batch_size=2, images_per_shard=2, progress=False, save_images=False), **kw})


def test_harvested_rows_equal_the_traced_values(tmp_path, mmdit_pipe):
    family, pipe = mmdit_pipe
    harvest(harvest_config(tmp_path / "h", family), pipe=pipe)
    with trace(pipe, sites=SITES[family], timesteps="all") as tr:
        sample(pipe, PROMPTS, SEEDS, steps=2, guidance=4.0, output_type="latent")
    store = ActivationStore(tmp_path / "h", verify=True)
    block, context, head = SITES[family]
    assert store.site(context).grid == (1, text_length(pipe)) and store.site(head).grid == (4, 4)
    for image in range(2):
        for step in range(2):
            for name, traced in ((block, tr.block(block)), (context, tr.block(context)), (head, tr.heads(head).flatten(-2))):
                got = store.site(name).feature_map(image=image, step=step).float()
                torch.testing.assert_close(got, traced[image, step].float(), atol=2e-3, rtol=1e-2)
    meta = store.site(head).read(np.arange(store.site(head).num_rows))[1]
    # the harvester's schedule is the one the pipeline ran (FLUX's pipeline passes its own sigmas and shift)
    assert sorted(set(meta["t"].tolist()), reverse=True) == tr.timesteps == schedule(pipe, 2)
    assert store.site(head).manifest["timesteps"] == tr.timesteps


def test_an_edit_is_undone_after_an_exception_and_the_pipeline_draws_as_before(mmdit_pipe):
    family, pipe = mmdit_pipe
    plain = sample(pipe, PROMPTS, SEEDS, steps=2, guidance=4.0, output_type="latent").images
    edit = HeadEdit(site=SITES[family][2], heads=[0], scale=0.0)
    with intervene(pipe, edit):
        edited = sample(pipe, PROMPTS, SEEDS, steps=2, guidance=4.0, output_type="latent").images
    assert (edited - plain).abs().max() > 1e-4
    with pytest.raises(KeyboardInterrupt):
        with intervene(pipe, edit):
            raise KeyboardInterrupt
    assert not any(isinstance(m.processor, JointHeadProcessor) for n, m in pipe.transformer.named_modules() if n.endswith(".attn"))
    assert torch.equal(sample(pipe, PROMPTS, SEEDS, steps=2, guidance=4.0, output_type="latent").images, plain)


def test_branches_mean_what_each_family_batches(tmp_path, mmdit_pipe):
    family, pipe = mmdit_pipe
    if family == "sd3":  # [uncond; cond] like the U-Nets: both branches are stored
        harvest(harvest_config(tmp_path / "b", family, branch="both", sites=[SITES[family][0]]), pipe=pipe)
        meta = ActivationStore(tmp_path / "b").site(SITES[family][0]).read(np.arange(2 * 2 * 2 * 16))[1]
        assert sorted(set(meta["branch"].tolist())) == [0, 1]
        return
    # FLUX.1 is guidance-distilled: no uncond rows exist, and "both" would store the cond rows twice
    for branch in ("uncond", "both"):
        with pytest.raises(UsageError, match="valid branches: cond"):
            harvest(harvest_config(tmp_path / branch, family, branch=branch), pipe=pipe)
        assert not (tmp_path / branch).exists()
    with pytest.raises(UsageError, match="branch 'uncond' does not exist for flux"):
        with trace(pipe, sites=SITES[family][:1], branch="uncond"):
            pass
    with pytest.raises(UsageError, match="HeadEdit at .*valid branches: cond, both"):
        with intervene(pipe, HeadEdit(site=SITES[family][2], heads=[0], scale=0.0, branch="uncond")):
            pass


def test_windows_gate_flow_matching_steps_by_sigma(mmdit_pipe):
    _, pipe = mmdit_pipe
    sample(pipe, PROMPTS[:1], SEEDS[:1], steps=10, guidance=4.0, output_type="latent")
    sigmas = pipe.scheduler.sigmas[:-1].tolist()  # the pipeline's own, as it just ran
    timesteps = schedule(pipe, 10)
    assert timesteps == [int(t) for t in pipe.scheduler.timesteps]
    for window, (lo, hi) in WINDOWS.items():
        chosen = select_steps(window, timesteps, pipe.scheduler.config.num_train_timesteps)
        # tau = t / 1000 is the step's sigma, to the 0.001 that integer timesteps keep
        expected = [k for k, sigma in enumerate(sigmas) if lo - 1e-3 <= sigma < hi or (hi == 1.0 and sigma == 1.0)]
        assert chosen == expected and chosen, (window, sigmas)


def test_a_token_index_is_checked_against_the_joint_text_length(mmdit_pipe):
    family, pipe = mmdit_pipe
    last = text_length(pipe) - 1  # SD3: past the 16 CLIP tokens, inside the T5 ones; FLUX: T5 only
    with intervene(pipe, HeadEdit(site=SITES[family][2], stage="probs", tokens=[last], scale=0.0)):
        pass
    with pytest.raises(UsageError, match=f"HeadEdit at {SITES[family][2]}: .*token"):
        with intervene(pipe, HeadEdit(site=SITES[family][2], stage="probs", tokens=[last + 1], scale=0.0)):
            pass


def test_harvest_cli_on_a_saved_mmdit_folder(tmp_path, mmdit_pipe):
    from harvest_helpers import run_cli, write_yaml

    family, pipe = mmdit_pipe
    pipe.save_pretrained(tmp_path / "model")
    cfg = write_yaml(tmp_path / "h.yaml", {"model": str(tmp_path / "model"), "out": str(tmp_path / "store"),
                                          "sites": SITES[family], "prompts": {"kind": "list", "texts": PROMPTS},
                                          "num_inference_steps": 2, "guidance_scale": 4.0, "timesteps": "all",
                                          "height": 16, "width": 16, "batch_size": 2, "images_per_shard": 2})
    done = run_cli(["harvest", str(cfg)])
    assert done.returncode == 0, done.stdout + done.stderr
    store = ActivationStore(tmp_path / "store", verify=True)
    assert sorted(store.sites) == sorted(SITES[family]) and store.site(SITES[family][2]).grid == (4, 4)
    sites = run_cli(["sites", str(tmp_path / "model")])
    assert sites.returncode == 0 and f"{SITES[family][1]} " in sites.stdout


def test_the_text_layout_says_whose_tokens_sit_where(mmdit_pipe):
    family, pipe = mmdit_pipe
    layout = text_layout(pipe)
    tok = [getattr(pipe, name) for name in {"sd3": ["tokenizer", "tokenizer_3"], "flux": ["tokenizer_2"]}[family]]
    assert [s.tokenizer for s in layout] == tok and [s.start for s in layout] == ([0, 16] if family == "sd3" else [0])
    # "red" is the 3rd token after the start token: once per segment that has a tokenizer
    assert word_positions(pipe, "a big red cat", "red") == ([3, 16 + 3] if family == "sd3" else [3])
    mask = semantic_mask(pipe, ["a big red cat"])
    assert mask.shape == (1, text_length(pipe)) and mask.sum() == 4 * len(layout)
    with pytest.raises(UsageError, match="token 'dog' is not in the prompt 'a big red cat'"):
        word_positions(pipe, "a big red cat", "dog")
