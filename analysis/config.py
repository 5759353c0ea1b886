"""Configs of ``diffatlas analyze``: typed dataclasses whose field docstrings are the --help text.

    diffatlas analyze hrv configs/analysis/hrv_toy.yaml [--steps 10 ...]
    diffatlas analyze weaken configs/analysis/weaken_toy.yaml
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, TypeVar

from activations.config import PromptSource

T = TypeVar("T")


@dataclass
class HRVConfig:
    """Build head relevance vectors (Park et al., ICLR 2025, Section 3) during generation."""

    model: str = "toy"
    """the pipeline: 'toy' (the bundled model), a local diffusers folder or a hub id"""
    concepts: str = "toy"
    """concept list: a YAML file 'concepts: {name: [words]}' or a name in configs/concepts/ (toy, sd34)"""
    prompts: PromptSource = field(default_factory=lambda: PromptSource(kind="toyworld", num_prompts=64))
    """the prompt set (toyworld generator, a text file, a dataset, or a list)"""
    prompt_seed: int = 0
    """seed of the toyworld prompt generator"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """sampling seeds; every prompt is drawn once per seed"""
    word_seed: int = 0
    """seed of the concept-word sampling (one word per concept at every cross-attention call)"""
    words: Literal["alone", "in_context"] = "alone"
    """alone: each concept word encoded by itself (Park et al.); in_context: each word's token states
    averaged over the prompts above that name it, read at its place there"""
    choose: Literal["random", "named"] = "random"
    """which word of a concept enters each contest: random (one drawn at every call, Park et al.) or
    named (the word the image's prompt names, where it names one; drawn otherwise)"""
    sink: bool = False
    """add the prompt's start token to every contest as a slot of no concept, as in a real prompt, so
    that image positions that read no word do not vote (not in Park et al.)"""
    steps: Optional[int] = None
    """denoising steps (None: the model's default; the paper uses 50)"""
    guidance: Optional[float] = None
    """classifier-free guidance scale (None: the model's default; the paper uses 7.5)"""
    scheduler: Optional[str] = None
    """a diffusers scheduler class name (the paper: PNDMScheduler); None keeps the pipeline's"""
    batch_size: int = 8
    """images per pipeline call; votes are saved after each batch (the unit of resuming)"""
    out: str = "runs/hrv/toy"
    """output folder: hrv.safetensors, hrv.json, hrv_heatmap.png; a rerun resumes it"""
    device: Optional[str] = None
    """torch device (default: CUDA when available)"""
    progress: bool = True
    """show a progress bar"""
    wandb: bool = True
    """log the heatmap and vote counts to W&B (offline unless WANDB_MODE is set)"""


@dataclass
class WeakenConfig:
    """Ordered weakening (Park et al., ICLR 2025, Section 4): weaken heads in MoRHF, LeRHF and a
    random order and score how long each concept survives."""

    hrv: str = "runs/hrv/toy"
    """HRV folder (from `diffatlas analyze hrv`); its model and concepts are used"""
    model: Optional[str] = None
    """the pipeline (None: the HRV's model)"""
    scorer: Literal["toy", "clip"] = "toy"
    """toy: the pixel oracle reads the concept's value back; clip: CLIP similarity to the concept word"""
    clip: Optional[str] = None
    """clip scorer: a local CLIP folder (transformers CLIPModel + tokenizer)"""
    concepts: list[str] = field(default_factory=list)
    """concepts to weaken (empty: all of the HRV's concepts)"""
    images_per_point: int = 40
    """images per (concept, order, head count) point"""
    points: int = 6
    """head counts strictly between 0 and all heads (evenly spaced); 0 and all heads are always scored"""
    template: str = "a photo of a {word}"
    """clip scorer: the prompt written for each concept word"""
    seed: int = 0
    """seed of the prompts, the random order and the sampling noise"""
    steps: Optional[int] = None
    """denoising steps (None: the model's default)"""
    guidance: Optional[float] = None
    """classifier-free guidance scale (None: the model's default)"""
    factor: float = -2.0
    """multiplier of a weakened head's attention probabilities on the semantic tokens (the paper: -2)"""
    batch_size: int = 40
    """images per pipeline call"""
    out: str = "runs/weaken/toy"
    """output folder: weakening.json, weakening_curves.png"""
    device: Optional[str] = None
    """torch device (default: CUDA when available)"""
    progress: bool = True
    """show a progress bar"""
    wandb: bool = True
    """log the curves to W&B (offline unless WANDB_MODE is set)"""


def parse_config(cls: type[T], argv: list[str], prog: str) -> T:
    """``prog <config.yaml> [--field value ...]`` into ``cls`` (a YAML first argument is --config)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from activations.config import with_docstrings

    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", argv[0]] + argv[1:]
    with_docstrings()
    p = ArgumentParser(prog=prog, description=cls.__doc__)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML config (also accepted as the first positional argument)")
    p.add_class_arguments(cls, as_group=False)
    ns = p.instantiate(p.parse_args(argv))
    d = ns.as_dict() if hasattr(ns, "as_dict") else dict(vars(ns))
    values = {f.name: d[f.name] for f in dataclasses.fields(cls)}
    if isinstance(values.get("prompts"), dict):
        values["prompts"] = PromptSource(**values["prompts"])
    return cls(**values)


def save_config(cfg, path) -> None:
    from pathlib import Path

    import yaml

    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
