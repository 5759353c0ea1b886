"""How faithfully the bundled toy model draws what a caption says, and how freely the noise draws
what it leaves unsaid.

    python benchmarks/toy_fidelity.py [--one_object 300] [--two_objects 250] [--noise_captions 8]
                                      [--noise_seeds 32] [--steps 25]
    python benchmarks/toy_fidelity.py --model toy-mmdit      # the toy MMDiT

1. The caption decides: every prompt names everything and holds an object description (shape,
   colour, texture, position) that no training caption names in full. Each image is read back by
   the pixel oracle and compared with its scene.
2. The noise decides: for each attribute, ``noise_captions`` held-out one-object captions name
   everything but that attribute, each drawn with ``noise_seeds`` seeds. Per caption, the
   normalised entropy of the values the oracle reads (1: uniform over the attribute's values; the
   plug-in estimate, which sits a little below 1 for a uniform draw of 32) is averaged over the
   captions. The attributes those captions do name are scored as in 1 (``named_kept``).
3. Coverage: the mean fraction of the image one object fills, by size, in the world's renders of
   the prompts' scenes and in the generated images (the oracle's foreground).

Writes sample grids and per-image results beside the JSON; the last line of output is the JSON:
{"model", "n", "one_object": {attribute: accuracy}, "two_objects_all_correct", "coverage", ...,
"named_kept": {attribute: accuracy}, "noise_decides": {attribute: entropy}}.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from activations.generate import generate
from activations.pipeline import load_pipeline, model_defaults
from common.config import check_counts, parse, save_config
from toyworld.grid import labelled_grid
from toyworld.oracle import CHECKS, REPORTED, check_image, foreground, read_background, read_scene
from toyworld.prompts import Named, scene_to_prompt
from toyworld.render import render
from toyworld.scene import Scene, sample_scene
from toyworld.vocab import ATTRIBUTES, OBJECT_ATTRIBUTES


@dataclass
class FidelityConfig:
    model: str = "toy"
    """Model to measure (a toy-world model)."""
    one_object: int = 300
    """One-object held-out prompts."""
    two_objects: int = 250
    """Two-object prompts, each with at least one held-out object."""
    noise_captions: int = 8
    """Held-out one-object captions per attribute that leave that attribute unnamed."""
    noise_seeds: int = 32
    """Seeds per such caption."""
    steps: int = 25
    """Sampling steps."""
    guidance: float | None = None
    """Guidance scale (default: the model's)."""
    batch_size: int = 50
    """Images per pipeline call."""
    seed: int = 1234
    """Seed of the scenes, prompts and noise (training used other seeds)."""
    split: str = "test"
    """'test': held-out prompts (the benchmark); 'train': training descriptions (for tuning guidance)."""
    out: str = "outputs/toy_fidelity"
    """Folder for the sample grid and per-image results."""
    device: str | None = None
    """torch device (default: CUDA when available)."""


def read_values(image: np.ndarray) -> dict[str, str]:
    """Every attribute the oracle reads from a one-object image: background and style always, the
    object's attributes only when it finds exactly one object."""
    style, background = read_background(image)
    values = {"background": background, "style": style}
    try:
        objects = read_scene(image).objects
    except ValueError:  # no object
        return values
    if len(objects) == 1:
        values.update({name: getattr(objects[0], name) for name in OBJECT_ATTRIBUTES})
    return values


def truth_values(scene: Scene) -> dict[str, str]:
    return {"background": scene.background, "style": scene.style,
            **{name: getattr(scene.objects[0], name) for name in OBJECT_ATTRIBUTES}}


def normalised_entropy(values: list[str], attribute: str) -> float:
    """Plug-in entropy of the read values over log(number of the attribute's values)."""
    counts = np.array([values.count(v) for v in ATTRIBUTES[attribute]], dtype=np.float64)
    if counts.sum() == 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(ATTRIBUTES[attribute]))) + 0.0  # no -0.0


