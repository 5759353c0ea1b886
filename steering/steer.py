"""``steer(pipe, *interventions, prompts=None)``: attach steering edits for the generations in a block.

    with steer(pipe, FeatureEdit(sae=folder, features=[3], op="spatial", strength=4,
                                 region={"quadrant": "top left"}, when="early")):
        image = pipe("a red circle").images[0]

Composite edits (HRV, head edits) expand into per-site interventions first; feature edits are
checked against the model (site width, weights). Everything goes through
``activations.hooks.intervene``, which restores the U-Net's processors and hooks on exit, also
after an exception inside the generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from activations.hooks import intervene
from activations.intervention import Intervention
from steering.base import Composite


def expand(pipe, interventions: Sequence[Intervention], prompts: Sequence[str] | None = None) -> list[Intervention]:
    """The plain per-site interventions behind ``interventions`` (checked against ``pipe``)."""
    out: list[Intervention] = []
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"steer takes Intervention objects, got {type(iv).__name__}")
        if isinstance(iv, Composite):
            out.extend(iv.expand(pipe, list(prompts) if prompts is not None else None))
            continue
        check = getattr(iv, "check", None)
        if callable(check):
            check(pipe)
        out.append(iv)
    return out


@contextlib.contextmanager
def steer(pipe, *interventions: Intervention, prompts: Sequence[str] | None = None) -> Iterator:
    """Apply ``interventions`` to every generation of ``pipe`` inside the block (composable: pass
    several; they act in the given order). ``prompts``: the prompts of the generations, one per
    image, needed by edits that name a token by its word."""
    with intervene(pipe, *expand(pipe, interventions, prompts)) as tap:
        yield tap  # the activations.hooks.Tap holding the expanded interventions
