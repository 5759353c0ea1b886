"""Typed dataclass configs -> command lines and YAML, with field docstrings as the help text.

Every subcommand describes its options as a dataclass; the docstring under each field is its
``--help`` text (jsonargparse reads attribute docstrings), any option can come from a YAML file
with ``--config``, and the resolved config is saved beside the results it produced.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
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


def parse(cls: type[T], argv: list[str] | None, prog: str, description: str | None = None,
          positional: tuple[str, ...] = ()) -> T:
    """Parse ``argv`` (and any ``--config`` YAML) into an instance of the dataclass ``cls``.

    ``positional`` names the options that leading arguments stand for, in order (``("config",)``:
    ``prog run.yaml --steps 3`` is ``prog --config run.yaml --steps 3``). Bad input raises (a parse
    error or ``UsageError``): the dispatcher prints it as one line. A config with a ``check()``
    method is checked here, before the command does any work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    lead: list[str] = []
    while argv and not argv[0].startswith("-") and len(lead) < len(positional):
        lead.append(argv.pop(0))
    argv = [x for name, value in zip(positional, lead) for x in (f"--{name}", value)] + _bare_flags(cls, argv)
    parser = build_parser(cls, prog, description)
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise _type_error(err) from None
    values = parser.instantiate(namespace)
    cfg = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
    if callable(getattr(cfg, "check", None)):
        cfg.check()
    return cfg


_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a text", "bool": "true or false", "NoneType": "null"}


def _type_error(err: Exception) -> Exception:
    """jsonargparse's multi-line type error (``Parser key "steps": ... Expected a <class 'int'> ...
    Given value: many``) as ``--steps must be an integer or null, got 'many'``; other parse errors
    as they are."""
    import re

    from common.errors import UsageError

    text = str(err)
    key = re.match(r'Parser key "([^"]+)":', text)
    got = re.search(r"(?:Given value|Got value): (.*)$", text, re.S)
    wanted = list(dict.fromkeys(re.findall(r"Expected a <class '(\w+)'>", text)))
    choices = re.search(r"Expected a typing\.Literal\[(.*?)\]", text)
    if key and got and choices:  # a Literal option: name the valid choices
        valid = ", ".join(c.strip().strip("'\"") for c in choices.group(1).split(","))
        return UsageError(f"--{key.group(1)} must be one of {valid}, got {got.group(1).strip()!r}")
    if not (key and got and wanted) or any(w not in _TYPE_NAMES for w in wanted):
        return err
    value = got.group(1).strip()
    return UsageError(f"--{key.group(1)} must be {' or '.join(_TYPE_NAMES[w] for w in wanted)}, got {value!r}")


def _bare_flags(cls: type, argv: list[str]) -> list[str]:
    """``--json`` alone for a bool option means ``--json true`` (as with argparse's store_true)."""
    flags = {f"--{name}" for name, hint in typing.get_type_hints(cls).items() if hint is bool}
    out: list[str] = []
    for k, arg in enumerate(argv):
        out.append(arg)
        if arg in flags and (k + 1 == len(argv) or argv[k + 1].startswith("--")):
            out.append("true")
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> Path:
    """Write the resolved config as YAML (the file ``--config`` reads back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


MAX_STEPS = 1000
"""The most denoising steps any command accepts: the schedulers of every supported model are trained
on 1000 timesteps, so a run of more steps has no timestep of its own to take."""

MAX_SEED = 2**63 - 1
"""The largest seed any command accepts: torch.Generator.manual_seed's range (every image's noise
comes from one, see activations.generate.generators), so a larger seed fails mid-run, after the
model has loaded."""


def check_counts(cfg, prog: str | None = None, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 at_least: dict[str, int] | None = None, numbers: dict[str, float | None] | None = None,
                 at_most: dict[str, int] | None = None, seeds: tuple[str, ...] = ()) -> None:
    """Refuse a count or number option out of range in one line naming it, before any work.

    ``positive`` / ``non_negative`` / ``at_least`` ({name: floor}): integers >= 1 / >= 0 / >= floor;
    ``seeds``: integers in 0..MAX_SEED; ``numbers`` ({name: floor or None}): finite numbers (NaN and
    inf refused) >= floor; ``at_most`` ({name: ceiling}): an upper bound of any of them. A name may be
    dotted (``prompts.num_prompts``); None (an optional option left at "the default") passes; a list
    (``seeds``) must be non-empty with every element in range. The message is ``--<name> must be
    ...``; raised as ``UsageError`` (the dispatcher prints it) or, given ``prog`` (a standalone script
    without the dispatcher), as ``SystemExit("<prog>: error: ...")``."""
    import math

    from common.errors import UsageError

    at_most = {**{n: MAX_SEED for n in seeds}, **(at_most or {})}
    checks = [(n, 1, True) for n in positive] + [(n, 0, True) for n in (*non_negative, *seeds)]
    checks += [(n, floor, True) for n, floor in (at_least or {}).items()]
    checks += [(n, floor, False) for n, floor in (numbers or {}).items()]
    for name, floor, integer in checks:
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        ceiling = at_most.get(name)
        what = " and ".join(x for x in ("an integer" if integer else "a finite number",
                                        f">= {floor:g}" if floor is not None else "",
                                        f"<= {ceiling}" if ceiling is not None else "") if x).replace(" and >=", " >=")
        several = isinstance(value, (list, tuple))
        items = list(value) if several else [value]
        if several and not items:
            what = "a non-empty list"
        for item in items or [None]:
            ok = item is not None and not isinstance(item, bool) and (
                isinstance(item, int) if integer else isinstance(item, (int, float)) and math.isfinite(item))
            ok = ok and (floor is None or item >= floor) and (ceiling is None or item <= ceiling)
            if not ok:
                message = f"--{name} must be {what}, got {item if several and items else value!r}"
                raise SystemExit(f"{prog}: error: {message}") if prog else UsageError(message)
