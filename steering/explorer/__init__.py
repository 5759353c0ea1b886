"""The explorer: a local web app over every cross-attention head × patch × timestep of a model,
with edits (head scaling, prompt swaps, SAE features) that export as recipes.

* ``Explorer`` (``session``): the model, its head table, generations with their attention maps
  captured once (Observe interventions at stage ``probs``), edits through the Intervention protocol;
* ``make_app`` (``server``): the FastAPI app serving ``static/explorer.html`` and the JSON API;
* an edit is a ``steering.Recipe`` (its YAML is what the page exports) drawn by
  ``steering.run_recipe``, the function that reproduces its image from the file too. SAE feature
  edits are ``steering.FeatureEdit`` (``via="splice"``).

``diffatlas explore`` runs ``server.main``.
"""

from __future__ import annotations

from common.lazy import lazy_exports

_EXPORTS = {
    "Explorer": "steering.explorer.session",
    "EditSpec": "steering.explorer.session",
    "make_app": "steering.explorer.server",
    "ExploreConfig": "steering.explorer.server",
    "Recipe": "steering.recipe",
    "run_recipe": "steering.recipe",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
