"""``FeatureStats``: when, where and how strongly each latent of a trained SAE fires over a store.

The statistics themselves (``FeatureStats``, ``compute_feature_stats``, ``sparse_codes``,
``merge_topk``, the co-firing counts) are implemented once in ``sae.stats`` (see its module doc for
what is accumulated and how), because the training pass (``sae.lit.LitSAE``) writes them too and
``sae`` may not import ``analysis``; they are re-exported here under their old names. This module
adds ``feature_values`` (chosen features on chosen rows).
"""

from __future__ import annotations

import numpy as np
import torch

# The statistics live in ``sae.stats`` (the training pass writes them too; ``sae`` may not import
# ``analysis``); this module re-exports them under their old names.
from sae.stats import (  # noqa: F401 - re-exports
    DENSE_COOC_MAX,
    META_FILE,
    TENSORS_FILE,
    FeatureStats,
    _Cooc,
    compute_feature_stats,
    merge_topk,
    sparse_codes,
)


def feature_values(sae, reader, rows: np.ndarray, features: list[int] | np.ndarray) -> np.ndarray:
    """[len(rows), len(features)] float32 activations of chosen features on chosen rows."""
    feats = torch.as_tensor(np.asarray(features), dtype=torch.long)
    out = np.zeros((len(rows), len(feats)), dtype=np.float32)
    col = torch.full((sae.num_latents,), -1, dtype=torch.long)
    col[feats] = torch.arange(len(feats))
    for lo in range(0, len(rows), 8192):
        acts, _ = reader.read(rows[lo: lo + 8192])
        tok, lat, val = sparse_codes(sae, acts.float())
        c = col[lat]
        keep = c >= 0
        out[lo + tok[keep].numpy(), c[keep].numpy()] = val[keep].numpy()
    return out
