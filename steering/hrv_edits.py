"""HRV concept strengthening and adjusting (Park et al., ICLR 2025, Section 5).

Strengthening rescales the target token's attention probabilities in every cross-attention head h
by HRV[c, h]; adjusting by 2·HRV[desired, h] − HRV[undesired, h] (the same as strengthening when
the two concepts are one). The authors clamp large factors for SDXL (``clamp``). Probabilities are
not renormalised, as in the paper. Two controls: ``uniform=True`` rescales the same token by the
mean factor at every head (the same total weight spread evenly; for strengthening that mean is 1,
since HRV rows have L1 norm H, so it equals no edit), and ``permute=seed`` shuffles the factors
across heads (the same factors and total weight, without the HRV's choice of heads).

    HRVEdit(hrv="runs/hrv/toy", concept="color", token="red")                 # strengthening
    HRVEdit(hrv="runs/hrv/toy", concept="color", undesired="shape", token="red")  # adjusting

``token`` is a word, found in each prompt with the pipeline's tokenizers when ``steer`` is given
the prompts (``steering.tokens.word_positions``: on SD3 both its CLIP and its T5 tokens, on FLUX
its T5 tokens), or a token index of the text sequence.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from activations.edits import HeadEdit
from activations.intervention import register_intervention
from activations.sites import head_sites
from common.errors import UnknownNameError, UsageError
from steering.base import Composite
from steering.tokens import resolve_tokens


@register_intervention("hrv_edit")
@dataclasses.dataclass(kw_only=True, eq=False)
class HRVEdit(Composite):
    """Rescale a token's attention in every head by its HRV value for a concept (see module doc)."""

    stages = ("probs",)
    stage: str = "probs"
    branch: Any = "cond"
    hrv: Any = None
    """HRV folder (``diffatlas analyze hrv``) or a loaded analysis.hrv.HRV"""
    concept: str = ""
    """the concept to strengthen (the desired one when adjusting)"""
    undesired: str | None = None
    """adjusting: the concept to move away from (factor 2·HRV[concept] − HRV[undesired])"""
    token: Any = None
    """the target token: a word of the prompt or a token index"""
    clamp: float | None = None
    """largest factor (the authors clamp for SDXL); None = no clamp"""
    uniform: bool = False
    """control: the mean factor at every head instead of the HRV's"""
    permute: int | None = None
    """control: the HRV's factors shuffled across heads with this seed"""

    def __post_init__(self):
        from analysis.hrv import HRV

        super().__post_init__()
        self._folder = None
        if isinstance(self.hrv, (str, Path)):
            self._folder = str(self.hrv)
            self.hrv = HRV.load(self.hrv)
        if not isinstance(self.hrv, HRV):
            raise UsageError(f"HRVEdit needs HRVs (a folder or an analysis.hrv.HRV), got {type(self.hrv).__name__}")
        if self.token is None:
            raise UsageError("HRVEdit needs token= (a word of the prompt or a token index)")
        self.factors()  # unknown concepts fail here, naming the valid ones

    def factors(self) -> torch.Tensor:
        """Per global head factor [H]."""
        names = list(self.hrv.concepts.names)
        for c in (self.concept, self.undesired):
            if c is not None and c not in names:
                raise UnknownNameError(f"concept {c!r} is not in these HRVs; valid concepts: {', '.join(names)}")
        f = self.hrv.row(self.concept)
        if self.undesired is not None:
            f = 2 * f - self.hrv.row(self.undesired)
        if self.clamp is not None:
            f = f.clamp(max=float(self.clamp))
        if self.uniform:
            f = torch.full_like(f, float(f.mean()))
        if self.permute is not None:
            f = f[torch.randperm(len(f), generator=torch.Generator().manual_seed(int(self.permute)))]
        return f

    def check(self, model) -> None:
        self.hrv.check_model(model)  # HRVs of another model's heads: refused before any image

    def expand(self, pipe, prompts):
        pipe = self.pipeline(pipe)
        if isinstance(self.token, str) and not prompts:
            raise UsageError(f"token {self.token!r} is a word: give the prompts (steer(..., prompts=[...]) or "
                             f"intervene(..., prompts=[...])) so it can be found in each prompt")
        tokens = resolve_tokens(pipe, prompts or [""], self.token)  # positions in the family's text sequence
        factor_h = self.factors()
        edits = []
        for site in head_sites(pipe):
            f_local = factor_h[site.first_head:site.first_head + site.heads]
            edits.append(HeadEdit(site=site.name, stage="probs", fn=_rescale(f_local, tokens), **self.gate()))
        return edits

    def to_dict(self):
        hrv = self.hrv
        if self._folder is None:
            raise ValueError("an HRV edit can be written to a recipe only with HRVs loaded from a folder (HRV.save)")
        try:
            self.hrv = self._folder
            return super().to_dict()
        finally:
            self.hrv = hrv


def _rescale(factor_h: torch.Tensor, tokens: list[list[int]]):
    def fn(probs_bhnt, call):
        b, h, _, t = probs_bhnt.shape
        # one token set per image: rows map to prompts through call.images (one image per prompt)
        images = call.images.tolist()
        sel_bt = torch.zeros(b, t, dtype=torch.bool, device=probs_bhnt.device)
        for row, image in enumerate(images):
            idx = tokens[image if len(tokens) > 1 else 0] if (len(tokens) == 1 or image < len(tokens)) else None
            if idx is None:
                raise UsageError(f"batch row {row} is image {image} but only {len(tokens)} prompts were given to steer")
            sel_bt[row, [i for i in idx if i < t]] = True
        f = factor_h.to(probs_bhnt)[None, :, None, None]
        return torch.where(sel_bt[:, None, None, :], probs_bhnt * f, probs_bhnt)

    return fn
