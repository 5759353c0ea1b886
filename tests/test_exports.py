"""The lazily exported package APIs: one mechanism (common.lazy), one name per object."""

from __future__ import annotations

import importlib

import pytest

LAZY_PACKAGES = ("activations", "sae", "analysis", "steering.explorer")
# names the package docstring documents as one ("``SAE`` / ``SparseCoder``")
DOCUMENTED_ALIASES = {"sae": [["SAE", "SparseCoder"]]}


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_packages_export_through_common_lazy(package):
    module = importlib.import_module(package)
    assert module.__getattr__.__module__ == "common.lazy"
    assert module.__dir__.__module__ == "common.lazy"


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_export_resolves_to_its_own_object(package):
    # an object exported under two names is an alias kept for an old API: callers should use one
    module = importlib.import_module(package)
    by_id: dict[int, list[str]] = {}
    for name in module._EXPORTS:
        by_id.setdefault(id(getattr(module, name)), []).append(name)
    assert [names for names in by_id.values() if len(names) > 1] == DOCUMENTED_ALIASES.get(package, [])
