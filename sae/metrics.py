"""SAE metrics (DESIGN.md §5): FVU overall and per timestep window, sparsity statistics, and the
diffusion analogue of "loss recovered".

FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over an evaluation set (1 - explained variance),
accumulated in float64 so that many batches (and ranks) add up exactly.

Loss recovered (the language-model metric of SAELens / Gao et al. 2024, transposed to diffusion):
the U-Net's denoising loss L = E ||target - unet(x_t, t, text)||^2 on noised latents of real
images, with the site's residual update replaced by (a) the SAE reconstruction, (b) zeros (zero
ablation) and (c) its mean over the data (mean ablation):
    fraction_recovered = (L_ablated - L_sae) / (L_ablated - L_clean)
1 means the reconstruction is as good as the real activations, 0 as bad as the ablation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

# Timestep windows of Tinaz et al. (same bounds as activations.timesteps.WINDOWS; the top of
# "early" is inclusive so that tau = 1 counts).
WINDOWS: dict[str, tuple[float, float]] = {"early": (0.6, 1.0), "middle": (0.2, 0.6), "late": (0.0, 0.2)}


def window_mask(tau: Tensor, window: str) -> Tensor:
    lo, hi = WINDOWS[window]
    return (tau >= lo) & ((tau <= hi) if hi >= 1.0 else (tau < hi))


class FVUAccumulator:
    """Running sums for FVU, overall ('all') and per window. Call ``update`` per batch, ``reduce``
    under DDP, then ``compute``."""

    def __init__(self, d: int, device=None):
        self.groups = ["all", *WINDOWS]
        g = len(self.groups)
        self.count = torch.zeros(g, dtype=torch.float64, device=device)
        self.sse = torch.zeros(g, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(g, dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(g, d, dtype=torch.float64, device=device)
        self.l0_sum = torch.zeros(g, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: Tensor, recon: Tensor, tau: Tensor, l0: Tensor | None = None) -> None:
        """x, recon [n, d]; tau [n]; l0 [n] active latents per token."""
        x64, err = x.double(), (x.double() - recon.double()).pow(2).sum(-1)
        for gi, name in enumerate(self.groups):
            m = torch.ones_like(tau, dtype=torch.bool) if name == "all" else window_mask(tau, name)
            if not bool(m.any()):
                continue
            xm = x64[m]
            self.count[gi] += m.sum()
            self.sse[gi] += err[m].sum()
            self.sum_sq[gi] += xm.pow(2).sum()
            self.sum_x[gi] += xm.sum(0)
            if l0 is not None:
                self.l0_sum[gi] += l0[m].double().sum()

    def reduce(self) -> None:
        """Sum the accumulators over DDP ranks (no-op in one process)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (self.count, self.sse, self.sum_sq, self.sum_x, self.l0_sum):
                torch.distributed.all_reduce(t)

    def compute(self) -> dict[str, float]:
        """{'fvu': .., 'mse': .., 'l0': .., 'fvu/early': .., ...}; windows without rows are omitted."""
        out = {}
        for gi, name in enumerate(self.groups):
            n = float(self.count[gi])
            if n == 0:
                continue
            var = float(self.sum_sq[gi] - self.sum_x[gi].pow(2).sum() / n)
            fvu = float(self.sse[gi]) / var if var > 0 else float("nan")
            suffix = "" if name == "all" else f"/{name}"
            out[f"fvu{suffix}"] = fvu
            out[f"mse{suffix}"] = float(self.sse[gi]) / n
            out[f"l0{suffix}"] = float(self.l0_sum[gi]) / n
        return out


def batch_fvu(x: Tensor, recon: Tensor) -> Tensor:
    """FVU of one batch (scalar)."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x - recon).pow(2).sum() / total.clamp_min(torch.finfo(x.dtype).tiny)


def log10_density(fire_counts: Tensor, tokens: float, eps: float = 1e-10) -> Tensor:
    """log10 of each latent's firing frequency (eps keeps never-firing latents finite)."""
    return torch.log10(fire_counts.double() / max(tokens, 1.0) + eps).float()


def sparsity_stats(fire_counts: Tensor, tokens: float, tokens_since_fired: Tensor, dead_after: float,
                   dense_threshold: float) -> dict[str, float]:
    """dead_fraction: latents silent for ``dead_after`` tokens (or since the start, if fewer were
    seen); dense_fraction: latents firing on more than ``dense_threshold`` of the window's tokens."""
    density = fire_counts.double() / max(tokens, 1.0)
    dead = tokens_since_fired >= dead_after
    return {
        "dead_fraction": float(dead.float().mean()),
        "dense_fraction": float((density > dense_threshold).float().mean()),
        "mean_density": float(density.mean()),
    }


# ------------------------------------------------------------------------------------ loss recovered
def fraction_recovered(clean: float, patched: float, ablated: float) -> float:
    """(L_ablated - L_patched) / (L_ablated - L_clean); NaN when the ablation changes nothing."""
    denom = ablated - clean
    return (ablated - patched) / denom if abs(denom) > 1e-12 else float("nan")


