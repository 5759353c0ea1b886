"""Registry of SAE architectures: name -> SparseCoder subclass.

An architecture is one file that subclasses ``sae.sparse_coder.SparseCoder`` and decorates the class
with ``@register_architecture("name")`` (the same pattern as SAELens v6's ``register_sae_class``).
The built-in ones are imported lazily the first time a name is looked up; a user's own file only has
to be imported before ``SparseCoderConfig(architecture="name")`` is used. Neither the trainer nor the
logging knows about individual architectures: they only see the train-step contract
(``SparseCoder.train_step`` returning named losses).
"""

from __future__ import annotations

import importlib
from typing import Callable

from common.errors import UsageError

# name -> SparseCoder subclass (typed loosely: this module sits below sae.sparse_coder, which
# imports it, so it cannot import the base class back)
_REGISTRY: dict[str, type] = {}

# Built-in architectures: registry name -> module that registers it when imported.
BUILTIN: dict[str, str] = {
    "relu": "sae.relu",
    "topk": "sae.topk",
    "batchtopk": "sae.batchtopk",
    "jumprelu": "sae.jumprelu",
}


def register_architecture(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` available as architecture ``name``."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"SAE architecture {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.architecture = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_architectures() -> list[str]:
    """Names accepted by ``SparseCoderConfig.architecture``."""
    return sorted(set(BUILTIN) | set(_REGISTRY))


def get_architecture(name: str) -> type:
    """The class registered as ``name``; ValueError listing the valid names otherwise."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise UsageError(f"unknown SAE architecture {name!r}; valid: {', '.join(available_architectures())}")
    return _REGISTRY[name]
