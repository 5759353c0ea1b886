"""Steering edits that span sites: one recipe line, several protocol interventions.

Some edits a user writes in one line act at many sites (an HRV edit touches every cross-attention
head; a head edit names global heads that live in several modules) or need the pipeline to be
resolved (a token given as a word, another prompt to encode). They are still registered
Intervention kinds, so they serialise to recipes; ``expand(pipe, prompts)`` turns one into the
plain per-site interventions of ``activations.edits``. Expanding is their ``resolve`` step
(``activations.intervention.Intervention.resolve``), which every attaching path runs, so
``activations.intervene`` and ``steer`` take them alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from activations.intervention import Intervention, resolve_all


@dataclasses.dataclass(kw_only=True, eq=False)
class Composite(Intervention):
    """An intervention that resolves into per-site interventions (see the module doc)."""

    stage: str = "heads"

    def expand(self, pipe, prompts: Sequence[str] | None) -> list[Intervention]:
        raise NotImplementedError

    def resolve(self, model, prompts: Sequence[str] | None = None) -> list[Intervention]:
        self.check(model)
        return resolve_all(model, self.expand(model, prompts), prompts)

    def for_run(self, steps: int, guidance: float) -> "Composite":
        """This edit for a run of ``steps`` at ``guidance`` (a recipe's): itself, unless the edit
        draws something of its own that must match the run (``EncodePrompt`` on an MMDiT)."""
        return self

    def pipeline(self, model):
        """``model`` when it is a pipeline; a bare denoiser (U-Net or MMDiT transformer) is refused
        (this edit needs the tokenizer or the text encoder)."""
        from activations.families import denoiser_of

        if denoiser_of(model) is model or getattr(model, "tokenizer", None) is None:
            raise ValueError(f"{type(self).__name__} needs the pipeline (its tokenizer and text encoder), "
                             f"got a {type(model).__name__}: attach it with intervene(pipe, ...) or steer(pipe, ...)")
        return model

    def apply(self, x, call):
        # resolve replaces this object by per-site interventions before anything is attached
        raise RuntimeError(f"{type(self).__name__} spans several sites and runs only through its resolved "
                           f"interventions: attach it with activations.intervene or steering.steer")

    def gate(self) -> dict:
        """The gate fields every expanded intervention inherits (when, branch, mask)."""
        return {"when": self.when, "branch": self.branch, "mask": self.mask}


