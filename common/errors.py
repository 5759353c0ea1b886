"""Errors that are the user's input rather than a bug in diffatlas.

The ``diffatlas`` dispatcher prints such an error as one line (``diffatlas <command>: error:
<message>``, exit code 2) instead of a traceback; ``--debug`` or ``DIFFATLAS_DEBUG=1`` shows the
traceback. Commands raise them and need no try/except of their own. Any other exception is a bug
of ours and keeps its traceback, so a plain ``ValueError`` or ``KeyError`` is never taken for bad
input.
"""

from __future__ import annotations

import errno


class ReportedError(Exception):
    """Base of errors the command line reports as one line although they are not bad values
    (e.g. a store that cannot be used, ``activations.store.StoreError``)."""


class UsageError(ValueError):
    """Bad input: an option out of range, an unknown name, a file or store that cannot be used.

    The message names the bad value and the valid choices; it is all the user sees. A ValueError,
    so library callers that catch ValueError keep working."""


class UnknownNameError(UsageError, KeyError):
    """A name the user gave (a site, a concept, a model) that is not among the valid ones. A
    KeyError too, for library callers that look names up."""

    def __str__(self) -> str:  # the message as written, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types the dispatcher reports as one line: bad input (``UsageError``), unusable
    stores (``ReportedError``), a file the user named that is missing, and command-line parse
    errors. Imported lazily: only an error pays for the imports."""
    import argparse

    types: list[type[BaseException]] = [UsageError, ReportedError, FileNotFoundError, argparse.ArgumentError]
    try:
        from jsonargparse import ArgumentError as JsonArgumentError

        types.append(JsonArgumentError)
    except ImportError:  # pragma: no cover - jsonargparse is a dependency
        pass
    return tuple(types)


# What the machine refused rather than what the code got wrong: a full disk or quota, a read-only
# or unwritable place, a folder where a file should be. Reported as one line naming the file.
_PLACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                           errno.ENOTDIR, errno.EEXIST})


def is_user_error(err: BaseException) -> bool:
    """Does the dispatcher report ``err`` as one line? ``user_error_types``, or an OSError about a
    named file that the machine refused (``_PLACE_ERRNOS``); any other exception is a bug of ours."""
    if isinstance(err, user_error_types()):
        return True
    return isinstance(err, OSError) and err.errno in _PLACE_ERRNOS and err.filename is not None


def one_line(err: BaseException) -> str:
    """The error's message on one line (a KeyError's str() would add quotes around it; an OSError's
    its errno)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


def run_script(main, script: str) -> int:
    """Run a script's ``main()`` as the ``diffatlas`` dispatcher runs a command: Ctrl-C is one line
    (``<script>: interrupted``, exit 130) and bad input one line (``<script>: error: ...``, exit 2),
    with no traceback; any other exception is a bug and keeps its traceback. For the benchmarks."""
    import sys
    from pathlib import Path

    prog = Path(script).name
    try:
        code = main()
        return code if isinstance(code, int) else 0  # a main may return its results
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
