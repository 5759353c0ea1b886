"""``evaluate`` on tiny SD3 and FLUX pipelines (flow matching) and on the U-Nets (DDPM): the loss
against one written out with the denoiser called by hand, ablations through ``intervene``, one
conditional call per batch, timestep and set, and one-line refusals of bad input."""

from __future__ import annotations

import pytest
import torch

from activations.edits import Ablate
from activations.evaluate import evaluate
from activations.families import architecture_of
from activations.models import build_tiny_pipeline
from activations.text import encode_prompts
from common.errors import UsageError

PROMPTS = ["a red cat", "a blue dog"]
TIMESTEPS = [900, 500, 100]
GUIDANCE = 3.5
BLOCK = {"sd3": "transformer_blocks.1", "flux": "transformer_blocks.1"}


def pixels(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(params=["sd3", "flux"])
def mmdit(request):
    return request.param, build_tiny_pipeline(request.param)


def flow_matching_by_hand(family, pipe, images, prompts, timesteps, seed=0, grad=False) -> torch.Tensor:
    """The flow-matching loss written out: the VAE's shifted and scaled latent mean, sigma = t / 1000,
    x_t = (1 - sigma) x0 + sigma noise, target noise - x0, and the transformer called as the
    family's pipeline calls it (FLUX: packed 2 x 2 latent cells, (0, row, col) ids, t / 1000,
    the guidance scale embedded)."""
    vae, model = pipe.vae, pipe.transformer
    with torch.no_grad():
        x0 = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        if family == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=pipe.device,
                                                   do_classifier_free_guidance=False)
        else:
            emb, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe.device)
    b, c, h, w = x0.shape
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=gen)
        sigma = t / 1000
        x_t, target = (1 - sigma) * x0 + sigma * noise, noise - x0
        with torch.set_grad_enabled(grad):
            if family == "sd3":
                pred = model(hidden_states=x_t, timestep=torch.full((b,), float(t)), encoder_hidden_states=emb,
                             pooled_projections=pooled).sample
            else:
                def pack(z):
                    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)

                rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
                img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
                pred = model(hidden_states=pack(x_t), timestep=torch.full((b,), t / 1000), guidance=torch.full((b,), GUIDANCE),
                             pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=text_ids, img_ids=img_ids).sample
                target = pack(target)  # the mean over elements does not depend on the layout
        losses.append((pred - target).pow(2).mean())
    return torch.stack(losses).mean()


def test_the_loss_is_flow_matching_with_the_transformer_called_as_the_pipeline_does(mmdit):
    family, pipe = mmdit
    pipe.vae.register_to_config(shift_factor=0.25, scaling_factor=0.5)  # both enter the latent
    images = pixels()
    got = evaluate(pipe, [], images=images, prompts=PROMPTS, timesteps=TIMESTEPS, guidance=GUIDANCE)["edited"]
    assert architecture_of(pipe).objective.__name__ == "flow_matching_objective"
    assert got == pytest.approx(float(flow_matching_by_hand(family, pipe, images, PROMPTS, TIMESTEPS)), rel=1e-5)


def test_the_guidance_scale_reaches_flux_and_nothing_else(mmdit):
    family, pipe = mmdit
    low, high = (evaluate(pipe, [], images=pixels(), prompts=PROMPTS, timesteps=[500], guidance=g)["edited"] for g in (1.0, 8.0))
    assert (low != pytest.approx(high, rel=1e-6)) == (family == "flux")


def test_an_ablated_block_raises_the_loss_of_a_denoiser_that_learned_the_images(mmdit):
    family, pipe = mmdit
    images = pixels()
    model = pipe.transformer.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(60):  # a few steps on these images and timesteps: the blocks now carry what lowers the loss
        opt.zero_grad()
        flow_matching_by_hand(family, pipe, images, PROMPTS, TIMESTEPS, seed=step % 3, grad=True).backward()
        opt.step()
    model.eval().requires_grad_(False)
    sets = {"clean": [], "zero": [Ablate(site=BLOCK[family])], "text": [Ablate(site=BLOCK[family] + ".context")]}
    losses = evaluate(pipe, sets, images=images, prompts=PROMPTS, timesteps=TIMESTEPS, seed=1, guidance=GUIDANCE)
    assert losses["zero"] > 1.1 * losses["clean"], losses
    # random pixels owe little to their prompts: the text stream's ablation counts, in either direction
    assert losses["text"] != pytest.approx(losses["clean"], rel=1e-4), losses