@torch.no_grad()
def denoising_losses(
    pipe,
    site: str,
    edits: dict[str, Callable[[Tensor], Tensor] | None],
    images: Tensor,
    prompts: Sequence[str],
    timesteps: Sequence[int],
    *,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean denoising loss of ``pipe.unet`` for each named edit of ``site`` (None = no edit).

    images: [n, 3, H, W] in [-1, 1]; prompts: n strings; every image is noised at every timestep
    with noise drawn from ``seed`` (the same noise for every edit, so differences are the edit's).
    The target follows the scheduler's prediction_type (epsilon, v_prediction or sample).
    """
    from activations import edit_block

    if hasattr(pipe, "text_encoder_2"):
        raise NotImplementedError("loss recovered is implemented for SD 1.x / 2.x pipelines; SDXL needs added "
                                  "conditioning (time ids, pooled text) that is not wired here")
    from diffusers import DDPMScheduler

    # The training-time view of the pipeline's noise schedule: samplers such as DPM-Solver keep
    # no get_velocity, and their add_noise follows their inference steps.
    unet, vae, sched = pipe.unet, pipe.vae, DDPMScheduler.from_config(pipe.scheduler.config)
    device = unet.device
    dtype = unet.dtype
    pred_type = getattr(sched.config, "prediction_type", "epsilon")
    scaling = float(getattr(vae.config, "scaling_factor", 1.0))
    gen = torch.Generator().manual_seed(seed)
    totals = {name: 0.0 for name in edits}
    count = 0
    for lo in range(0, len(images), batch_size):
        img = images[lo : lo + batch_size].to(device=device, dtype=vae.dtype)
        x0 = vae.encode(img).latent_dist.mean * scaling
        emb, _ = pipe.encode_prompt(list(prompts[lo : lo + batch_size]), device, 1, False)
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=gen).to(device=device, dtype=x0.dtype)
            tt = torch.full((x0.shape[0],), int(t), device=device, dtype=torch.long)
            x_t = sched.add_noise(x0, noise, tt)
            if pred_type == "epsilon":
                target = noise
            elif pred_type == "v_prediction":
                target = sched.get_velocity(x0, noise, tt)
            elif pred_type == "sample":
                target = x0
            else:
                raise ValueError(f"unknown prediction_type {pred_type!r}; valid: epsilon, v_prediction, sample")
            for name, fn in edits.items():
                if fn is None:
                    pred = unet(x_t.to(dtype), tt, encoder_hidden_states=emb.to(dtype)).sample
                else:
                    with edit_block(unet, site, fn):
                        pred = unet(x_t.to(dtype), tt, encoder_hidden_states=emb.to(dtype)).sample
                totals[name] += float((pred.float() - target.float()).pow(2).mean()) * x0.shape[0]
            count += x0.shape[0]
    return {name: total / max(count, 1) for name, total in totals.items()}


def load_store_images(root, image_ids: Sequence[int], size: int | None = None) -> tuple[Tensor, list[str]]:
    """Final images [n, 3, H, W] in [-1, 1] and their prompt texts, from a harvest folder.

    Reads ``images/<image>.png`` and ``prompts.jsonl`` (one JSON object per image with an ``image``
    id and the prompt text under ``text``, ``prompt_text`` or ``prompt``).
    """
    import json
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    texts: dict[int, str] = {}
    prompts_file = root / "prompts.jsonl"
    if prompts_file.exists():
        for line in prompts_file.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            text = next((rec[k] for k in ("text", "prompt_text", "prompt") if isinstance(rec.get(k), str)), None)
            if "image" in rec and text is not None:
                texts[int(rec["image"])] = text
    arrays, out_texts = [], []
    for image in image_ids:
        path = root / "images" / f"{image}.png"
        if not path.exists():
            matches = sorted((root / "images").glob(f"*{image}.png")) if (root / "images").is_dir() else []
            if not matches:
                raise FileNotFoundError(f"no final image for image {image} in {root / 'images'}")
            path = matches[0]
        im = Image.open(path).convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size))
        arrays.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
        if int(image) not in texts:
            raise KeyError(f"no prompt text for image {image} in {prompts_file}")
        out_texts.append(texts[int(image)])
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, out_texts


def spread_timesteps(timesteps: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` timesteps spread evenly over the given ones (largest first)."""
    ts = sorted({int(t) for t in timesteps}, reverse=True)
    if len(ts) <= count:
        return ts
    picks = np.linspace(0, len(ts) - 1, count).round().astype(int)
    return [ts[i] for i in picks]


__all__ = [
    "WINDOWS", "FVUAccumulator", "batch_fvu", "log10_density", "sparsity_stats", "fraction_recovered",
    "denoising_losses", "load_store_images", "spread_timesteps",
]
