"""Plugins: models and prompt sources that other packages register by name.

``activations`` knows how to load any diffusers pipeline and how to read prompts from a file, a
list or a `datasets` dataset; a package above it adds names of its own without being imported by
it. ``toyworld`` registers the bundled model ``toy`` and the prompt source ``toyworld`` this way;
a user's package does the same, either in its ``pyproject.toml``::

    [project.entry-points."diffatlas.models"]
    my-model = "my_package.plugin:MODEL"            # a ModelPlugin

    [project.entry-points."diffatlas.prompt_sources"]
    my-prompts = "my_package.plugin:MyPromptSource"  # a PromptSourcePlugin subclass

or at run time with ``register_model("my-model", ModelPlugin(...))`` /
``register_prompt_source("my-prompts", MyPromptSource)``. Entry points are read the first time a
name is looked up.

A model whose world is known for certain (the toy world: the scene behind every image, a pixel
oracle) also offers a ``WorldTruth`` through its plugin (``ModelPlugin.truth``): the analyses and
steering measure against it by asking ``world_truth(model)``, and never import the world itself.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from importlib import metadata
from typing import Any

from common.errors import UsageError

MODELS = "diffatlas.models"
PROMPT_SOURCES = "diffatlas.prompt_sources"

_registry: dict[str, dict[str, Any]] = {MODELS: {}, PROMPT_SOURCES: {}}
_loaded: set[str] = set()


@dataclasses.dataclass(frozen=True)
class ModelPlugin:
    """A named model.

    load(device, dtype) -> pipeline; build_denoiser(seed) -> its denoiser (a U-Net or an MMDiT) with random
    weights (for ``diffatlas sites`` and structural tests); check_prompt(text) raises ValueError
    for prompts the model cannot read (a closed vocabulary), naming the bad words.
    """

    load: Callable[..., Any]
    build_denoiser: Callable[..., Any] | None = None
    check_prompt: Callable[[str], Any] | None = None
    description: str = ""
    truth: Callable[[], "WorldTruth"] | None = None
    """() -> the model's WorldTruth, for models whose images have a known truth (imported on use)"""


class WorldTruth:
    """What a model's world knows for certain about its images (``ModelPlugin.truth``).

    ``scorer()``: a scorer for the ordered weakening (``analysis.weakening``) with ``ylabel``,
    ``check(concepts)``, ``prompts(concept, n, seed) -> [(text, target)]`` and
    ``score(concept, images, targets) -> [float]``;
    ``concept_values()``: every (attribute, value) a patch can show, in a fixed order;
    ``scene(store_root, image)``: the truth saved beside image ``image`` of a harvest;
    ``patch_targets(store_root, meta, grid)``: bool [rows, values], does each stored row's patch
    (``meta``'s image, i, j on a ``grid``) show each value of ``concept_values()``;
    ``object_coverage(text, grid)``: float [grid, grid], the share of each patch that an object of
    the image ``text`` describes covers.
    """

    def scorer(self):
        raise NotImplementedError

    def concept_values(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def scene(self, store_root, image: int):
        raise NotImplementedError

    def patch_targets(self, store_root, meta, grid: tuple[int, int]):
        raise NotImplementedError

    def object_coverage(self, text: str, grid: int):
        raise NotImplementedError


class PromptSourcePlugin:
    """A named prompt source: ``cls(config, seed)`` with ``config`` the harvest's ``prompts``
    section (its ``num_prompts`` and any fields it documents). Prompts are a pure function of
    (seed, index), so ranks and reruns agree."""

    def __init__(self, config, seed: int = 0):
        self.config, self.seed = config, seed

    def __len__(self) -> int:
        raise NotImplementedError

    def text(self, index: int) -> str:
        raise NotImplementedError

    def ground_truth(self, index: int) -> dict | None:
        """JSON-able ground truth of prompt ``index``, saved beside its image (None: none)."""
        return None

    def truth_image(self, index: int):
        """An RGB uint8 array of what prompt ``index`` should look like, saved beside its image."""
        return None


def _register(group: str, name: str, obj: Any) -> None:
    existing = _registry[group].get(name)
    if existing is not None and existing is not obj:
        raise ValueError(f"{group} name {name!r} is already registered")
    _registry[group][name] = obj


def register_model(name: str, plugin: ModelPlugin) -> None:
    _register(MODELS, name, plugin)


def register_prompt_source(kind: str, cls: type[PromptSourcePlugin]) -> None:
    _register(PROMPT_SOURCES, kind, cls)


def _load(group: str) -> None:
    if group in _loaded:
        return
    _loaded.add(group)
    for ep in metadata.entry_points(group=group):
        if ep.name not in _registry[group]:
            _registry[group][ep.name] = ep.load()


def names(group: str) -> list[str]:
    _load(group)
    return sorted(_registry[group])


def lookup(group: str, name: str, default: Any = None) -> Any:
    """The plugin registered as ``name`` (entry points included), or ``default``."""
    if name not in _registry[group]:
        _load(group)
    return _registry[group].get(name, default)


def model_plugin(name: str) -> ModelPlugin | None:
    return lookup(MODELS, str(name))


def world_truth(model: str) -> WorldTruth:
    """The WorldTruth of model ``model``; a ValueError naming the models that have one otherwise."""
    plugin = model_plugin(model)
    if plugin is None or plugin.truth is None:
        have = [n for n in names(MODELS) if getattr(lookup(MODELS, n), "truth", None) is not None]
        raise UsageError(f"model {model!r} has no ground truth to measure against; models with one: {', '.join(have) or 'none'}")
    return plugin.truth()


def prompt_source(kind: str) -> type[PromptSourcePlugin]:
    cls = lookup(PROMPT_SOURCES, kind)
    if cls is None:
        raise UsageError(unknown(kind, "prompt source", ["file", "dataset", "list", *names(PROMPT_SOURCES)]))
    return cls


def unknown(name: str, what: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(name), valid, n=2)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; valid: {', '.join(valid)}"
