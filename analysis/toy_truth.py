"""Feature -> ground truth on the toy world: the AUROC of each SAE feature (or raw channel) as a
detector of each per-token label, per timestep window.

Labels come from the ``toy`` model plugin's ground truth (``common.plugins.world_truth``: the scene
stored beside each final image, ``images/<id>.json``): for the object attributes (shape, color,
position, size, texture) a patch carries the value of the object covering at least half of it and
no value on the background; background and style label every patch. Target "color=red" is 1 on
patches labelled red and 0 on every other patch (other colours and background). Analysis asks the
plugin and never imports toyworld.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from activations.timesteps import WINDOWS as _WINDOWS
from common.plugins import world_truth

WINDOWS = tuple(_WINDOWS)


def concept_values() -> list[tuple[str, str]]:
    """Every (attribute, value) of the toy world, in ``toyworld.vocab.ATTRIBUTES`` order."""
    return world_truth("toy").concept_values()


def scene_of(store_root: str | Path, image: int):
    """The toy scene saved beside image ``image`` of a toyworld harvest."""
    return world_truth("toy").scene(store_root, image)


def row_targets(store_root: str | Path, meta: dict[str, np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """[rows, values] bool: does each row's patch show each concept value (``concept_values`` order)."""
    return world_truth("toy").patch_targets(store_root, meta, grid)


def feature_truth(sae, reader, store_root: str | Path, *, windows=WINDOWS, rows: np.ndarray | None = None,
                  branch: str = "cond", chunk_rows: int = 8192) -> dict:
    """AUROC [windows, features, values] of every feature against every toy concept value.

    Returns {"auroc": float32 array, "windows": [...], "values": ["color=red", ...], "rows": [per window]}.
    """
    from analysis.auroc import sparse_auroc
    from analysis.features import sparse_codes

    values = concept_values()
    out = np.full((len(windows), sae.num_latents, len(values)), np.nan, dtype=np.float32)
    counts = []
    for w, window in enumerate(windows):
        idx = reader.select(window=window, branch=branch)
        if rows is not None:
            idx = np.intersect1d(idx, rows)
        counts.append(int(len(idx)))
        if not len(idx):
            continue
        Y, R, F, V = [], [], [], []
        for lo in range(0, len(idx), chunk_rows):
            acts, meta = reader.read(idx[lo: lo + chunk_rows])
            Y.append(row_targets(store_root, meta, reader.grid))
            tok, lat, val = sparse_codes(sae, acts.float())
            R.append(tok.numpy() + lo), F.append(lat.numpy()), V.append(val.numpy())
        out[w] = sparse_auroc(np.concatenate(R), np.concatenate(F), np.concatenate(V), sae.num_latents, np.concatenate(Y))
    return {"auroc": out, "windows": list(windows), "values": [f"{a}={v}" for a, v in values], "rows": counts}


def channel_truth(reader, store_root: str | Path, *, window=None, rows: np.ndarray | None = None, branch: str = "cond") -> np.ndarray:
    """AUROC [channels, values] of each raw channel of the site, the better of the two signs
    (a channel may detect a value by going down): the baseline an SAE feature must beat."""
    from analysis.auroc import auroc

    idx = reader.select(window=window, branch=branch)
    if rows is not None:
        idx = np.intersect1d(idx, rows)
    acts, meta = reader.read(idx)
    a = auroc(acts.float().numpy(), row_targets(store_root, meta, reader.grid))
    return np.fmax(a, 1 - a)


def best_labels(auroc_fv: np.ndarray, values: list[str]) -> list[tuple[str, float]]:
    """Each feature's best ground-truth label and its AUROC (NaN-safe; ('', nan) if none)."""
    out = []
    for row in auroc_fv:
        if not np.isfinite(row).any():
            out.append(("", float("nan")))
            continue
        v = int(np.nanargmax(row))
        out.append((values[v], float(row[v])))
    return out
