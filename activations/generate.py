"""``diffatlas generate``: prompts x seeds -> PNG files, with a JSONL record of every image."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffatlas.config import save_config


@dataclass
class GenerateConfig:
    model: str = "toy"
    """'toy', a local diffusers folder, or a hub id."""
    prompts: list[str] = field(default_factory=list)
    """Prompts to draw (each with every seed)."""
    prompts_file: str | None = None
    """A text file with one prompt per line, added to --prompts."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds; each prompt is drawn once per seed."""
    steps: int | None = None
    """Sampling steps (default: the model's, 25 for the toy)."""
    guidance: float | None = None
    """Classifier-free guidance scale (default: the model's)."""
    batch_size: int = 16
    """Images per pipeline call."""
    out: str = "outputs/generate"
    """Folder for the PNGs and generations.jsonl."""
    device: str | None = None
    """torch device (default: CUDA when available)."""


def check_prompts(model: str, prompts: list[str]) -> None:
    """The toy model knows a fixed vocabulary: refuse unknown words before drawing anything."""
    if model == "toy":
        from toyworld.prompts import check_prompt

        for prompt in prompts:
            check_prompt(prompt)


def generate(pipe, jobs: list[tuple[str, int]], steps: int, guidance: float, batch_size: int = 16,
             progress: bool = True):
    """Yield (prompt, seed, PIL image) for every (prompt, seed) job, deterministic per job."""
    bar = tqdm(total=len(jobs), desc="generate", unit="img", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        # one generator per image, so an image does not depend on its batch neighbours
        generators = [torch.Generator(pipe.device).manual_seed(seed) for _, seed in chunk]
        images = pipe(
            prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=generators
        ).images
        for (prompt, seed), image in zip(chunk, images):
            yield prompt, seed, image
        bar.update(len(chunk))
    bar.close()


def run(cfg: GenerateConfig) -> list[Path]:
    from activations.pipeline import load_pipeline, model_defaults

    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        prompts += [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompts '[\"a prompt\", ...]' or --prompts_file FILE")
    check_prompts(cfg.model, prompts)
    pipe = load_pipeline(cfg.model, device=cfg.device)
    pipe.set_progress_bar_config(disable=True)
    defaults = model_defaults(pipe)
    steps = cfg.steps or defaults["num_inference_steps"]
    guidance = cfg.guidance if cfg.guidance is not None else defaults["guidance_scale"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(out / "generations.jsonl", "a") as record:
        jobs = [(p, s) for p in prompts for s in cfg.seeds]
        for k, (prompt, seed, image) in enumerate(generate(pipe, jobs, steps, guidance, cfg.batch_size)):
            path = out / f"{k:04d}_seed{seed}.png"
            image.save(path)
            paths.append(path)
            row = {"file": path.name, "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance,
                   "model": cfg.model}
            record.write(json.dumps(row) + "\n")
    save_config(cfg, out / "generate_config.yaml")
    return paths


def main(argv: list[str] | None = None) -> int:
    import sys

    from diffatlas.config import parse

    cfg = parse(GenerateConfig, argv, "diffatlas generate", __doc__)
    try:
        paths = run(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"diffatlas generate: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} images to {Path(cfg.out).resolve()}")
    return 0
