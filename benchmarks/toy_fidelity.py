"""How faithfully the bundled toy model draws prompts it never saw in training.

    python benchmarks/toy_fidelity.py [--one_object 300] [--two_objects 250] [--steps 25]

Every prompt holds an object description (shape, colour, texture, position) that the training
split left out. Each image is read back by the pixel oracle and compared with its scene. Writes a
labelled sample grid and per-image results beside the JSON; the last line of output is the JSON:
{"n", "one_object": {attribute: accuracy}, "two_objects_all_correct"}.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from activations.generate import generate  # noqa: E402
from activations.pipeline import load_pipeline, model_defaults  # noqa: E402
from common.config import parse, save_config  # noqa: E402
from toyworld.grid import labelled_grid  # noqa: E402
from toyworld.oracle import CHECKS, REPORTED, check_image  # noqa: E402
from toyworld.prompts import scene_to_prompt  # noqa: E402
from toyworld.scene import sample_scene  # noqa: E402


@dataclass
class FidelityConfig:
    model: str = "toy"
    """Model to measure (a toy-world model)."""
    one_object: int = 300
    """One-object held-out prompts."""
    two_objects: int = 250
    """Two-object prompts, each with at least one held-out object."""
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


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(FidelityConfig, argv, "toy_fidelity", __doc__.split("\n\n")[0])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    rng = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng, num_objects=1, split=cfg.split) for _ in range(cfg.one_object)]
    scenes += [sample_scene(rng, num_objects=2, split=cfg.split) for _ in range(cfg.two_objects)]
    prompts = [scene_to_prompt(s, rng) for s in scenes]

    pipe = load_pipeline(cfg.model, device=cfg.device)
    pipe.set_progress_bar_config(disable=True)
    guidance = cfg.guidance if cfg.guidance is not None else model_defaults(pipe)["guidance_scale"]
    started = time.perf_counter()
    jobs = [(prompt, cfg.seed + k) for k, prompt in enumerate(prompts)]
    images = [np.asarray(image) for _, _, image in generate(pipe, jobs, cfg.steps, guidance, cfg.batch_size)]
    seconds = time.perf_counter() - started

    rows = []
    for scene, prompt, image in zip(scenes, prompts, images):
        checks = check_image(scene, image)
        rows.append({"prompt": prompt, "objects": len(scene.objects), **checks})
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    grid, _ = labelled_grid(images[:8] + images[cfg.one_object : cfg.one_object + 8],
                            scenes[:8] + scenes[cfg.one_object : cfg.one_object + 8],
                            prompts[:8] + prompts[cfg.one_object : cfg.one_object + 8])
    grid.save(out / "samples.png")

    one = [r for r in rows if r["objects"] == 1]
    two = [r for r in rows if r["objects"] == 2]
    result = {
        "n": len(rows),
        "split": cfg.split,
        "one_object": {a: round(float(np.mean([r[a] for r in one])), 4) for a in REPORTED} if one else {},
        "two_objects_all_correct": round(float(np.mean([all(r[a] for a in CHECKS) for r in two])), 4)
        if two else None,
        "steps": cfg.steps,
        "guidance": guidance,
        "images_per_second": round(len(rows) / seconds, 2),
        "samples": str((out / "samples.png").resolve()),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
