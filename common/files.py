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
    """The output folder ``path``, created and found writable, or a UsageError naming it and why,
    before the command does any work (a file in its place, a read-only parent, a path under a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a file, not a folder; give a new or empty folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"{flag} {str(path)!r} cannot be written: {err.strerror or err}") from None
    return path
