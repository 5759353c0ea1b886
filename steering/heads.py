"""Head edits of Patch Explorer (Grabe et al. 2025), one line each.

* ``HeadScale``: multiply chosen heads' outputs on chosen patches (``mask``) over a window;
* ``EncodePrompt``: chosen heads attend to another prompt on chosen patches ("unicorn" into a
  horse's head patches): the other prompt is held as text and encoded by the pipeline when the
  edit is attached (``activations.edits.SwapKV``).

``heads``: global head indices (``diffatlas sites``) or [site, head] pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from activations.edits import HeadEdit, SwapKV
from activations.intervention import register_intervention
from activations.sites import heads_by_site
from activations.text import encode_prompts
from common.errors import UsageError
from steering.base import Composite


def _check_heads(heads) -> list:
    if heads is None or (isinstance(heads, (list, tuple)) and not heads):
        raise UsageError("heads= must name at least one head (global indices or [site, head] pairs)")
    return [list(h) if isinstance(h, (list, tuple)) else int(h) for h in heads]


@register_intervention("head_scale")
@dataclasses.dataclass(kw_only=True, eq=False)
class HeadScale(Composite):
    """Multiply the per-head outputs of ``heads`` by ``factor`` (on ``mask``'s patches)."""

    stages = ("heads",)
    heads: Any = None
    """global head indices or [site, head] pairs"""
    factor: float = 0.0
    """multiplier of the heads' outputs (0 = ablate them)"""

    def __post_init__(self):
        super().__post_init__()
        self.heads = _check_heads(self.heads)

    def expand(self, pipe, prompts):
        return [HeadEdit(site=site, stage="heads", heads=local, scale=float(self.factor), **self.gate())
                for site, local in heads_by_site(pipe, self.heads).items()]


@register_intervention("encode_prompt")
@dataclasses.dataclass(kw_only=True, eq=False)
class EncodePrompt(Composite):
    """Chosen heads attend to ``prompt``'s text embeddings (encoded by the pipeline) on ``mask``."""

    stages = ("heads",)
    branch: Any = "cond"
    prompt: str = ""
    """the other prompt, e.g. 'a blue circle'"""
    heads: Any = None
    """global head indices or [site, head] pairs"""

    def __post_init__(self):
        super().__post_init__()
        self.heads = _check_heads(self.heads)
        if not isinstance(self.prompt, str) or not self.prompt:
            raise UsageError("EncodePrompt needs prompt= (the text to encode through the heads)")

    def check(self, model) -> None:
        from activations.edits import check_swap

        check_swap(model, type(self).__name__)

    def expand(self, pipe, prompts):
        ehs = encode_prompts(self.pipeline(pipe), [self.prompt])[0]
        return [SwapKV(site=site, heads=local, encoder_hidden_states=ehs, **self.gate())
                for site, local in heads_by_site(pipe, self.heads).items()]
