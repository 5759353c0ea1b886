"""benchmarks/harvest_overhead.py: its defaults time runs long enough to be stable, and the README's
command for its figures is the defaults up to the flags it names."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _benchmark():
    spec = importlib.util.spec_from_file_location("harvest_overhead", ROOT / "benchmarks" / "harvest_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_time_at_least_four_steps_in_five_interleaved_pairs():
    args = _benchmark().parser().parse_args([])
    assert args.steps >= 4 and args.repeats >= 5
    assert args.prompts >= 128


def test_readme_command_differs_from_the_defaults_in_the_repeats_only():
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"`python benchmarks/harvest_overhead\.py([^`]*)`", readme)
    parser = _benchmark().parser()
    quoted, defaults = vars(parser.parse_args(shlex.split(command))), vars(parser.parse_args([]))
    assert {k for k in defaults if quoted[k] != defaults[k]} <= {"repeats"}
