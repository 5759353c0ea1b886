"""Synthetic sparse activations with a known dictionary, written as an activation store.

For tests and benchmarks that must not depend on a diffusion model: each token is a sparse,
non-negative combination of ``num_features`` random unit directions plus a shared offset and a
little noise, so an SAE can reach low FVU quickly and its quality is checkable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def sparse_activations(n: int, d: int, *, num_features: int = 64, active: int = 4, noise: float = 0.01,
                       seed: int = 0) -> torch.Tensor:
    """[n, d] float32 tokens: offset + sum of ``active`` random features with exponential magnitudes."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(num_features, d, generator=g)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    offset = torch.randn(d, generator=g)
    idx = torch.stack([torch.randperm(num_features, generator=g)[:active] for _ in range(n)])
    mags = torch.empty(n, active).exponential_(1.0, generator=g) + 0.5
    x = torch.zeros(n, d)
    x += torch.einsum("nk,nkd->nd", mags, dictionary[idx])
    return x + offset + noise * torch.randn(n, d, generator=g)


def write_sparse_store(root: str | Path, *, site: str = "mid_block.attentions.0", n: int = 4096, d: int = 16,
                       images: int = 16, timesteps: tuple[int, ...] = (999, 500, 100), seed: int = 0,
                       **kwargs):
    """A store whose rows come from ``sparse_activations``; rows spread over images and timesteps.

    Returns the SiteReader.
    """
    from activations.store import write_synthetic_store

    acts = sparse_activations(n, d, seed=seed, **kwargs)
    rng = np.random.default_rng(seed)
    per_image = max(1, n // images)
    image = np.minimum(np.arange(n) // per_image, images - 1)
    step_of = rng.integers(0, len(timesteps), n)
    t = np.asarray(timesteps)[step_of]
    grid = int(np.ceil(np.sqrt(per_image)))
    pos = np.arange(n) % per_image
    meta = {"image": image, "step": step_of, "t": t, "i": pos // grid, "j": pos % grid}
    return write_synthetic_store(root, site, acts, meta, grid=(grid, grid), rows_per_shard=1024)
