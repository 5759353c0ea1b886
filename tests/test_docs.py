"""The docs agree with the code: cited documents exist, and the README's command table lists every command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "activations", "sae", "analysis", "steering", "diffatlas", "toyworld")


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_every_document_the_sources_cite_is_in_the_repository():
    missing = []
    for package in PACKAGES:
        for source in sorted((ROOT / package).rglob("*.py")):
            for cited in re.findall(r"[\w./-]*\w\.md\b", source.read_text()):
                if not (ROOT / cited).is_file() and not (source.parent / cited).is_file():
                    missing.append(f"{source.relative_to(ROOT)}: {cited}")
    assert not missing, missing


def test_readme_command_table_has_a_row_for_every_command_and_analyze_subcommand():
    from analysis.cli import SUBCOMMANDS
    from diffatlas.cli import COMMANDS

    rows = re.findall(r"^\| `diffatlas (\w+)(?: (\w+))?", _readme_section("The command line"), flags=re.M)
    commands = {name for name, _ in rows}
    analyze = {sub for name, sub in rows if name == "analyze"}
    assert set(COMMANDS) - commands == set()
    assert set(SUBCOMMANDS) - analyze == set()


def test_readme_layout_promises_nothing_as_next():
    assert "(next)" not in _readme_section("Layout")
