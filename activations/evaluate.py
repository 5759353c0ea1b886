"""``evaluate``: the denoiser's training loss under any set of interventions.

    losses = evaluate(pipe, {"clean": [], "zero": [Ablate(site="mid_block.attentions.0")]},
                      store="runs/harvest-toy", images=[0, 1, 2], timesteps=[999, 500, 100])

For every named set of interventions the same images are noised with the same noise at the same
timesteps, and the loss L = E ||target − denoiser(x_t, t, text)||² is averaged over images and
timesteps. The noising and the target are the family's training objective
(``Architecture.objective``): the U-Nets' DDPM noising with the scheduler's prediction type
(epsilon, v_prediction, sample); SD3's and FLUX's flow matching (x_t = (1 − σ) x0 + σ ε with
σ = t / 1000, target ε − x0). The denoiser call is the family's (``Architecture.denoise``: SDXL's
added conditioning, FLUX's packed latents and guidance embedding), in the latent layout.
Differences between sets are therefore the interventions' alone. Clients: the SAE's "loss
recovered" (``sae.metrics.fraction_recovered``), ordered weakening, steering.

Images come from a store (its final images and prompts), from tensors, or are generated from
prompts and seeds first; latents are the VAE's mean, ``(mean − shift_factor) × scaling_factor``
(SD3's and FLUX's VAEs have a shift). The denoiser is called directly, once per batch, timestep
and set, on the conditional rows only (no uncond half, for any family), so step-index gates
(``{steps: [..]}``) never open here; windows and ``{t: [..]}`` gates do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from activations.families import architecture_of, denoiser_of
from activations.hooks import intervene
from activations.intervention import Intervention
from activations.text import encode_prompts
from common.errors import UsageError


def vae_latents(vae, pixels: Tensor) -> Tensor:
    """The VAE's latent mean of ``pixels`` [n, 3, H, W] in [-1, 1], as the denoiser was trained on it:
    ``(mean − shift_factor) × scaling_factor`` (no shift for SD 1.x / 2.x / XL's VAEs)."""
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    scaling = float(getattr(vae.config, "scaling_factor", None) or 1.0)
    return (vae.encode(pixels).latent_dist.mean - shift) * scaling


@torch.no_grad()
def evaluate(
    pipe,
    interventions: Mapping[str, Sequence[Intervention]] | Sequence[Intervention],
    *,
    store=None,
    images: Sequence[int] | Tensor | None = None,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    timesteps: Sequence[int] = (999, 750, 500, 250),
    seed: int = 0,
    batch_size: int = 8,
    guidance: float | None = None,
) -> dict[str, float]:
    """Mean denoising loss for each named set of interventions (a plain list is named ``"edited"``).

    Images: ``store`` + ``images`` (image ids), or ``images`` as a tensor [n, 3, H, W] in [-1, 1]
    with ``prompts``, or ``prompts`` + ``seeds`` (generated first with the model's defaults).
    ``guidance``: the scale a guidance-distilled denoiser embeds (FLUX.1-dev; None: the model's
    default); the others ignore it, every row being conditional.
    """
    sets: dict[str, list[Intervention]] = dict(interventions) if isinstance(interventions, Mapping) else {"edited": list(interventions)}
    if not timesteps:
        raise UsageError("evaluate needs at least one timestep, got none; e.g. timesteps=[999, 500, 100]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"evaluate: batch_size must be a positive integer, got {batch_size!r}")
    arch, denoiser = architecture_of(pipe), denoiser_of(pipe)
    if arch.denoise is None:
        raise UsageError(f"evaluate: the {arch.name} architecture declares no denoiser call (Architecture.denoise)")
    noised = arch.objective(pipe.scheduler)
    bad = [t for t in timesteps if not 0 <= int(t) <= noised.max_timestep]
    if bad:
        raise UsageError(f"evaluate: timestep {bad[0]!r} is out of range; valid timesteps: 0 to {noised.max_timestep}")
    pixels, texts = _images(pipe, store, images, prompts, seeds)
    if guidance is None:
        from activations.pipeline import model_defaults

        guidance = model_defaults(pipe)["guidance_scale"]
    vae = pipe.vae
    device, dtype = denoiser.device, denoiser.dtype
    gen = torch.Generator().manual_seed(seed)
    totals = {name: 0.0 for name in sets}
    count = 0
    for lo in range(0, len(pixels), batch_size):
        img = pixels[lo : lo + batch_size].to(device=device, dtype=vae.dtype)
        x0 = vae_latents(vae, img)
        cond = encode_prompts(pipe, texts[lo : lo + batch_size], full=True)
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=gen).to(device=device, dtype=x0.dtype)
            tt = torch.full((x0.shape[0],), int(t), device=device, dtype=torch.long)
            x_t, target = noised(x0, noise, tt)
            target = target.float()
            for name, ivs in sets.items():
                with intervene(denoiser, *ivs):
                    pred = arch.denoise(pipe, x_t.to(dtype), tt, cond, guidance)
                totals[name] += float((pred.float() - target).pow(2).mean()) * x0.shape[0]
        count += x0.shape[0] * len(timesteps)
    return {name: total / max(count, 1) for name, total in totals.items()}


def _images(pipe, store, images, prompts, seeds) -> tuple[Tensor, list[str]]:
    if store is not None:
        if images is None:
            raise UsageError("evaluate(store=...) needs images= (the image ids to score), got none")
        from activations.store import ActivationStore

        store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        ids = [int(i) for i in images]
        return store.images(ids), store.texts(ids)
    if isinstance(images, Tensor):
        if prompts is None or len(prompts) != len(images):
            raise UsageError(f"evaluate(images=tensor) needs one prompt per image, got {0 if prompts is None else len(prompts)} for {len(images)}")
        return images, list(prompts)
    if prompts is not None and seeds is not None:
        from activations.generate import generate
        from activations.pipeline import model_defaults

        defaults = model_defaults(pipe)
        jobs = [(p, s) for p in prompts for s in seeds]
        out = [np.asarray(im, dtype=np.float32) / 127.5 - 1.0 for _, _, im in generate(
            pipe, jobs, defaults["num_inference_steps"], defaults["guidance_scale"], progress=False)]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous(), [p for p, _ in jobs]
    raise UsageError("evaluate needs images; valid: store= and images= (ids), images= (a tensor) and prompts=, or prompts= and seeds=")


__all__ = ["evaluate", "vae_latents"]
