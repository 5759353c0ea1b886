"""The toy world plugs into `activations` by name (entry points in pyproject.toml):

* model ``toy``: the bundled pipeline in ``toyworld/weights`` (``load_pipeline("toy")``), its
  architecture with random weights (``diffatlas sites toy``), and its closed vocabulary (prompts
  with other words or impossible scenes are refused before anything runs), and its ground truth
  for the analyses (``truth``: the pixel-oracle scorer, patch labels, object coverage);
* model ``toy-mmdit``: the same world drawn by an SD3-shaped MMDiT (``toyworld/weights_mmdit``,
  trained by ``python -m toyworld.train_mmdit``), with the same vocabulary and ground truth;
* prompt source ``toyworld``: sampled scenes written as prompts, a pure function of (seed, index),
  with each scene's ground truth (attributes and a clean render) saved beside its image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.errors import UsageError
from common.plugins import ModelPlugin, PromptSourcePlugin

WEIGHTS = Path(__file__).resolve().parent / "weights"
WEIGHTS_MMDIT = Path(__file__).resolve().parent / "weights_mmdit"


def _load(folder: Path, train: str, device=None, dtype=None):
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"the bundled model is missing at {folder}; retrain it with "
                                f"`python -m {train}`")
    from activations.pipeline import load_pipeline

    return load_pipeline(folder, device=device, dtype=dtype)


def load(device=None, dtype=None):
    return _load(WEIGHTS, "toyworld.train --config configs/toyworld/train.yaml", device, dtype)


def load_mmdit(device=None, dtype=None):
    return _load(WEIGHTS_MMDIT, "toyworld.train_mmdit --config configs/toyworld/train_mmdit.yaml", device, dtype)


def build_unet(seed: int = 0):
    from toyworld.model import build_pipeline

    return build_pipeline(seed=seed).unet


def build_mmdit(seed: int = 0):
    """The toy MMDiT's transformer with random weights, in the architecture of its training config."""
    from toyworld.model_mmdit import ToyMMDiTConfig, build_transformer

    torch.manual_seed(seed)
    return build_transformer(ToyMMDiTConfig())


def check_prompt(text: str) -> str:
    """Words outside the toy vocabulary, or an impossible scene, are a ValueError naming them."""
    from toyworld.prompts import check_prompt as check_words, check_scene

    check_scene(check_words(text))
    return text


def truth():
    """The toy world's ground truth for the analyses (``toyworld.plugin_truth``, imported on use)."""
    from toyworld.plugin_truth import ToyTruth

    return ToyTruth()


MODEL = ModelPlugin(load=load, build_denoiser=build_unet, check_prompt=check_prompt, truth=truth,
                    description="the bundled toy text-to-image model (toyworld/weights)")
MODEL_MMDIT = ModelPlugin(load=load_mmdit, build_denoiser=build_mmdit, check_prompt=check_prompt, truth=truth,
                          description="the bundled toy MMDiT, an SD3-shaped transformer on the same world (toyworld/weights_mmdit)")


class ToyPrompts(PromptSourcePlugin):
    """Toy scenes as prompts: scene i from rng(seed, i, 0), its wording from rng(seed, i, 1)."""

    def __init__(self, config, seed: int = 0):
        super().__init__(config, seed)
        if getattr(config, "num_prompts", None) is None:
            raise UsageError("prompts.kind 'toyworld' needs prompts.num_prompts (the generator is endless)")
        self.n = int(config.num_prompts)
        self.split = getattr(config, "scene_split", "train")

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int):
        from toyworld.scene import sample_scene

        return sample_scene(np.random.default_rng([self.seed, index, 0]), split=self.split)

    def text(self, index: int) -> str:
        from toyworld.prompts import scene_to_prompt

        return scene_to_prompt(self.scene(index), np.random.default_rng([self.seed, index, 1]))

    def ground_truth(self, index: int) -> dict:
        return {"scene": self.scene(index).to_dict()}

    def truth_image(self, index: int):
        from toyworld.render import render

        return render(self.scene(index)).image
