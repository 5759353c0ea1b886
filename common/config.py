"""Typed dataclass configs -> command lines and YAML, with field docstrings as the help text.

Every subcommand describes its options as a dataclass; the docstring under each field is its
``--help`` text (jsonargparse reads attribute docstrings), any option can come from a YAML file
with ``--config``, and the resolved config is saved beside the results it produced.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

set_parsing_settings(docstring_parse_attribute_docstrings=True)

T = TypeVar("T")


def build_parser(cls: type, prog: str, description: str | None = None) -> ArgumentParser:
    # Parse errors raise: the ``diffatlas`` dispatcher prints them as one line, not the whole usage.
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(cls, as_group=False)
    return parser


def parse(cls: type[T], argv: list[str] | None, prog: str, description: str | None = None) -> T:
    """Parse ``argv`` (and any ``--config`` YAML) into an instance of the dataclass ``cls``."""
    parser = build_parser(cls, prog, description)
    values = parser.instantiate(parser.parse_args(argv))
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> Path:
    """Write the resolved config as YAML (the file ``--config`` reads back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def check_counts(cfg, prog: str, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Refuse a count option below its floor (1 for ``positive``, 0 for ``non_negative``), or not an
    integer, in one line naming it, before any work: ``<prog>: error: --<name> must be ...``."""
    for names, floor in ((positive, 1), (non_negative, 0)):
        for name in names:
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < floor:
                raise SystemExit(f"{prog}: error: --{name} must be an integer >= {floor}, got {value!r}")
