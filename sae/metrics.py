"""SAE metrics: FVU overall and per timestep window, sparsity statistics, and the
diffusion analogue of "loss recovered".

FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over an evaluation set (1 - explained variance),
accumulated in float64 so that many batches (and ranks) add up exactly.

Loss recovered (the language-model metric of SAELens / Gao et al. 2024, transposed to diffusion):
the denoiser's training loss (``activations.evaluate``: DDPM for U-Nets, flow matching for SD3
and FLUX) on noised latents of real images, with the site's value replaced by (a) the SAE
reconstruction, (b) zeros (zero ablation) and (c) its mean over the data (mean ablation):
    fraction_recovered = (L_ablated - L_sae) / (L_ablated - L_clean)
1 means the reconstruction is as good as the real activations, 0 as bad as the ablation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from activations.timesteps import WINDOWS, Window


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
            # rows carry their stored tau: the window's own rule on it (activations.timesteps)
            m = torch.ones_like(tau, dtype=torch.bool) if name == "all" else Window(name).holds(tau)
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


def spread_timesteps(timesteps: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` timesteps spread evenly over the given ones (largest first)."""
    ts = sorted({int(t) for t in timesteps}, reverse=True)
    if len(ts) <= count:
        return ts
    picks = np.linspace(0, len(ts) - 1, count).round().astype(int)
    return [ts[i] for i in picks]


__all__ = [
    "WINDOWS", "FVUAccumulator", "batch_fvu", "log10_density", "sparsity_stats", "fraction_recovered",
    "spread_timesteps",
]
