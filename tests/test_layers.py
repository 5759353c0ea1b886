"""The layers of docs/architecture.md hold: every import points down, the toy world plugs in from
above, and no package imports itself in a circle (import-linter contracts in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_layers__every_import_contract_in_pyproject_holds():
    # lint-imports reads [tool.importlinter] from pyproject.toml in the working directory
    done = subprocess.run([sys.executable, "-m", "importlinter.cli", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0 and "No module named importlinter.cli" in done.stderr:
        done = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 4 kept, 0 broken" in done.stdout
