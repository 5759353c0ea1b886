"""Output files and folders, for every command: one way to write a file so that no reader (and no
full disk, no Ctrl-C) ever sees half of it, and one check of an output folder before any work.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from common.errors import UsageError


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it to ``path`` (a rename
    within a folder is atomic on POSIX): the real name holds the old file or the whole new one,
    never a partial one. The temporary file is removed if ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def out_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` if a command can write its results there, else a UsageError naming it and why (a
    file in its place, a file or a read-only folder above it), before the command does any work.
    Creates nothing, so a run refused later for other input leaves no folder behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a file, not a folder; give a new or empty folder")
    above = path
    while not above.exists():  # the nearest existing folder, where the first mkdir will happen
        above = above.parent
    if not above.is_dir():
        raise UsageError(f"{flag} {str(path)!r} cannot be made: {str(above)!r} is a file")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r} cannot be written: {str(above)!r} is not writable")
    return path


def claim_folder(path: str | os.PathLike, record: dict, name: str = "run_args.json", flag: str = "--out",
                 prog: str | None = None) -> Path:
    """Claim the output folder ``path`` for a run described by ``record`` (its settings, JSON-able):
    a new or empty folder, or one that holds a run of the same ``record`` (a rerun, which resumes or
    replaces its own files), is claimed and the record written as ``name``; a folder that holds
    anything else is refused in one line, so two runs' files never mix. Checked before any work.
    Raised as UsageError, or, given ``prog`` (a script without the dispatcher), as
    ``SystemExit("<prog>: error: ...")``."""
    try:
        return _claim(path, record, name, flag)
    except UsageError as err:
        if prog is None:
            raise
        raise SystemExit(f"{prog}: error: {err}") from None


def _claim(path, record: dict, name: str, flag: str) -> Path:
    import json

    path = out_folder(path, flag)
    text = json.dumps(record, indent=1, sort_keys=True, default=str)
    saved = path / name
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if held and not (saved.is_file() and saved.read_text() == text):
        what = "another run's settings" if saved.is_file() else f"files of something else ({', '.join(held[:5])})"
        raise UsageError(f"{flag} {str(path)!r} holds {what}; give a new or empty folder, or rerun with the "
                         f"settings in {saved.name}")
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(saved, lambda tmp: tmp.write_text(text))
    return path
