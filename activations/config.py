"""The harvest configuration: typed dataclasses whose field docstrings are the CLI's --help.

Read from YAML with jsonargparse (``diffatlas harvest <config.yaml> [--field value ...]``); the
config is saved in every site's manifest, and its hash decides whether a rerun resumes or is
refused. Fields that only say *how* to run (devices, progress bar, checks) are left out of the
hash, so a 2-process run resumes a 1-process one and vice versa. ``threads`` is not part of the
hash either but is part of the recorded numerics (it changes float rounding on the CPU), so a
resume with other threads is refused naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

# fields that do not change what is stored (excluded from the config hash and the comparison)
RUNTIME_FIELDS = ("out", "devices", "accelerator", "num_nodes", "progress", "verify", "threads")


OPTIONAL = ("positions", "prompts.num_prompts")  # fields where null has a meaning


@dataclass
class PromptSource:
    """Where the prompts come from."""

    kind: str = "toyworld"
    """file: a text file, one prompt per line; dataset: a Hugging Face `datasets` dataset (local
    folder or name); list: the `texts` field; or a registered prompt source (entry-point group
    diffatlas.prompt_sources), e.g. toyworld: sampled toy scenes (ground truth saved)"""
    path: Optional[str] = None
    """file: the text file; dataset: a dataset name or local folder (saved with save_to_disk or
    loadable by load_dataset)"""
    split: str = "train"
    """dataset: the split to read"""
    column: str = "text"
    """dataset: the column holding the prompt text"""
    texts: list[str] = field(default_factory=list)
    """list: the prompts themselves"""
    num_prompts: Optional[int] = None
    """how many prompts to use (first N; required for toyworld; default all of a file/dataset/list)"""
    scene_split: Literal["train", "test", "all"] = "train"
    """toyworld: which object pool scenes are drawn from (test holds out object descriptions)"""


@dataclass
class HarvestConfig:
    """Harvest U-Net activations of a text-to-image pipeline into an activation store."""

    model: str = "toy"
    """the pipeline: 'toy' (the bundled model), a local diffusers folder or a hub id"""
    out: str = "runs/harvest"
    """output folder (the activation store); a rerun with the same config resumes it"""
    sites: list[str] = field(default_factory=lambda: ["mid_block.attentions.0"])
    """sites to harvest: block sites (Transformer2DModel, stores Δ = output - input), head sites
    (attn2 modules, stores per-head outputs before to_out, heads concatenated), or the groups
    'blocks', 'heads', 'all' (see `diffatlas sites <model>`)"""
    prompts: PromptSource = field(default_factory=PromptSource)
    """the prompt set"""
    images_per_prompt: int = 1
    """images per prompt (image id = prompt index * images_per_prompt + r)"""
    seed: int = 0
    """base seed: image i is generated from seed + i; positions are subsampled from (seed, i)"""
    num_inference_steps: int = 20
    """denoising steps"""
    guidance_scale: float = 7.5
    """classifier-free guidance scale (<= 1 disables guidance: only the cond branch exists)"""
    scheduler: Optional[str] = None
    """a diffusers scheduler class name (e.g. DDIMScheduler, PNDMScheduler); None keeps the pipeline's"""
    height: Optional[int] = None
    """image height in pixels (None: the model's default)"""
    width: Optional[int] = None
    """image width in pixels (None: the model's default)"""
    timesteps: Union[str, dict[str, Any]] = "all"
    """steps to capture: 'all', a window 'early' (tau in [0.6, 1]), 'middle' ([0.2, 0.6)), 'late'
    ([0, 0.2)), {tau: [lo, hi]}, {steps: [i, ...]} (step indices), {every: N} (or 'every:N'), or
    {t: [t, ...]} (scheduler timesteps)"""
    branch: Literal["cond", "uncond", "both"] = "cond"
    """guidance branch(es) to capture"""
    positions: Optional[int] = None
    """random positions kept per image and site (the same at every step); None keeps all H*W"""
    batch_size: int = 4
    """images per pipeline call"""
    images_per_shard: int = 16
    """images per shard: the unit of resuming and of splitting work between processes"""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """model dtype (rows are always stored as float16)"""
    save_images: bool = True
    """save the final images (and toyworld ground truth) under <out>/images"""
    devices: Union[int, str] = 1
    """processes per node (Lightning Fabric): an int or 'auto'; each rank writes its own shards"""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, cuda, ..."""
    num_nodes: int = 1
    """nodes (Lightning Fabric)"""
    progress: bool = True
    """show a progress bar with images/s"""
    verify: bool = True
    """on resume, check finished shards against their sha256 before trusting them"""
    threads: int = 1
    """torch CPU threads of every rank (torch.set_num_threads). CPU results depend on the thread
    count, not on the number of ranks: the same threads give the same rows with any --devices.
    Recorded in the manifests; a resume with other threads is refused"""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Refuse numbers out of range, naming the field (before anything is loaded or written)."""
        at_least_one = {
            "num_inference_steps": self.num_inference_steps,
            "batch_size": self.batch_size,
            "images_per_shard": self.images_per_shard,
            "images_per_prompt": self.images_per_prompt,
            "threads": self.threads,
            "positions": self.positions,
            "prompts.num_prompts": self.prompts.num_prompts,
        }
        for name, value in at_least_one.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1{' or null' if name in OPTIONAL else ''}, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (<= 1 disables guidance), got {self.guidance_scale}")

    def content_dict(self) -> dict:
        """The fields that decide what is stored (hashed into the manifest)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "HarvestConfig":
        d = dict(d)
        if isinstance(d.get("prompts"), dict):
            d["prompts"] = PromptSource(**d["prompts"])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown harvest config field(s) {sorted(unknown)}; valid fields: {', '.join(sorted(names))}")
        return cls(**d)


def parser():
    """The jsonargparse parser of ``diffatlas harvest``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    with_docstrings()
    p = ArgumentParser(prog="diffatlas harvest", description=HarvestConfig.__doc__)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML harvest config (also accepted as the first positional argument)")
    p.add_class_arguments(HarvestConfig, as_group=False)
    return p


def with_docstrings() -> None:
    import jsonargparse

    try:  # field docstrings become --help text (needs docstring-parser)
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except Exception:
        pass


def parse_args(argv: list[str]) -> HarvestConfig:
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", argv[0]] + argv[1:]
    p = parser()
    ns = p.parse_args(argv)
    cfg = p.instantiate(ns)
    d = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(vars(cfg))
    d.pop("config", None)
    d.pop("__path__", None)
    return HarvestConfig.from_dict(d)


def load_config(path: str) -> HarvestConfig:
    """A HarvestConfig from a YAML file (same rules as the CLI)."""
    return parse_args([str(path)])
