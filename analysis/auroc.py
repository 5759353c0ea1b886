"""Rank-based AUROC (Mann-Whitney U, ties averaged) with numpy, for sparse feature activations.

AUROC(score, y) = (S_pos - P(P+1)/2) / (P N), with S_pos the sum of the positives' ranks among all
n scores (ranks 1..n, tied scores share their mean rank). For an SAE feature most scores are 0:
with Z zeros, every zero has rank (Z+1)/2 and a nonzero score ranks Z + its rank among the
nonzero ones, so only the nonzero entries are ever sorted and nothing of size [rows, features]
is built.
"""

from __future__ import annotations

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, ties given their mean rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.concatenate([[True], xs[1:] != xs[:-1]]) if len(xs) else np.zeros(0, bool)
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.concatenate([starts[1:], [len(xs)]])
    mean_rank = (starts + ends + 1) / 2.0  # ranks start+1 .. end, averaged
    out = np.empty(len(x), dtype=np.float64)
    out[order] = mean_rank[group]
    return out


def auroc(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUROC of dense ``scores`` [n] or [n, f] for binary targets ``y`` [n] or [n, v] -> [f, v] (NaN if a class is empty)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[:, None] if s.ndim == 1 else s
    Y = np.asarray(y, dtype=bool)
    Y = Y[:, None] if Y.ndim == 1 else Y
    P = Y.sum(0).astype(np.float64)
    N = len(Y) - P
    out = np.empty((s.shape[1], Y.shape[1]))
    for f in range(s.shape[1]):
        S = average_ranks(s[:, f]) @ Y
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f] = (S - P * (P + 1) / 2) / (P * N)
    out[:, (P == 0) | (N == 0)] = np.nan
    return out


def sparse_auroc(rows: np.ndarray, feats: np.ndarray, vals: np.ndarray, num_features: int, y: np.ndarray) -> np.ndarray:
    """AUROC [features, v] of nonnegative sparse scores (entries (row, feature, value > 0); all else 0)
    for binary targets ``y`` [n, v] over the n rows."""
    Y = np.asarray(y, dtype=bool)
    n = len(Y)
    P = Y.sum(0).astype(np.float64)
    N = n - P
    out = np.full((num_features, Y.shape[1]), np.nan)
    order = np.argsort(feats, kind="stable")
    rows, feats, vals = rows[order], feats[order], vals[order]
    bounds = np.searchsorted(feats, np.arange(num_features + 1))
    valid = (P > 0) & (N > 0)
    for f in range(num_features):
        r, v = rows[bounds[f]: bounds[f + 1]], vals[bounds[f]: bounds[f + 1]]
        Z = n - len(r)
        Yf = Y[r]
        P_nz = Yf.sum(0)
        S = (P - P_nz) * (Z + 1) / 2.0 + (Z * P_nz if len(r) else 0) + (average_ranks(v) @ Yf if len(r) else 0)
        out[f] = np.where(valid, (S - P * (P + 1) / 2) / np.where(valid, P * N, 1), np.nan)
    return out