def test_one_conditional_call_per_batch_timestep_and_set(mmdit):
    family, pipe = mmdit
    rows = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        evaluate(pipe, {"clean": [], "zero": [Ablate(site=BLOCK[family])]}, images=pixels(3), prompts=PROMPTS + ["a cat"],
                 timesteps=[800, 200], batch_size=2)
    finally:
        handle.remove()
    # batches of 2 and 1 images, 2 timesteps, 2 sets; no uncond half (FLUX.1 has none; SD3 is scored on its cond rows)
    assert rows == [2] * 4 + [1] * 4


def test_flux_refuses_an_uncond_intervention_in_one_line():
    pipe = build_tiny_pipeline("flux")
    with pytest.raises(UsageError, match="branch 'uncond' does not exist for flux.*valid branches: cond, both"):
        evaluate(pipe, [Ablate(site=BLOCK["flux"], branch="uncond")], images=pixels(), prompts=PROMPTS, timesteps=[500])


@pytest.mark.parametrize("kwargs, message", [
    (dict(timesteps=[]), "at least one timestep, got none"),
    (dict(timesteps=[1001]), "timestep 1001 is out of range; valid timesteps: 0 to 1000"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(prompts=["one"]), "one prompt per image, got 1 for 2"),
])
def test_bad_input_is_one_line_naming_the_value(kwargs, message):
    pipe = build_tiny_pipeline("sd3")
    with pytest.raises(UsageError, match=message) as err:
        evaluate(pipe, [], **{**dict(images=pixels(), prompts=PROMPTS), **kwargs})
    assert "\n" not in str(err.value)


def test_full_conditioning_is_the_pipelines_tuple_joined_over_batches(mmdit):
    family, pipe = mmdit
    prompts = PROMPTS + ["a cat"]
    whole = encode_prompts(pipe, prompts, full=True)
    parts = encode_prompts(pipe, prompts, batch_size=2, full=True)
    assert len(whole) == len(parts) == {"sd3": 4, "flux": 3}[family]
    for a, b in zip(whole, parts):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)
    torch.testing.assert_close(encode_prompts(pipe, prompts), whole[0])  # the plain call is unchanged


# -- U-Nets: DDPM as before, and SDXL's added conditioning ------------------------------------


def test_unet_timesteps_stop_below_the_training_steps():
    with pytest.raises(UsageError, match="timestep 1000 is out of range; valid timesteps: 0 to 999"):
        evaluate(build_tiny_pipeline("sd1"), [], images=pixels(2, 32), prompts=PROMPTS, timesteps=[1000])


def test_unet_loss_is_ddpm_epsilon_as_before():
    from diffusers import DDPMScheduler

    pipe = build_tiny_pipeline("sd1")
    images = pixels(2, 32)
    got = evaluate(pipe, [], images=images, prompts=PROMPTS, timesteps=[800, 200])["edited"]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        x0 = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        emb = pipe.encode_prompt(PROMPTS, pipe.device, 1, False)[0]
        gen, losses = torch.Generator().manual_seed(0), []
        for t in (800, 200):
            noise = torch.randn(x0.shape, generator=gen)
            tt = torch.full((2,), t, dtype=torch.long)
            pred = pipe.unet(sched.add_noise(x0, noise, tt), tt, encoder_hidden_states=emb).sample
            losses.append(float((pred - noise).pow(2).mean()))
    assert got == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_sdxl_is_scored_with_its_pooled_text_and_size_ids():
    pipe = build_tiny_pipeline("sdxl")
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("added_cond_kwargs")), with_kwargs=True)
    try:
        losses = evaluate(pipe, {"clean": [], "zero": [Ablate(site="mid_block.attentions.0")]}, images=pixels(2, 32),
                          prompts=PROMPTS, timesteps=[500])
    finally:
        handle.remove()
    assert torch.isfinite(torch.tensor(list(losses.values()))).all() and losses["zero"] != losses["clean"]
    assert seen[0]["text_embeds"].shape[0] == 2 and seen[0]["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]
