"""The ``diffatlas`` console command: one entry point, one subcommand per package.

Each subcommand's code lives in its own package; this module only dispatches to it, importing
lazily so that ``diffatlas --help`` stays fast and a subcommand never pays for another's imports.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help). The function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("activations.generate:main", "generate images from prompts and seeds (PNG files)"),
    "train": ("sae.cli:main", "train a sparse autoencoder on harvested activations (LightningCLI)"),
    "demo": ("diffatlas.demo:main", "run the whole chain on the bundled toy model"),
    "harvest": ("activations.harvest:main", "harvest U-Net activations into a resumable activation store"),
    "sites": ("activations.sites:main", "list a model's block sites and cross-attention heads"),
    "analyze": ("analysis.cli:main", "head relevance vectors and ordered weakening (hrv, weaken)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: diffatlas <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'diffatlas <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffatlas: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
