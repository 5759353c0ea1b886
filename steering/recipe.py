"""Recipes: a model, prompts, seeds, sampling settings and interventions in one YAML file.

    recipe = Recipe(model="toy", prompts=["a red circle"], seeds=[0],
                    interventions=[FeatureEdit(sae="runs/sae/x", features=[3], op="global", strength=60, when="middle")])
    recipe.save("recipe.yaml")          # diffatlas steer recipe.yaml --out outputs/steer
    before, after = run_recipe(Recipe.load("recipe.yaml"), pipe)

Images come from ``activations.generate.sample`` (one CPU generator per image), so the same
recipe gives the same images bit for bit from Python and from the command line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from activations.intervention import load_interventions


def _import_kinds() -> None:
    # steering's kinds register on import (the entry points name them too, for installed copies)
    import steering.features  # noqa: F401
    import steering.heads  # noqa: F401
    import steering.hrv_edits  # noqa: F401


@dataclasses.dataclass
class Recipe:
    """What to generate and how to steer it."""

    model: str = "toy"
    """model name (toy) or a local diffusers folder"""
    prompts: list[str] = dataclasses.field(default_factory=list)
    """one image per prompt"""
    seeds: list[int] = dataclasses.field(default_factory=list)
    """one seed per prompt (default 0, 1, ...)"""
    steps: int | None = None
    """denoising steps (None: the model's default)"""
    guidance: float | None = None
    """classifier-free guidance scale (None: the model's default)"""
    interventions: list[Any] = dataclasses.field(default_factory=list)
    """steering edits (Intervention objects, or their dicts as in YAML)"""

    def __post_init__(self):
        _import_kinds()
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if not self.prompts:
            raise ValueError("a recipe needs at least one prompt")
        if not self.seeds:
            self.seeds = list(range(len(self.prompts)))
        if len(self.seeds) != len(self.prompts):
            raise ValueError(f"a recipe needs one seed per prompt: {len(self.prompts)} prompts, {len(self.seeds)} seeds")
        self.interventions = load_interventions(list(self.interventions))

    def to_dict(self) -> dict:
        return {"model": self.model, "prompts": list(self.prompts), "seeds": [int(s) for s in self.seeds],
                "steps": self.steps, "guidance": self.guidance,
                "interventions": [iv.to_dict() for iv in self.interventions]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown recipe field(s) {sorted(unknown)} in {path}; valid fields: {', '.join(sorted(names))}")
        return cls(**data)

    def settings(self, pipe) -> tuple[int, float]:
        from activations.pipeline import model_defaults

        defaults = model_defaults(pipe)
        steps = self.steps if self.steps is not None else defaults["num_inference_steps"]
        guidance = self.guidance if self.guidance is not None else defaults["guidance_scale"]
        return int(steps), float(guidance)


def run_recipe(recipe: Recipe, pipe, *, before: bool = True, output_type: str = "pil"):
    """(images without steering or None, images with it): one per prompt (PIL by default)."""
    from activations.generate import sample
    from activations.hooks import intervene
    from steering.steer import expand

    # checked against the model (an SAE of other weights or width, ...) before anything is drawn
    edits = expand(pipe, recipe.interventions, recipe.prompts)
    steps, guidance = recipe.settings(pipe)
    draw = dict(steps=steps, guidance=guidance, output_type=output_type)
    plain = sample(pipe, recipe.prompts, recipe.seeds, **draw).images if before else None
    with intervene(pipe, *edits):
        steered = sample(pipe, recipe.prompts, recipe.seeds, **draw).images
    return plain, steered


def before_after_grid(before, after, scale: int = 1):
    """One PNG-ready picture: the plain images on the top row, the steered ones below."""
    from PIL import Image

    w, h = before[0].size
    grid = Image.new("RGB", (w * len(before), 2 * h), "white")
    for k, (a, b) in enumerate(zip(before, after)):
        grid.paste(a.convert("RGB"), (k * w, 0))
        grid.paste(b.convert("RGB"), (k * w, h))
    return grid if scale == 1 else grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


