"""Configs of ``diffatlas analyze``: typed dataclasses whose field docstrings are the --help text.

    diffatlas analyze hrv configs/analysis/hrv_toy.yaml [--steps 10 ...]
    diffatlas analyze weaken configs/analysis/weaken_toy.yaml
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from activations.config import PromptSource

TOYWORLD_PROMPTS = 64
"""HRV prompts drawn from the toyworld generator when ``prompts.num_prompts`` is not given (the
generator is endless). A list, file or dataset source gives all of its prompts unless it is given."""


@dataclass
class HRVConfig:
    """Build head relevance vectors (Park et al., ICLR 2025, Section 3) during generation."""

    model: str = "toy"
    """the pipeline: 'toy' (the bundled model), a local diffusers folder or a hub id"""
    concepts: str = "toy"
    """concept list: a YAML file 'concepts: {name: [words]}' or a name in configs/concepts/ (toy, sd34)"""
    prompts: PromptSource = field(default_factory=lambda: PromptSource(kind="toyworld"))
    """the prompt set (toyworld generator, a text file, a dataset, or a list); without
    prompts.num_prompts, 64 toyworld prompts or all prompts of a list, file or dataset"""
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
    """denoising steps, 1 to 1000 (None: the model's default; the paper uses 50)"""
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

    def __post_init__(self) -> None:
        # the default count belongs to the endless toyworld source only: a list the user gives is
        # used whole (a default carried over from the default source would refuse it)
        if self.prompts.kind == "toyworld" and self.prompts.num_prompts is None:
            self.prompts = dataclasses.replace(self.prompts, num_prompts=TOYWORLD_PROMPTS)

    def check(self) -> None:
        """Refuse counts out of range in one line naming the option, before any work."""
        from common.config import MAX_STEPS, check_counts

        check_counts(self, positive=("steps", "batch_size", "prompts.num_prompts"),
                     seeds=("prompt_seed", "word_seed", "seeds"), numbers={"guidance": 0.0},
                     at_most={"steps": MAX_STEPS})


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
    """head counts strictly between 0 and all heads (evenly spaced), at least 5; 0 and all
    heads are always scored"""
    template: str = "a photo of a {word}"
    """clip scorer: the prompt written for each concept word"""
    seed: int = 0
    """seed of the prompts, the random order and the sampling noise"""
    steps: Optional[int] = None
    """denoising steps, 1 to 1000 (None: the model's default)"""
    guidance: Optional[float] = None
    """classifier-free guidance scale (None: the model's default)"""
    factor: float = -2.0
    """multiplier of a weakened head's attention probabilities on the weakened tokens (the paper: -2)"""
    tokens: Literal["semantic", "all_but_start"] = "semantic"
    """which tokens a weakened head's attention is multiplied on: semantic (the prompt's own words,
    Park et al.) or all_but_start (the words, the end token and the padding: a causal text encoder's
    later tokens have read every word, so they may carry a concept too)"""
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

    def check(self) -> None:
        """Refuse counts out of range in one line naming the option, before any work."""
        from common.config import MAX_STEPS, check_counts

        check_counts(self, positive=("images_per_point", "steps", "batch_size"), seeds=("seed",),
                     at_least={"points": 5}, numbers={"guidance": 0.0, "factor": None}, at_most={"steps": MAX_STEPS})
