"""``diffatlas steer <recipe.yaml> [--out DIR]``: run a recipe; write before/after grids (PNG), every
image, the recipe itself (its folders made absolute), the numerics it ran with (run.json) and a W&B
run (offline unless WANDB_MODE is set).

Everything is checked before anything is drawn or written: the recipe, the model it needs, and the
output folder, which must be new, empty, or hold an earlier run of the same recipe (rerun in place,
as a harvest resumes only its own store). Files are written whole or not at all (temp + rename);
a folder that cannot be written is one line naming it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

RUN_RECORD = "run.json"


@dataclasses.dataclass
class SteerConfig:
    recipe: str = ""
    """the recipe YAML (Recipe.save); may also be given as the first argument"""
    out: str = "outputs/steer"
    """folder for the grids, the images and the W&B run: new, empty, or an earlier run of the same recipe"""
    device: str | None = None
    """torch device (default: CUDA when available)"""
    wandb: bool = True
    """log the grid to a W&B run"""
    scale: int = 4
    """grid magnification (nearest neighbour; the toy model makes 64x64 images)"""


def check_out(out: Path, recipe) -> None:
    """Refuse an output folder that is a file, or that holds anything but a run of ``recipe``."""
    from common.errors import UsageError
    from steering.recipe import Recipe

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder; give a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    saved = out / "recipe.yaml"
    try:
        same = saved.is_file() and Recipe.load(saved).to_dict() == recipe.to_dict()
    except (ValueError, KeyError, OSError):
        same = False
    if not same:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise UsageError(f"--out {str(out)!r} is not empty and holds no run of this recipe (it holds {held}); "
                         f"give a new or empty folder")


def numerics_record(pipe) -> dict:
    """What decides the pixels besides the recipe, as an activation store records it
    (``activations.harvest.numerics``): device, dtype, CPU threads, library versions."""
    from types import SimpleNamespace

    import torch

    from activations.families import denoiser_of
    from activations.harvest import numerics
    from activations.pipeline import model_fingerprint

    denoiser = denoiser_of(pipe)  # a U-Net or an MMDiT transformer
    return {"model_revision": model_fingerprint(denoiser),
            "numerics": numerics(denoiser, SimpleNamespace(threads=torch.get_num_threads()))}


def _writing(path: Path, write) -> Path:
    """Write ``path`` atomically; a failure (read-only folder, full disk) is one line naming it."""
    from common.errors import ReportedError
    from common.files import write_atomic

    try:
        return write_atomic(path, write)
    except OSError as err:
        raise ReportedError(f"could not write {path}: {err.strerror or err}") from None


def _folder(path: Path) -> None:
    from common.errors import ReportedError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportedError(f"could not create the folder {path}: {err.strerror or err}") from None


def steer_recipe(cfg: SteerConfig, pipe=None) -> dict:
    from activations.pipeline import load_pipeline
    from common.config import check_counts
    from common.images import before_after_grid
    from steering.recipe import Recipe, draw

    check_counts(cfg, "diffatlas steer", positive=("scale",))
    recipe = Recipe.load(cfg.recipe)
    out = Path(cfg.out)
    check_out(out, recipe)
    if pipe is None:
        pipe = load_pipeline(recipe.model, device=cfg.device)
        pipe.set_progress_bar_config(disable=True)
    expanded = recipe.check(pipe)  # every check before the first file or image
    for folder in (out / "before", out / "after"):
        _folder(folder)
    text = recipe.to_yaml()
    _writing(out / "recipe.yaml", lambda p: p.write_text(text))
    record = json.dumps(numerics_record(pipe), indent=1)
    _writing(out / RUN_RECORD, lambda p: p.write_text(record))
    before, after = draw(recipe, pipe, expanded)
    for k, (a, b) in enumerate(zip(before, after)):
        _writing(out / "before" / f"{k:04d}.png", lambda p: a.save(p, format="PNG"))
        _writing(out / "after" / f"{k:04d}.png", lambda p: b.save(p, format="PNG"))
    grid = out / "before_after.png"
    picture = before_after_grid(before, after, cfg.scale)
    _writing(grid, lambda p: picture.save(p, format="PNG"))
    result = {"grid": grid, "before": out / "before", "after": out / "after", "run": out / RUN_RECORD}
    if cfg.wandb:
        from analysis.plots import log_images
        from common.quiet import quiet_libraries

        quiet_libraries(wandb=True)
        result["wandb"] = log_images({"steer/before_after": grid}, {"steer/images": len(before)}, out=out, name="steer")
    return result


def main(argv: list[str] | None = None) -> int:
    from common.config import parse

    argv = list(argv or [])
    if argv and not argv[0].startswith("-"):  # diffatlas steer recipe.yaml ...
        argv = ["--recipe", argv[0], *argv[1:]]
    cfg = parse(SteerConfig, argv, "diffatlas steer", __doc__.split("\n\n")[0])
    if not cfg.recipe:
        from common.errors import UsageError

        raise UsageError("give a recipe: diffatlas steer recipe.yaml [--out DIR]")
    result = steer_recipe(cfg)
    print(f"before/after grid (top: plain, bottom: steered): {Path(result['grid']).resolve()}")
    if result.get("wandb"):
        print(f"W&B run (offline unless WANDB_MODE is set): {result['wandb']}")
    return 0
