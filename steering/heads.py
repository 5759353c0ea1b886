"""Head edits of Patch Explorer (Grabe et al. 2025), one line each.

* ``HeadScale``: multiply chosen heads' outputs on chosen patches (``mask``) over a window;
* ``EncodePrompt``: chosen heads attend to another prompt on chosen patches ("unicorn" into a
  horse's head patches): the other prompt is held as text and, when the edit is attached, encoded
  by the pipeline (cross-attention) or drawn once to record its text keys and values (joint
  attention), then read through ``activations.edits.SwapKV``.

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
from common.config import MAX_STEPS, check_counts
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
    """Chosen heads attend to ``prompt`` instead of the generation's own on ``mask``.

    Cross-attention (U-Nets): the prompt is encoded by the pipeline and each head projects it
    through its own key/value weights. Joint attention (MMDiTs): a head's text keys and values come
    from the text stream, which every block changes while reading the image, so the prompt is
    drawn once (seed 0, ``steps`` and ``guidance``) and its text keys and values at the chosen
    heads are recorded at every step (``analysis.mechanism.stream_text``, as HRV word keys are
    made); the edited generations must run the same steps.
    """

    stages = ("heads",)
    branch: Any = "cond"
    prompt: str = ""
    """the other prompt, e.g. 'a blue circle'"""
    heads: Any = None
    """global head indices or [site, head] pairs"""
    steps: Any = None
    """joint attention: steps of the draw that records the other prompt, which the edited generations
    must use (default: the model's)"""
    guidance: Any = None
    """joint attention: guidance of that draw (default: the model's)"""

    def __post_init__(self):
        super().__post_init__()
        self.heads = _check_heads(self.heads)
        if not isinstance(self.prompt, str) or not self.prompt:
            raise UsageError("EncodePrompt needs prompt= (the text to encode through the heads)")
        try:
            check_counts(self, positive=("steps",), at_most={"steps": MAX_STEPS}, numbers={"guidance": 0})
        except UsageError as err:  # a recipe field, not a command-line option
            raise UsageError(f"{type(self).__name__}: {str(err).removeprefix('--')}") from None

    def for_run(self, steps: int, guidance: float) -> "EncodePrompt":
        """The run's steps and guidance where this edit leaves them unset; steps set to another
        count than the run's are refused here, before any image is drawn."""
        if self.steps is not None and self.steps != steps:
            raise UsageError(f"EncodePrompt: steps is {self.steps}, but the run draws {steps} steps; "
                             f"set steps: {steps} or leave it out")
        return dataclasses.replace(self, steps=steps, guidance=self.guidance if self.guidance is not None else guidance)

    def expand(self, pipe, prompts):
        pipe = self.pipeline(pipe)
        return [SwapKV(site=site, heads=local, **source, **self.gate())
                for site, (local, source) in prompt_sources(pipe, self.prompt, self.heads, self.steps, self.guidance).items()]


def prompt_sources(pipe, prompt: str, heads, steps: int | None = None,
                   guidance: float | None = None) -> dict[str, tuple[list[int], dict]]:
    """For each head site with chosen ``heads``: (its local heads, the ``SwapKV`` arguments that
    make them read ``prompt``). Cross-attention: the prompt's text embeddings. Joint attention: the
    prompt's text keys and values at those heads, recorded by drawing it once at ``steps`` and
    ``guidance`` (default: the model's). The one place ``EncodePrompt`` and the explorer get them."""
    from activations.families import architecture_of

    by_site = heads_by_site(pipe, heads)
    if architecture_of(pipe).processor != "joint":
        ehs = encode_prompts(pipe, [prompt])[0]
        return {site: (local, {"encoder_hidden_states": ehs}) for site, local in by_site.items()}
    from activations.text import text_length
    from analysis.construct import sampling_defaults
    from analysis.mechanism import stream_text

    steps, guidance = sampling_defaults(pipe, steps, guidance)
    read = stream_text(pipe, [prompt], [range(text_length(pipe))], steps, guidance, stages=("k", "v"), heads=by_site)
    return {site: (local, {"text_kv": (read.values["k"][site], read.values["v"][site]), "taus": read.taus})
            for site, local in by_site.items()}
