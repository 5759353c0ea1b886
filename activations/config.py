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
class ImageSource:
    """Real images to read instead of generating (``kind: none`` generates from ``prompts``)."""

    kind: Literal["none", "folder", "dataset", "renders"] = "none"
    """none: generate images from `prompts`; folder: the images in `path` (png, jpg, jpeg, webp,
    by file name), captioned by `captions`; dataset: a `datasets` dataset's `column` of images,
    captioned by `caption_column`; renders: the true renders of the `prompts` source's scenes
    (e.g. toyworld), captioned by their prompts"""
    path: Optional[str] = None
    """folder: the image folder; dataset: a dataset name or local folder"""
    captions: Optional[str] = None
    """folder: a JSONL file of {"file": <name>, "text": <caption>} lines, one per image (None: every
    image gets the empty caption)"""
    split: str = "train"
    """dataset: the split to read"""
    column: str = "image"
    """dataset: the column holding the images"""
    caption_column: Optional[str] = None
    """dataset: the column holding the captions (None: the empty caption)"""
    num_images: Optional[int] = None
    """how many images to read (the first N; default all; renders: all of the `prompts` source)"""


@dataclass
class HarvestConfig:
    """Harvest a text-to-image pipeline's activations (generating images, or reading real ones) into an activation store."""

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
    images: ImageSource = field(default_factory=ImageSource)
    """real images to read instead of generating: each is VAE-encoded, noised to the selected
    timesteps with the noise of seed + image, and passed once through the denoiser per timestep
    with its caption (cond branch only)"""
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
        from common.config import MAX_STEPS, check_counts

        check_counts(self, positive=("num_inference_steps", "batch_size", "images_per_shard", "images_per_prompt",
                                     "threads", "positions", "prompts.num_prompts", "images.num_images"),
                     seeds=("seed",), numbers={"guidance_scale": 0.0}, at_most={"num_inference_steps": MAX_STEPS})

    def content_dict(self) -> dict:
        """The fields that decide what is stored (hashed into the manifest)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


def parse_args(argv: list[str]) -> HarvestConfig:
    """``diffatlas harvest <config.yaml> [--field value ...]`` into a checked HarvestConfig."""
    from common.config import parse

    return parse(HarvestConfig, argv, "diffatlas harvest", HarvestConfig.__doc__, positional=("config",))


def load_config(path: str) -> HarvestConfig:
    """A HarvestConfig from a YAML file (same rules as the CLI)."""
    return parse_args([str(path)])
