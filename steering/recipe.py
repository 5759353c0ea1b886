"""Recipes: a model, prompts, seeds, sampling settings and interventions in one YAML file.

    recipe = Recipe(model="toy", prompts=["a red circle"], seeds=[0], steps=None, guidance=None,
                    interventions=[FeatureEdit(sae="runs/sae/x", features=[3], op="global", strength=60, when="middle")])
    recipe.save("recipe.yaml")          # diffatlas steer recipe.yaml --out outputs/steer
    before, after = run_recipe("recipe.yaml", pipe)

The one recipe of the package: ``diffatlas steer``, the explorer's edits and Python all build a
``Recipe`` and draw it with ``run_recipe``. Everything is checked before any image is drawn: the
fields and numbers on creation (``Recipe(...)``, ``Recipe.load``), what needs the model in
``Recipe.check(pipe)`` (sites, heads, widths, tokens, masks, and that each edit's steps lie in the
run). Images come from ``activations.generate.sample`` (one CPU generator per image), so the same
recipe gives the same images bit for bit from Python, the page and the command line, at the same
thread count and device (across thread counts they may differ by rounding).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from activations.intervention import Intervention, load_interventions
from common.config import MAX_SEED, MAX_STEPS
from common.errors import UsageError
from common.files import write_atomic

MAX_MAGNITUDE = 1e6  # the largest |number| a recipe takes (guidance, strengths, factors): beyond it float32 overflows
FIELDS = ("model", "prompts", "seeds", "steps", "guidance", "interventions")
OPTIONAL_FIELDS = ("inversion",)  # absent: the images are drawn from the seeds


def _import_kinds() -> None:
    # steering's kinds register on import (the entry points name them too, for installed copies)
    import steering.features  # noqa: F401
    import steering.heads  # noqa: F401
    import steering.hrv_edits  # noqa: F401


def check_number(what: str, value: Any, *, integer: bool = False, lo: float | None = None, hi: float | None = None):
    """``value`` if it is a number (an integer with ``integer``) in [lo, hi], finite and at most
    ``MAX_MAGNITUDE`` in size; otherwise a ValueError naming ``what`` and the valid range."""
    hi = MAX_MAGNITUDE if hi is None and not integer else hi
    lo = -MAX_MAGNITUDE if lo is None and not integer else lo
    show = str if integer else (lambda x: f"{x:g}")
    valid = f"{'an integer' if integer else 'a finite number'}" + (
        f" in {show(lo)}..{show(hi)}" if lo is not None and hi is not None else f" >= {show(lo)}" if lo is not None else "")
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not integer and not math.isfinite(value)):
        raise UsageError(f"{what} must be {valid}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UsageError(f"{what} must be {valid}, got {value!r}")
    return int(value) if integer else float(value)


def _check_values(what: str, value: Any, number: bool) -> None:
    """Numbers inside an intervention's field: finite everywhere, a float at most MAX_MAGNITUDE in
    size; the value of a ``float`` field a number (not a string such as YAML's ``1e308``)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UsageError(f"{what} holds NaN or infinite values")
    elif isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise UsageError(f"{what} holds NaN or infinite values")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_values(what, v, number=False)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_values(f"{what}.{k}", v, number=False)
    elif number or isinstance(value, (float, np.floating)):
        check_number(what, value)


def check_intervention_numbers(index: int, iv: Intervention) -> None:
    """Refuse NaN, infinite, huge or non-numeric numbers in one intervention's fields (a NaN strength
    or factor would draw black images without a word)."""
    for f in dataclasses.fields(iv):
        value = getattr(iv, f.name)
        if value is None or callable(value) and not isinstance(value, (torch.Tensor, np.ndarray)):
            continue
        annotation = str(f.type)
        _check_values(f"intervention {index} ({iv.kind}): {f.name}", value, number="float" in annotation)


def _absolute(spec: Any) -> Any:
    """A recipe dict's local paths (SAE and HRV folders, mask images) made absolute, so that the
    recipe replays from any folder."""
    if isinstance(spec, list):
        return [_absolute(v) for v in spec]
    if not isinstance(spec, dict):
        return spec
    out = {}
    for key, value in spec.items():
        if key in ("sae", "hrv", "image") and isinstance(value, str) and Path(value).exists():
            value = str(Path(value).resolve())
        out[key] = _absolute(value)
    return out


@dataclasses.dataclass
class Recipe:
    """What to generate and how to steer it."""

    model: str = "toy"
    """model name (toy) or a local diffusers folder"""
    prompts: list[str] = dataclasses.field(default_factory=list)
    """one image per prompt"""
    seeds: list[int] = dataclasses.field(default_factory=list)
    """one seed per prompt (empty: 0, 1, ...)"""
    steps: int | None = None
    """denoising steps, 1..MAX_STEPS (None: the model's default)"""
    guidance: float | None = None
    """classifier-free guidance scale, >= 0 (None: the model's default)"""
    interventions: list[Any] = dataclasses.field(default_factory=list)
    """steering edits (Intervention objects, or their dicts as in YAML)"""
    inversion: str | None = None
    """a folder written by `diffatlas invert`: edit its real images, drawn again from their
    inverted noise (one per prompt, in order), instead of drawing from seeds; its steps and
    guidance are the recipe's"""

    def __post_init__(self):
        from activations.generate import check_prompts

        _import_kinds()
        if not isinstance(self.model, str) or not self.model:
            raise UsageError(f"a recipe's model must be a model name or folder, got {self.model!r}")
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if not isinstance(self.prompts, (list, tuple)) or not all(isinstance(p, str) for p in self.prompts):
            raise UsageError(f"a recipe's prompts must be a list of texts, got {self.prompts!r}")
        if not self.prompts:
            raise UsageError("a recipe needs at least one prompt")
        check_prompts(self.model, list(self.prompts))  # what generate and harvest refuse: empty prompts, unknown words
        if self.seeds is None or (isinstance(self.seeds, (list, tuple)) and not self.seeds):
            self.seeds = list(range(len(self.prompts)))
        if not isinstance(self.seeds, (list, tuple)):
            raise UsageError(f"a recipe's seeds must be a list of integers, got {self.seeds!r}")
        self.seeds = [check_number(f"seed {k}", s, integer=True, lo=0, hi=MAX_SEED) for k, s in enumerate(self.seeds)]
        if len(self.seeds) != len(self.prompts):
            raise UsageError(f"a recipe needs one seed per prompt: {len(self.prompts)} prompts, {len(self.seeds)} seeds")
        if self.steps is not None:
            self.steps = check_number("steps", self.steps, integer=True, lo=1, hi=MAX_STEPS)
        if self.guidance is not None:
            self.guidance = check_number("guidance", self.guidance, lo=0)
        if self.interventions is None or not isinstance(self.interventions, (list, tuple)):
            raise UsageError(f"a recipe's interventions must be a list (of mappings with a 'kind'), got {self.interventions!r}")
        for k, iv in enumerate(self.interventions):
            if not isinstance(iv, (dict, Intervention)):
                raise UsageError(f"intervention {k} must be a mapping with a 'kind' (e.g. {{kind: feature_edit, ...}}), "
                                 f"got {iv!r}")
        self.interventions = load_interventions(list(self.interventions))
        for k, iv in enumerate(self.interventions):
            check_intervention_numbers(k, iv)
        if self.inversion is not None:
            from activations.invert import load

            inverted, _ = load(self.inversion)
            if len(inverted.latents) != len(self.prompts):
                raise UsageError(f"the inversion {self.inversion} holds {len(inverted.latents)} images; the recipe has "
                                 f"{len(self.prompts)} prompts (one per image)")
            for name, mine, theirs in (("steps", self.steps, inverted.steps), ("guidance", self.guidance, inverted.guidance)):
                if mine is not None and mine != theirs:
                    raise UsageError(f"{name} {mine} differs from the inversion's {theirs} ({self.inversion}); leave it out "
                                     "or invert again with it")
            self.inversion = str(Path(self.inversion).resolve())
            self.steps, self.guidance = inverted.steps, inverted.guidance

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"model": self.model, "prompts": list(self.prompts), "seeds": [int(s) for s in self.seeds],
                "steps": self.steps, "guidance": self.guidance,
                "interventions": [_absolute(iv.to_dict()) for iv in self.interventions],
                **({"inversion": self.inversion} if self.inversion is not None else {})}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str | Path) -> Path:
        """Write the recipe (atomically: a full file or none)."""
        path = Path(path)
        text = self.to_yaml()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(text))
        return path

    @classmethod
    def from_dict(cls, data: Any, where: str = "the recipe") -> "Recipe":
        """A recipe from its dict; every field must be there (``steps: null`` means the model's default)."""
        if not isinstance(data, dict):
            raise UsageError(f"{where} must be a mapping with the keys {', '.join(FIELDS)}; got {type(data).__name__}")
        missing = [k for k in FIELDS if k not in data]
        unknown = sorted(set(data) - set(FIELDS) - set(OPTIONAL_FIELDS))
        if unknown:
            raise UsageError(f"unknown recipe field(s) {unknown} in {where}; valid fields: {', '.join(sorted(FIELDS + OPTIONAL_FIELDS))}")
        if missing:
            raise UsageError(f"{where} lacks the field(s) {missing}; a recipe has the fields {', '.join(FIELDS)} "
                             f"(steps and guidance may be null: the model's default)")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {str(path)!r} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise UsageError(f"recipe {str(path)!r} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
        except UnicodeDecodeError:
            raise UsageError(f"recipe {str(path)!r} is not a text file") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def read(cls, source: "Recipe | dict | str | Path") -> "Recipe":
        """A Recipe from itself, its dict or its YAML file."""
        if isinstance(source, Recipe):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        return cls.load(source)

    # -- against the model ------------------------------------------------------------------------
    def settings(self, pipe) -> tuple[int, float]:
        from activations.pipeline import model_defaults

        defaults = model_defaults(pipe)
        steps = self.steps if self.steps is not None else defaults["num_inference_steps"]
        guidance = self.guidance if self.guidance is not None else defaults["guidance_scale"]
        return int(steps), float(guidance)

    def check(self, pipe) -> list[Intervention]:
        """Everything that needs the model, before any image is drawn: the interventions expanded
        (heads, tokens, HRVs, each kind's own ``check``: SAE site, width and weights), their sites and
        stages, masks on their sites' grids, and their steps inside this run's schedule. Returns the
        expanded per-site interventions that ``run_recipe`` attaches."""
        from activations.hooks import intervene
        from activations.sites import list_sites
        from steering.steer import expand

        steps, guidance = self.settings(pipe)
        if self.inversion is not None:
            from activations.families import denoiser_of
            from activations.invert import load
            from activations.pipeline import model_fingerprint

            _, meta = load(self.inversion)
            if meta["model_revision"] != model_fingerprint(denoiser_of(pipe)):
                raise UsageError(f"the inversion {self.inversion} was made with model {meta.get('model')!r} "
                                 f"(weights {meta['model_revision']}), not this model; invert the images with it")
        ts, n_train = schedule(pipe, steps)
        for k, iv in enumerate(self.interventions):
            what = f"intervention {k} ({iv.kind or type(iv).__name__})"
            try:
                chosen = iv.when.select(ts, n_train)  # refuses steps or timesteps outside the schedule
            except ValueError as err:
                raise UsageError(f"{what}: when: {err}") from None
            if not chosen:
                raise UsageError(f"{what}: when {iv.when} selects no step of this {steps}-step run (its timesteps: "
                                 f"{', '.join(map(str, ts))}); choose a window or steps inside the run")
        from steering.base import Composite

        # an edit that draws something of its own (EncodePrompt on an MMDiT) draws it at this run's settings
        runs = [iv.for_run(steps, guidance) if isinstance(iv, Composite) else iv for iv in self.interventions]
        expanded = expand(pipe, runs, self.prompts)
        with intervene(pipe, *expanded):  # attaching checks every site and stage; nothing runs
            pass
        sites = {s.name: s for s in list_sites(pipe)}  # at the pipeline call's latent and text length
        for iv in expanded:
            for field in ("mask", "region"):
                mask = getattr(iv, field, None)
                if mask is not None:
                    _check_mask(mask, sites[iv.site].resolution, f"{iv.kind or type(iv).__name__} at {iv.site}: {field}")
        return expanded


def _check_mask(mask, grid: tuple[int, int], what: str) -> None:
    try:
        mask.on_grid(*grid)
    except (OSError, SyntaxError) as err:  # PIL: a file that is not an image
        raise UsageError(f"{what}: {mask.to_spec()} cannot be read as an image ({err})") from None
    except ValueError as err:
        raise UsageError(f"{what}: {err}") from None


def schedule(pipe, steps: int) -> tuple[list[int], int]:
    """The scheduler timesteps of a ``steps``-step run and the scheduler's training timesteps
    (from a copy of the pipeline's scheduler, which is left as it is)."""
    from activations.generate import schedule as pipeline_schedule

    return pipeline_schedule(pipe, steps), int(pipe.scheduler.config.num_train_timesteps)


def run_recipe(recipe: "Recipe | dict | str | Path", pipe=None, *, before: bool = True, output_type: str = "pil"):
    """(images without steering or None, images with it): one per prompt (PIL by default).

    ``recipe``: a Recipe, its dict or its YAML file; ``pipe``: a loaded pipeline of its model
    (None: ``load_pipeline(recipe.model)``). Everything is checked before the first image."""
    recipe = Recipe.read(recipe)
    if pipe is None:
        from activations.pipeline import load_pipeline

        pipe = load_pipeline(recipe.model)
        pipe.set_progress_bar_config(disable=True)
    return draw(recipe, pipe, recipe.check(pipe), before=before, output_type=output_type)


def draw(recipe: Recipe, pipe, expanded: list[Intervention], *, before: bool = True, output_type: str = "pil"):
    """``run_recipe`` after its checks: ``expanded`` is what ``recipe.check(pipe)`` returned."""
    from activations.generate import sample
    from activations.hooks import intervene

    steps, guidance = recipe.settings(pipe)
    if recipe.inversion is not None:  # real images: drawn again from their inverted noise
        from activations.invert import load

        inverted, _ = load(recipe.inversion)
        plain = inverted.sample(pipe, recipe.prompts, output_type=output_type).images if before else None
        with intervene(pipe, *expanded):
            steered = inverted.sample(pipe, recipe.prompts, output_type=output_type).images
        return plain, steered
    args = dict(steps=steps, guidance=guidance, output_type=output_type)
    plain = sample(pipe, recipe.prompts, recipe.seeds, **args).images if before else None
    with intervene(pipe, *expanded):
        steered = sample(pipe, recipe.prompts, recipe.seeds, **args).images
    return plain, steered
