"""The YAML configs that ship with diffatlas: model families, concept lists, example recipes.

They are package data in ``common/configs/``, read through ``importlib.resources`` so that an
installed wheel finds them as well as a checkout does. ``configs/`` at the top of a checkout links
there, so the paths the README gives (``diffatlas harvest configs/harvest/toy.yaml``) name the same
files.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def configs(kind: str) -> dict[str, Traversable]:
    """The shipped YAML configs of one kind (``models``, ``concepts``, ...): name -> file, by name."""
    folder = resources.files("common") / "configs" / kind
    files = [f for f in folder.iterdir() if f.name.endswith(".yaml")] if folder.is_dir() else []
    return {f.name[: -len(".yaml")]: f for f in sorted(files, key=lambda f: f.name)}