def value_grid(rows: list[tuple[str, list[np.ndarray], list[str]]], scale: int = 2):
    """One row per caption: its images, each with the value the oracle read, the caption above."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tile = rows[0][1][0].shape[0] * scale
    columns = max(len(images) for _, images, _ in rows)
    row_h = 14 + tile + 14
    grid = Image.new("RGB", (columns * (tile + 4) + 4, len(rows) * row_h), "white")
    draw = ImageDraw.Draw(grid)
    for r, (caption, images, labels) in enumerate(rows):
        y = r * row_h
        draw.text((4, y + 1), caption, fill="black", font=font)
        for c, (image, label) in enumerate(zip(images, labels)):
            x = 4 + c * (tile + 4)
            grid.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (x, y + 14))
            draw.text((x, y + 14 + tile + 1), label, fill="darkblue", font=font)
    return grid


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(FidelityConfig, argv, "toy_fidelity", __doc__.split("\n\n")[0])
    check_counts(cfg, "toy_fidelity", positive=("steps", "batch_size"),
                 non_negative=("one_object", "two_objects", "noise_captions", "noise_seeds"))
    if cfg.guidance is not None and not (np.isfinite(cfg.guidance) and cfg.guidance >= 1):
        raise SystemExit(f"toy_fidelity: error: --guidance must be a finite number >= 1, got {cfg.guidance}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    rng = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng, num_objects=1, split=cfg.split) for _ in range(cfg.one_object)]
    scenes += [sample_scene(rng, num_objects=2, split=cfg.split) for _ in range(cfg.two_objects)]
    prompts = [scene_to_prompt(s, rng) for s in scenes]
    # captions that leave one attribute unnamed, each drawn with noise_seeds seeds
    unnamed = [(attribute, sample_scene(rng, num_objects=1, split=cfg.split))
               for attribute in ATTRIBUTES for _ in range(cfg.noise_captions)]
    unnamed = [(a, s, scene_to_prompt(s, rng, Named.all_but(s, a))) for a, s in unnamed]

    pipe = load_pipeline(cfg.model, device=cfg.device)
    pipe.set_progress_bar_config(disable=True)
    guidance = cfg.guidance if cfg.guidance is not None else model_defaults(pipe)["guidance_scale"]
    started = time.perf_counter()
    jobs = [(prompt, cfg.seed + k) for k, prompt in enumerate(prompts)]
    jobs += [(prompt, cfg.seed + 100_000 + seed) for _, _, prompt in unnamed for seed in range(cfg.noise_seeds)]
    images = [np.asarray(image) for _, _, image in generate(pipe, jobs, cfg.steps, guidance, cfg.batch_size)]
    seconds = time.perf_counter() - started
    named_images, noise_images = images[: len(prompts)], images[len(prompts) :]

    rows = []
    for scene, prompt, image in zip(scenes, prompts, named_images):
        checks = check_image(scene, image)
        rows.append({"prompt": prompt, "objects": len(scene.objects), **checks})
    noise_rows = []
    for k, (attribute, scene, prompt) in enumerate(unnamed):
        truth = truth_values(scene)
        for seed in range(cfg.noise_seeds):
            read = read_values(noise_images[k * cfg.noise_seeds + seed])
            noise_rows.append({"prompt": prompt, "unnamed": attribute, "caption": k, "seed": seed,
                               "read": read.get(attribute),
                               "named_right": {a: read.get(a) == v for a, v in truth.items() if a != attribute}})
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows + noise_rows)
    if rows:
        grid, _ = labelled_grid(named_images[:8] + named_images[cfg.one_object : cfg.one_object + 8],
                                scenes[:8] + scenes[cfg.one_object : cfg.one_object + 8],
                                prompts[:8] + prompts[cfg.one_object : cfg.one_object + 8])
        grid.save(out / "samples.png")
    if noise_rows:  # the first caption of each attribute, its first 8 seeds, each with the value read
        shown = [k * cfg.noise_captions for k in range(len(ATTRIBUTES))]
        value_grid([(f"{unnamed[k][0]} unnamed: {unnamed[k][2]}",
                     noise_images[k * cfg.noise_seeds : k * cfg.noise_seeds + 8],
                     [str(r["read"]) for r in noise_rows[k * cfg.noise_seeds : k * cfg.noise_seeds + 8]])
                    for k in shown]).save(out / "noise_samples.png")

    one = [r for r in rows if r["objects"] == 1]
    two = [r for r in rows if r["objects"] == 2]
    one_scenes = [(s, image) for s, image in zip(scenes, named_images) if len(s.objects) == 1]
    by_size = {size: [(s, im) for s, im in one_scenes if s.objects[0].size == size] for size in ATTRIBUTES["size"]}
    coverage = {size: round(float(np.mean([render(s).masks[0].mean() for s, _ in pairs])), 4)
                for size, pairs in by_size.items() if pairs}
    coverage_generated = {size: round(float(np.mean([foreground(im).mean() for _, im in pairs])), 4)
                          for size, pairs in by_size.items() if pairs}
    per_caption: dict[str, list[float]] = {a: [] for a in ATTRIBUTES}
    pooled: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
    unread: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for k, (attribute, _, _) in enumerate(unnamed):
        reads = [r["read"] for r in noise_rows[k * cfg.noise_seeds : (k + 1) * cfg.noise_seeds]]
        values = [v for v in reads if v is not None]
        per_caption[attribute].append(normalised_entropy(values, attribute))
        pooled[attribute] += values
        unread[attribute] += [v is None for v in reads]
    kept: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for r in noise_rows:
        for a, ok in r["named_right"].items():
            kept[a].append(ok)
    result = {
        "model": cfg.model,
        "n": len(rows) + len(noise_rows),
        "split": cfg.split,
        "one_object": {a: round(float(np.mean([r[a] for r in one])), 4) for a in REPORTED} if one else {},
        "two_objects_all_correct": round(float(np.mean([all(r[a] for a in CHECKS) for r in two])), 4)
        if two else None,
        "coverage": coverage,
        "coverage_generated": coverage_generated,
        "steps": cfg.steps,
        "guidance": guidance,
        "images_per_second": round(len(images) / seconds, 2),
        "samples": str((out / "samples.png").resolve()),
        "noise_captions": cfg.noise_captions,
        "noise_seeds": cfg.noise_seeds,
        "noise_unread": {a: round(float(np.mean(v)), 4) for a, v in unread.items() if v},
        "noise_decides_pooled": {a: round(normalised_entropy(v, a), 4) for a, v in pooled.items() if per_caption[a]},
        "named_kept": {a: round(float(np.mean(v)), 4) for a, v in kept.items() if v},
        "noise_decides": {a: round(float(np.mean(v)), 4) for a, v in per_caption.items() if v},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
