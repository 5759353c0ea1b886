"""Steering edits that span sites: one recipe line, several protocol interventions.

Some edits a user writes in one line act at many sites (an HRV edit touches every cross-attention
head; a head edit names global heads that live in several modules) or need the pipeline to be
resolved (a token given as a word, another prompt to encode). They are still registered
Intervention kinds, so they serialise to recipes; ``expand(pipe, prompts)`` turns one into the
plain per-site interventions of ``activations.edits`` that ``steer`` attaches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from activations.intervention import Intervention


@dataclasses.dataclass(kw_only=True, eq=False)
class Composite(Intervention):
    """An intervention that ``steer`` expands into per-site interventions (see the module doc)."""

    stage: str = "heads"

    def expand(self, pipe, prompts: Sequence[str] | None) -> list[Intervention]:
        raise NotImplementedError

    def apply(self, x, call):
        raise RuntimeError(f"{type(self).__name__} spans several sites: attach it with steering.steer(pipe, ...), "
                           f"not activations.intervene")

    def gate(self) -> dict:
        """The gate fields every expanded intervention inherits (when, branch, mask)."""
        return {"when": self.when, "branch": self.branch, "mask": self.mask}


