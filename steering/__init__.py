"""Steering: one-line interventions (SAE feature edits, HRV concept edits, head edits), applied with
``steer(pipe, ...)`` and saved in YAML recipes (``Recipe``; ``diffatlas steer recipe.yaml``)."""

from steering.features import FeatureEdit, feature_edit
from steering.heads import EncodePrompt, HeadScale
from steering.hrv_edits import HRVEdit
from steering.recipe import Recipe, run_recipe
from steering.steer import expand, steer

__all__ = ["EncodePrompt", "FeatureEdit", "HRVEdit", "HeadScale", "Recipe", "expand", "feature_edit", "run_recipe", "steer"]
