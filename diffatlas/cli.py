"""The ``diffatlas`` console command: one entry point, one subcommand per package.

Each subcommand's code lives in its own package; this module only dispatches to it, importing
lazily so that ``diffatlas --help`` stays fast and a subcommand never pays for another's imports.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> ("module:function", one-line help). The function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("activations.generate:main", "generate images from prompts and seeds (PNG files)"),
    "train": ("sae.cli:main", "train a sparse autoencoder on harvested activations (LightningCLI)"),
    "demo": ("diffatlas.demo:main", "run the whole chain on the bundled toy model"),
    "harvest": ("activations.harvest:main", "harvest activations of generated or real images into a resumable activation store"),
    "invert": ("activations.invert:main", "invert real images to the noise their model draws them again from (for steering them)"),
    "sites": ("activations.sites:main", "list a model's block sites and cross-attention heads"),
    "analyze": ("analysis.cli:main", "head relevance vectors, ordered weakening and SAE feature analysis (hrv, weaken, features)"),
    "steer": ("steering.cli:main", "run a steering recipe: before/after grids and a W&B run"),
    "explore": ("steering.explorer.server:main", "a local web app over every head x patch x step, with edits that become recipes"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: diffatlas <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'diffatlas <command> --help' for a command's options."]
    return "\n".join(lines)


def _debug(argv: list[str]) -> tuple[list[str], bool]:
    """Strip ``--debug`` from anywhere on the command line; it or DIFFATLAS_DEBUG=1 asks for tracebacks."""
    debug = "--debug" in argv or os.environ.get("DIFFATLAS_DEBUG", "") not in ("", "0")
    return [a for a in argv if a != "--debug"], debug


def main(argv: list[str] | None = None) -> int:
    argv, debug = _debug(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffatlas: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from common.errors import is_user_error, one_line
    from common.quiet import quiet_libraries

    quiet_libraries()
    module_name, func_name = COMMANDS[name][0].split(":")
    where = name
    try:
        module = importlib.import_module(module_name)
        if rest and rest[0] in getattr(module, "SUBCOMMANDS", {}):  # diffatlas analyze hrv: error: ...
            where = f"{name} {rest[0]}"
        return int(getattr(module, func_name)(rest) or 0)
    except BrokenPipeError:
        # the reader went away (``diffatlas sites sd-1.4 | head``): stop quietly, as Unix tools do;
        # stdout goes to devnull so that the interpreter's final flush does not fail again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (tests)
            pass
        return 141
    except KeyboardInterrupt as stop:
        # Ctrl-C is one line for every command: no traceback of wherever it landed. A command may
        # add a note saying what was kept (harvest: the finished shards a rerun resumes).
        if debug:
            raise
        print("; ".join([f"diffatlas {where}: interrupted", *getattr(stop, "__notes__", [])]), file=sys.stderr)
        return 130
    except Exception as err:
        # Bad input is the user's to fix: the message alone. Anything else is a bug of ours and
        # keeps its traceback, so a stray ValueError is never mistaken for bad input.
        if debug or not is_user_error(err):
            raise
        print(f"diffatlas {where}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
