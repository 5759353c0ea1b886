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


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_to_a_heading_of_the_manual_or_the_findings_finds_it():
    docs = {p: p.read_text() for p in (ROOT / "README.md", ROOT / "docs" / "findings.md", ROOT / "steering" / "README.md")}
    heads = {p: {_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)} for p, text in docs.items()}
    broken = []
    for p, text in docs.items():
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
            doc = (p.parent / target).resolve() if target else p
            if doc in heads and anchor not in heads[doc]:
                broken.append(f"{p.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, broken
