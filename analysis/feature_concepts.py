"""Feature -> HRV concepts: the HRV matrix [concepts, heads] (Park et al.) applied to a feature's
head attribution [heads] (``analysis.feature_heads``).

score[f, c] = sum_h HRV[c, h] * w[f, h] / H, with w[f] = the feature's positive head shares
normalised to sum 1 (heads that write against the feature say nothing about what it means; H
is the number of heads, the L1 norm of each HRV row, so a feature written by one head scores that
head's HRV entry over H). A feature with no positive share scores NaN.

``concept_lift`` divides each concept's score by its mean over the features scored: heads that
write much of every feature (and the concepts they vote for) then no longer name every feature's
top concept; what is left is what a feature's heads serve more than the average feature's.
"""

from __future__ import annotations

import torch

from common.errors import UsageError


def concept_scores(hrv_ch: torch.Tensor, attribution_mh: torch.Tensor) -> torch.Tensor:
    """[m, concepts] concept scores of each feature (see the module doc)."""
    if hrv_ch.shape[1] != attribution_mh.shape[1]:
        raise UsageError(f"the HRV has {hrv_ch.shape[1]} heads but the attribution has {attribution_mh.shape[1]}: "
                         "not the same model")
    w = attribution_mh.float().clamp(min=0)
    total = w.sum(1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp(min=1e-12), torch.full_like(w, float("nan")))
    return w @ hrv_ch.float().T / hrv_ch.shape[1]


def concept_lift(scores_mc: torch.Tensor) -> torch.Tensor:
    """[m, concepts] scores over their mean across the features with a score (NaN rows stay NaN)."""
    mean_c = torch.nanmean(scores_mc, dim=0, keepdim=True)
    return scores_mc / mean_c.clamp(min=1e-12)


def top_concepts(scores_mc: torch.Tensor, names: list[str], feature: int, n: int = 3) -> list[tuple[str, float]]:
    row = scores_mc[feature]
    if not torch.isfinite(row).any():
        return []
    order = torch.argsort(torch.nan_to_num(row, nan=-1.0), descending=True)[:n]
    return [(names[int(c)], float(row[c])) for c in order]
