"""``evaluate``: the U-Net's denoising loss under any set of interventions.

    losses = evaluate(pipe, {"clean": [], "zero": [Ablate(site="mid_block.attentions.0")]},
                      store="runs/harvest-toy", images=[0, 1, 2], timesteps=[999, 500, 100])

For every named set of interventions the same images are noised with the same noise at the same
timesteps, and the loss L = E ||target − unet(x_t, t, text)||² is averaged over images and
timesteps; the target follows the scheduler's prediction type (epsilon, v_prediction, sample).
Differences between sets are therefore the interventions' alone. Clients: the SAE's "loss
recovered" (``sae.metrics.fraction_recovered``), ordered weakening, steering.

Images come from a store (its final images and prompts), from tensors, or are generated from
prompts and seeds first. The U-Net is called directly, one timestep at a time, so step-index gates
(``{steps: [..]}``) never open here; windows and ``{t: [..]}`` gates do, and every row is on the
conditional branch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from activations.hooks import intervene
from activations.intervention import Intervention
from activations.text import encode_prompts


def _targets(sched, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    kind = getattr(sched.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r}; valid: epsilon, v_prediction, sample")


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
) -> dict[str, float]:
    """Mean denoising loss for each named set of interventions (a plain list is named ``"edited"``).

    Images: ``store`` + ``images`` (image ids), or ``images`` as a tensor [n, 3, H, W] in [-1, 1]
    with ``prompts``, or ``prompts`` + ``seeds`` (generated first with the model's defaults).
    """
    if hasattr(pipe, "text_encoder_2"):
        raise NotImplementedError("evaluate is implemented for SD 1.x / 2.x pipelines; SDXL needs added conditioning "
                                  "(time ids, pooled text) that is not wired here")
    sets: dict[str, list[Intervention]] = dict(interventions) if isinstance(interventions, Mapping) else {"edited": list(interventions)}
    pixels, texts = _images(pipe, store, images, prompts, seeds)
    if not timesteps:
        raise ValueError("evaluate needs at least one timestep")
    from diffusers import DDPMScheduler

    # The training-time view of the noise schedule: samplers such as DPM-Solver keep no
    # get_velocity, and their add_noise follows their inference steps.
    unet, vae, sched = pipe.unet, pipe.vae, DDPMScheduler.from_config(pipe.scheduler.config)
    device, dtype = unet.device, unet.dtype
    scaling = float(getattr(vae.config, "scaling_factor", 1.0))
    gen = torch.Generator().manual_seed(seed)
    totals = {name: 0.0 for name in sets}
    count = 0
    for lo in range(0, len(pixels), batch_size):
        img = pixels[lo : lo + batch_size].to(device=device, dtype=vae.dtype)
        x0 = vae.encode(img).latent_dist.mean * scaling
        emb = encode_prompts(pipe, texts[lo : lo + batch_size]).to(device)
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=gen).to(device=device, dtype=x0.dtype)
            tt = torch.full((x0.shape[0],), int(t), device=device, dtype=torch.long)
            x_t = sched.add_noise(x0, noise, tt)
            target = _targets(sched, x0, noise, tt).float()
            for name, ivs in sets.items():
                with intervene(unet, *ivs):
                    pred = unet(x_t.to(dtype), tt, encoder_hidden_states=emb.to(dtype)).sample
                totals[name] += float((pred.float() - target).pow(2).mean()) * x0.shape[0]
        count += x0.shape[0] * len(timesteps)
    return {name: total / max(count, 1) for name, total in totals.items()}


def _images(pipe, store, images, prompts, seeds) -> tuple[Tensor, list[str]]:
    if store is not None:
        if images is None:
            raise ValueError("evaluate(store=...) needs images= (the image ids to score)")
        from activations.store import ActivationStore

        store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        ids = [int(i) for i in images]
        return store.images(ids), store.texts(ids)
    if isinstance(images, Tensor):
        if prompts is None or len(prompts) != len(images):
            raise ValueError(f"evaluate(images=tensor) needs one prompt per image, got {0 if prompts is None else len(prompts)} for {len(images)}")
        return images, list(prompts)
    if prompts is not None and seeds is not None:
        from activations.generate import generate
        from activations.pipeline import model_defaults

        defaults = model_defaults(pipe)
        jobs = [(p, s) for p in prompts for s in seeds]
        out = [np.asarray(im, dtype=np.float32) / 127.5 - 1.0 for _, _, im in generate(
            pipe, jobs, defaults["num_inference_steps"], defaults["guidance_scale"], progress=False)]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous(), [p for p, _ in jobs]
    raise ValueError("evaluate needs images: store= and images= (ids), images= (a tensor) and prompts=, or prompts= and seeds=")


__all__ = ["evaluate"]
