"""``diffatlas steer <recipe.yaml> [--out DIR]``: run a recipe; write before/after grids (PNG), every
image, the recipe itself, and a W&B run (offline unless WANDB_MODE is set)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass
class SteerConfig:
    recipe: str = ""
    """the recipe YAML (Recipe.save); may also be given as the first argument"""
    out: str = "outputs/steer"
    """folder for the grids, the images and the W&B run"""
    device: str | None = None
    """torch device (default: CUDA when available)"""
    wandb: bool = True
    """log the grid to a W&B run"""
    scale: int = 4
    """grid magnification (nearest neighbour; the toy model makes 64x64 images)"""


def steer_recipe(cfg: SteerConfig, pipe=None) -> dict:
    from activations.pipeline import load_pipeline
    from steering.recipe import Recipe, before_after_grid, run_recipe

    recipe = Recipe.load(cfg.recipe)
    if pipe is None:
        pipe = load_pipeline(recipe.model, device=cfg.device)
        pipe.set_progress_bar_config(disable=True)
    before, after = run_recipe(recipe, pipe)  # refuses edits that do not fit the model before drawing
    out = Path(cfg.out)
    (out / "before").mkdir(parents=True, exist_ok=True)
    (out / "after").mkdir(parents=True, exist_ok=True)
    recipe.save(out / "recipe.yaml")
    for k, (a, b) in enumerate(zip(before, after)):
        a.save(out / "before" / f"{k:04d}.png")
        b.save(out / "after" / f"{k:04d}.png")
    grid = out / "before_after.png"
    before_after_grid(before, after, cfg.scale).save(grid)
    result = {"grid": grid, "before": out / "before", "after": out / "after"}
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
