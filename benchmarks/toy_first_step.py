"""Does the toy model know what to draw before it has seen any image? Two measures that locate
composition failures in the text encoder or in the U-Net's first step.

    python benchmarks/toy_first_step.py [--model toy] [--n 200]

1. Word separation: for every attribute, the text encoder's outputs for two prompts that differ
   in that one word, compared at the first token where they differ, relative to the mean token
   norm; the minimum over the attribute's value pairs is reported (0: the encoder has collapsed
   two words, so no U-Net can tell them apart).
2. First-step read: from pure noise at the noisiest training timestep (zero terminal SNR: the
   latent holds no image), the U-Net's prediction of the clean latent is decoded and read by the
   pixel oracle, for ``n`` held-out one-object prompts. On this schedule the prediction is the
   model's estimate of E[image | prompt]; when its position is wrong, sampling places the object
   wherever the noise suggests.
3. When the layout appears: ``layout_captions`` held-out one-object captions that leave the
   position unnamed, ``layout_seeds`` seeds each, sampled as usual (25 steps, the model's
   guidance). After every step the sampler's prediction of the clean latent (DPM-Solver++ keeps
   it as its data prediction) is decoded and its object position read by the oracle; reported per
   step is the share of images whose read there agrees with the final image's position (images
   whose final position cannot be read are left out), and the first step where it reaches 0.8.
   The noise decides the position here, so this is when the model commits to a layout.

Last line: {"model", "word_separation": {attribute: min relative distance},
"first_step": {attribute: accuracy}, "layout_agreement": [per step], "layout_step_0.8"}.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from dataclasses import dataclass

import numpy as np
import torch

from activations.generate import generators
from activations.pipeline import load_pipeline, model_defaults
from common.config import check_counts, parse
from toyworld.oracle import REPORTED, check_image, read_positions
from toyworld.prompts import Named, scene_to_prompt
from toyworld.scene import Obj, Scene, sample_scene
from toyworld.train import to_images
from toyworld.vocab import ATTRIBUTES, OBJECT_ATTRIBUTES

BASE = Scene((Obj(shape="circle", color="red", position="top left", size="small", texture="plain"),), "gray", "day")


@dataclass
class FirstStepConfig:
    model: str = "toy"
    """Model to measure (a toy-world model)."""
    n: int = 200
    """Held-out one-object prompts for the first-step read."""
    seed: int = 1234
    """Seed of the scenes, prompts and noise."""
    batch_size: int = 50
    """Prompts per U-Net call."""
    layout_captions: int = 32
    """Held-out position-free captions for when the layout appears."""
    layout_seeds: int = 4
    """Seeds per position-free caption."""
    steps: int = 25
    """Sampling steps of the layout measure."""


def with_value(scene: Scene, attribute: str, value: str) -> Scene:
    if attribute in OBJECT_ATTRIBUTES:
        return dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], **{attribute: value}),))
    return dataclasses.replace(scene, **{attribute: value})


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    return ids, pipe.text_encoder(ids.to(pipe.device))[0].float().cpu()


def word_separation(pipe) -> dict[str, float]:
    out = {}
    for attribute, values in ATTRIBUTES.items():
        ids, hidden = encode(pipe, [scene_to_prompt(with_value(BASE, attribute, v)) for v in values])
        norm = hidden.norm(dim=-1).mean()
        distances = []
        for a, b in itertools.combinations(range(len(values)), 2):
            first = int((ids[a] != ids[b]).nonzero()[0])
            distances.append(float((hidden[a, first] - hidden[b, first]).norm() / norm))
        out[attribute] = round(min(distances), 3)
    return out


@torch.no_grad()
def first_step(pipe, cfg: FirstStepConfig) -> dict[str, float]:
    rng = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng, num_objects=1, split="test") for _ in range(cfg.n)]
    generator = torch.Generator().manual_seed(cfg.seed)
    t = pipe.scheduler.config.num_train_timesteps - 1
    alpha_bar = pipe.scheduler.alphas_cumprod[t]
    size, channels, dtype = pipe.unet.config.sample_size, pipe.unet.config.in_channels, pipe.unet.dtype
    verdicts = []
    for start in range(0, cfg.n, cfg.batch_size):
        batch = scenes[start : start + cfg.batch_size]
        _, text = encode(pipe, [scene_to_prompt(s, rng) for s in batch])
        noise = torch.randn(len(batch), channels, size, size, generator=generator)
        x_t = noise * (1 - alpha_bar).sqrt()  # the noisiest training latent holds no image at zero terminal SNR
        out = pipe.unet(x_t.to(pipe.device, dtype), torch.full((len(batch),), t, device=pipe.device),
                        text.to(pipe.device, dtype)).sample.float().cpu()
        if pipe.scheduler.config.prediction_type == "v_prediction":
            x0 = alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * out
        else:
            x0 = (x_t - (1 - alpha_bar).sqrt() * out) / alpha_bar.sqrt()
        decoded = pipe.vae.decode((x0 / pipe.vae.config.scaling_factor).to(pipe.device, pipe.vae.dtype)).sample
        verdicts += [check_image(scene, image) for scene, image in zip(batch, to_images(decoded))]
    return {k: round(float(np.mean([v[k] for v in verdicts])), 3) for k in REPORTED}


def positions(images: np.ndarray) -> list[frozenset | None]:
    """The set of object positions the oracle reads in each image (None: no object found)."""
    return [frozenset(read_positions(image)) or None for image in images]


@torch.no_grad()
def layout_steps(pipe, cfg: FirstStepConfig) -> tuple[list[float], int]:
    """(per step: share of images whose decoded x0-prediction shows the final position, the number
    of images with a readable final position)."""
    if type(pipe.scheduler).__name__ != "DPMSolverMultistepScheduler" or pipe.scheduler.config.algorithm_type != "dpmsolver++":
        raise SystemExit(f"toy_first_step: error: the layout measure reads DPM-Solver++'s data prediction; "
                         f"{cfg.model!r} samples with {type(pipe.scheduler).__name__}")
    rng = np.random.default_rng(cfg.seed + 1)
    scenes = [sample_scene(rng, num_objects=1, split="test") for _ in range(cfg.layout_captions)]
    jobs = [(scene_to_prompt(s, rng, Named.all_but(s, "position")), cfg.seed + 1000 * k + j)
            for k, s in enumerate(scenes) for j in range(cfg.layout_seeds)]
    guidance = model_defaults(pipe)["guidance_scale"]
    reads: list[list] = []  # [image][step]
    finals: list = []

    def on_step(pipeline, step, t, kwargs):
        x0 = pipeline.scheduler.model_outputs[-1]  # the data prediction of this step (dpmsolver++)
        decoded = pipeline.vae.decode((x0 / pipeline.vae.config.scaling_factor).to(pipeline.vae.dtype)).sample
        for row, read in zip(batch_reads, positions(to_images(decoded))):
            row.append(read)
        return kwargs

    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start : start + cfg.batch_size]
        batch_reads: list[list] = [[] for _ in chunk]
        images = pipe(prompt=[p for p, _ in chunk], num_inference_steps=cfg.steps, guidance_scale=guidance,
                      generator=generators([s for _, s in chunk]), output_type="np", callback_on_step_end=on_step).images
        reads += batch_reads
        finals += positions((images * 255).round().astype(np.uint8))
    kept = [(row, final) for row, final in zip(reads, finals) if final is not None]
    agreement = [round(float(np.mean([row[step] == final for row, final in kept])), 3) if kept else 0.0
                 for step in range(cfg.steps)]
    return agreement, len(kept)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(FirstStepConfig, argv, "toy_first_step", __doc__.split("\n\n")[0])
    check_counts(cfg, "toy_first_step", positive=("n", "batch_size", "layout_captions", "layout_seeds", "steps"))
    pipe = load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    agreement, readable = layout_steps(pipe, cfg)
    reached = [step for step, share in enumerate(agreement) if share >= 0.8]
    result = {"model": cfg.model, "word_separation": word_separation(pipe), "first_step": first_step(pipe, cfg),
              "layout_images": cfg.layout_captions * cfg.layout_seeds, "layout_readable": readable,
              "layout_agreement": agreement, "layout_step_0.8": reached[0] if reached else None}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
