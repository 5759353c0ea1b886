"""The toy world plugs into `activations` by name (entry points in pyproject.toml):

* model ``toy``: the bundled pipeline in ``toyworld/weights`` (``load_pipeline("toy")``), its
  architecture with random weights (``diffatlas sites toy``), and its closed vocabulary (prompts
  with other words or impossible scenes are refused before anything runs), and its ground truth
  for the analyses (``truth``: the pixel-oracle scorer, patch labels, object coverage);
* prompt source ``toyworld``: sampled scenes written as prompts, a pure function of (seed, index),
  with each scene's ground truth (attributes and a clean render) saved beside its image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import UsageError
from common.plugins import ModelPlugin, PromptSourcePlugin

WEIGHTS = Path(__file__).resolve().parent / "weights"


def load(device=None, dtype=None):
    if not (WEIGHTS / "model_index.json").exists():
        raise FileNotFoundError(f"the bundled toy model is missing at {WEIGHTS}; retrain it with "
                                "`python -m toyworld.train --config configs/toyworld/train.yaml`")
    from activations.pipeline import load_pipeline

    return load_pipeline(WEIGHTS, device=device, dtype=dtype)


def build_unet(seed: int = 0):
    from toyworld.model import build_pipeline

    return build_pipeline(seed=seed).unet


def check_prompt(text: str) -> str:
    """Words outside the toy vocabulary, or an impossible scene, are a ValueError naming them."""
    from toyworld.prompts import check_prompt as check_words, check_scene

    check_scene(check_words(text))
    return text


def truth():
    """The toy world's ground truth for the analyses (``toyworld.plugin_truth``, imported on use)."""
    from toyworld.plugin_truth import ToyTruth

    return ToyTruth()


MODEL = ModelPlugin(load=load, build_unet=build_unet, check_prompt=check_prompt, truth=truth,
                    description="the bundled toy text-to-image model (toyworld/weights)")


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
