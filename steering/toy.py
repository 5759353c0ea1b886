"""Toy-world helpers for steering, through the ``toy`` model plugin's ground truth
(``common.plugins.world_truth``): steering never imports toyworld."""

from __future__ import annotations

import numpy as np
import torch


def object_features(store: str, site: str, sae, n: int = 4, window="early", max_rows: int = 200_000) -> list[tuple[int, float]]:
    """The ``n`` SAE features whose activation correlates most with the object's mask.

    Pearson correlation, over the store's rows of ``site`` in ``window``, between each feature's
    activation and the share of the row's patch that an object covers (the scene is parsed back
    from the image's prompt and rendered). Returns [(feature, correlation)], best first.
    """
    from activations.store import ActivationStore
    from common.plugins import world_truth

    st = ActivationStore(store)
    reader = st.site(site)
    rows = reader.select(window=window)
    rows = rows[:max_rows]
    acts, meta = reader.read(rows)
    h, w = reader.grid
    ids = sorted({int(i) for i in meta["image"]})
    truth = world_truth("toy")
    cover = {i: truth.object_coverage(t, h) for i, t in zip(ids, st.texts(ids))}
    m = torch.tensor(np.array([cover[int(im)][int(i), int(j)] for im, i, j in zip(meta["image"], meta["i"], meta["j"])]),
                     dtype=torch.float32)
    with torch.no_grad():
        z = sae.encode(acts.float().to(sae.dtype)).to_dense().float()
    z_c, m_c = z - z.mean(0), m - m.mean()
    corr = (z_c * m_c[:, None]).sum(0) / (z_c.norm(dim=0) * m_c.norm()).clamp_min(1e-9)
    best = corr.argsort(descending=True)[:n]
    return [(int(k), round(float(corr[k]), 4)) for k in best]
