"""``steer(pipe, *interventions, prompts=None)``: attach steering edits for the generations in a block.

    with steer(pipe, FeatureEdit(sae=folder, features=[3], op="spatial", strength=4,
                                 region={"quadrant": "top left"}, when="early")):
        image = pipe("a red circle").images[0]

Every edit is resolved against the model first (``Intervention.resolve``: composite edits such as
HRV and head edits expand into per-site interventions, feature edits are checked against the
model's site width and weights), inside ``activations.hooks.intervene``, which restores the
U-Net's processors and hooks on exit, also after an exception inside the generation. ``steer`` is
``intervene`` with the prompts named: the two accept and refuse the same edits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from activations.hooks import intervene
from activations.intervention import Intervention, resolve_all

expand = resolve_all  # the plain per-site interventions behind some interventions (checked against the model)


@contextlib.contextmanager
def steer(pipe, *interventions: Intervention, prompts: Sequence[str] | None = None) -> Iterator:
    """Apply ``interventions`` to every generation of ``pipe`` inside the block (composable: pass
    several; they act in the given order). ``prompts``: the prompts of the generations, one per
    image, needed by edits that name a token by its word."""
    with intervene(pipe, *interventions, prompts=prompts) as tap:
        yield tap  # the activations.hooks.Tap holding the resolved interventions
