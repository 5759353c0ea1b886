"""The layers of docs/architecture.md hold: every import points down, the toy world plugs in from
above, and no package imports itself in a circle (import-linter contracts in pyproject.toml)."""

from __future__ import annotations

import os
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_layers__every_import_contract_in_pyproject_holds(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # import-linter reads [tool.importlinter] from ./pyproject.toml
    code = lint_imports(no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Contracts: 4 kept, 0 broken" in out


def test_layers__the_contracts_cover_every_package():
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())
    text = (ROOT / "pyproject.toml").read_text()
    for name in packages:
        assert f'"{name}"' in text.split("[tool.importlinter]")[1], f"package {name} is in no import contract"
    assert os.path.exists(ROOT / "docs" / "architecture.md")
