"""``diffatlas generate``: prompts x seeds -> PNG files, with a JSONL record of every image."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.config import MAX_STEPS, check_counts, save_config
from common.errors import UsageError


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
    """Refuse empty prompts, and prompts the model cannot read (for the toy model: unknown words
    and impossible scenes), before drawing anything."""
    from activations.prompts import check_prompts as check_for_model

    for k, prompt in enumerate(prompts):
        if not prompt.strip():
            raise UsageError(f"prompt {k} is empty; every prompt needs at least one word")
    check_for_model(model, prompts)


def check_numbers(cfg: GenerateConfig) -> None:
    """Refuse numbers out of range, naming the option (None means the model's default)."""
    if not cfg.seeds:
        raise UsageError("--seeds is empty; give at least one seed, e.g. --seeds '[0]'")
    # steps and guidance None: the model's defaults; seeds 0..MAX_SEED, the noise generators' range
    check_counts(cfg, positive=("steps", "batch_size"), numbers={"guidance": 0.0}, at_most={"steps": MAX_STEPS},
                 seeds=("seeds",))


def generators(seeds) -> list[torch.Generator]:
    """One CPU generator per image, seeded with the image's seed.

    The rule for the same image everywhere: every client (``generate``, ``trace`` scripts, the
    harvester, HRVs, steering, the explorer) draws an image's initial noise from its own CPU
    generator, whatever device the model runs on. An image then depends on its prompt, seed, steps
    and guidance only: not on its batch neighbours (bit for bit at one batch size, within float
    tolerance across batch sizes, where matrix kernels may round differently), and not on the
    device that holds the noise generator.
    """
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def sample(pipe, prompts, seeds, *, steps: int, guidance: float, height: int | None = None, width: int | None = None,
           output_type: str = "pil"):
    """One pipeline call for ``prompts`` with one seed each (see ``generators``): the pipeline's output."""
    from activations.pipeline import call_options

    return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=generators(seeds),
                height=height, width=width, output_type=output_type, **call_options(pipe))


def schedule(pipe, steps: int, latent: tuple[int, int] | None = None) -> list[int]:
    """The timesteps, in scheduler units as integers, of a ``sample`` call of ``steps`` steps at
    ``latent`` (H, W; None: the pipeline's default size), set the way the pipeline sets them, on a
    copy of ``pipe.scheduler`` (which is left as it is). The one place that asks: FLUX's pipeline
    passes its own sigmas and a shift that depends on the image's token count
    (``Architecture.schedule_args``), so a bare ``set_timesteps(steps)`` gives other timesteps."""
    return [int(t) for t in scheduler_for(pipe, steps, latent).timesteps]


def scheduler_for(pipe, steps: int, latent: tuple[int, int] | None = None, scheduler=None):
    """A copy of ``scheduler`` (default ``pipe.scheduler``) with the timesteps of a ``steps``-step
    call at ``latent`` set as the pipeline sets them (see ``schedule``)."""
    from activations.families import architecture_of, denoiser_of
    from activations.sites import latent_size

    arch = architecture_of(pipe)
    base = scheduler if scheduler is not None else pipe.scheduler
    sched = type(base).from_config(base.config)
    kwargs = {}
    if arch.schedule_args is not None:
        h, w = latent or latent_size(pipe)
        multiple = int(arch.latent_multiple(denoiser_of(pipe)))
        kwargs = arch.schedule_args(sched, steps, (h // multiple) * (w // multiple))
    sched.set_timesteps(steps, **kwargs)
    return sched


def generate(pipe, jobs: list[tuple[str, int]], steps: int, guidance: float, batch_size: int = 16,
             progress: bool = True):
    """Yield (prompt, seed, PIL image) for every (prompt, seed) job, deterministic per job."""
    bar = tqdm(total=len(jobs), desc="generate", unit="img", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = sample(pipe, [p for p, _ in chunk], [s for _, s in chunk], steps=steps, guidance=guidance).images
        for (prompt, seed), image in zip(chunk, images):
            yield prompt, seed, image
        bar.update(len(chunk))
    bar.close()


def run(cfg: GenerateConfig) -> list[Path]:
    from activations.pipeline import load_pipeline, model_defaults

    check_numbers(cfg)
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        prompts += [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("no prompts: pass --prompts '[\"a prompt\", ...]' or --prompts_file FILE "
                         "(a file needs at least one non-blank line)")
    check_prompts(cfg.model, prompts)
    pipe = load_pipeline(cfg.model, device=cfg.device)
    pipe.set_progress_bar_config(disable=True)
    defaults = model_defaults(pipe)
    steps = cfg.steps if cfg.steps is not None else defaults["num_inference_steps"]
    guidance = cfg.guidance if cfg.guidance is not None else defaults["guidance_scale"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    records = read_records(out)
    jobs = [(p, s) for p in prompts for s in cfg.seeds]
    try:
        for k, (prompt, seed, image) in enumerate(generate(pipe, jobs, steps, guidance, cfg.batch_size)):
            path = out / f"{k:04d}_seed{seed}.png"
            image.save(path)
            paths.append(path)
            records[path.name] = {"file": path.name, "prompt": prompt, "seed": seed, "steps": steps,
                                  "guidance": guidance, "model": cfg.model}
    finally:  # also after an interruption: the images already written keep their records
        write_records(out, records)
    save_config(cfg, out / "generate_config.yaml")
    return paths


RECORDS = "generations.jsonl"


def read_records(out: Path) -> dict[str, dict]:
    """file name -> record of ``out``'s generations.jsonl (the last one, should a file have several)."""
    path = out / RECORDS
    if not path.exists():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["file"]: row for row in rows}


def write_records(out: Path, records: dict[str, dict]) -> None:
    """Rewrite generations.jsonl with one record per file; a rerun into the same folder replaces
    the records of the files it overwrote. Atomic: a crash leaves the old file or the new one."""
    from common.files import write_atomic

    write_atomic(out / RECORDS, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in records.values())))


def main(argv: list[str] | None = None) -> int:
    from common.config import parse

    cfg = parse(GenerateConfig, argv, "diffatlas generate", __doc__)
    paths = run(cfg)  # bad input raises; the diffatlas dispatcher prints it as one line
    print(f"wrote {len(paths)} images to {Path(cfg.out).resolve()}")
    return 0
