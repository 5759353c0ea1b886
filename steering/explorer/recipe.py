"""Recipes: an intervention made in the explorer as a YAML file that reproduces its image.

A recipe has exactly the keys ``model, prompts, seeds, steps, guidance, interventions`` (the
interventions as ``Intervention.to_dict()``), the same fields as the steering recipes of
``diffatlas steer``. ``run_recipe`` is the one function that applies one: it loads the
interventions, attaches them with ``intervene`` and draws the images with ``sample`` (one CPU
generator per seed), so the page's image and the recipe's are the same bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import UsageError

RECIPE_KEYS = ("model", "prompts", "seeds", "steps", "guidance", "interventions")


def make_recipe(model: str, prompt: str, seed: int, steps: int, guidance: float, interventions: list) -> dict[str, Any]:
    """A recipe dict for one image; ``interventions`` are Intervention objects or their dicts."""
    dicts = [iv if isinstance(iv, dict) else iv.to_dict() for iv in interventions]
    return {"model": model, "prompts": [prompt], "seeds": [int(seed)], "steps": int(steps), "guidance": float(guidance),
            "interventions": dicts}


def recipe_yaml(recipe: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=120)


def read_recipe(source: str | Path | dict) -> dict[str, Any]:
    """A recipe dict from a YAML file or a dict; refuses missing or unknown keys."""
    if isinstance(source, (str, Path)):
        import yaml

        source = yaml.safe_load(Path(source).read_text()) or {}
    if not isinstance(source, dict):
        raise UsageError(f"a recipe is a mapping with keys {', '.join(RECIPE_KEYS)}; got {type(source).__name__}")
    missing = [k for k in RECIPE_KEYS if k not in source]
    unknown = [k for k in source if k not in RECIPE_KEYS]
    if missing or unknown:
        raise UsageError(f"recipe keys: missing {missing}, unknown {unknown}; valid keys: {', '.join(RECIPE_KEYS)}")
    if len(source["prompts"]) != len(source["seeds"]):
        raise UsageError(f"a recipe needs one seed per prompt: {len(source['prompts'])} prompts, {len(source['seeds'])} seeds")
    return source


def run_recipe(source: str | Path | dict, pipe=None, output_type: str = "pil"):
    """Apply a recipe through ``steering.recipe.run_recipe`` (the one path from a recipe to an
    image: ``steer`` → ``intervene`` → ``sample``), so the page, ``diffatlas steer`` and Python agree.

    ``pipe``: a loaded pipeline of the recipe's model (None: ``load_pipeline(recipe["model"])``).
    Returns the steered images.
    """
    from steering.recipe import Recipe
    from steering.recipe import run_recipe as run_steering_recipe

    recipe = read_recipe(source)
    if pipe is None:
        from activations.pipeline import load_pipeline

        pipe = load_pipeline(recipe["model"])
        pipe.set_progress_bar_config(disable=True)
    _, steered = run_steering_recipe(Recipe(**recipe), pipe, before=False, output_type=output_type)
    return steered
