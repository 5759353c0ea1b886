"""Recipes: saved from Python, run from the command line, the same images bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sae.config import Placement, SparseCoderConfig
from sae.registry import get_architecture
from steering import FeatureEdit, HeadScale, Recipe, steer

SITE = "up_blocks.2.attentions.0"


def test_recipe__saved_from_python_run_from_the_cli_gives_the_same_images(toy_pipe, tmp_path):
    from activations.generate import sample
    from diffatlas.cli import main

    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=32, k=4), 64)
    sae.placement = Placement(site=SITE)
    folder = sae.save_pretrained(tmp_path / "sae")
    recipe = Recipe(model="toy", prompts=["a red circle on a white background", "a blue square"], seeds=[3, 4], steps=3,
                    guidance=4.0, interventions=[
                        FeatureEdit(sae=str(folder), features=[1], op="spatial", strength=8.0,
                                    region={"quadrant": "top left"}, when="early"),
                        HeadScale(heads=[40, 41], factor=0.0, mask={"box": [0, 0, 0.5, 1]}, when={"steps": [1, 2]})])
    path = recipe.save(tmp_path / "recipe.yaml")
    with steer(toy_pipe, *recipe.interventions, prompts=recipe.prompts):
        expected = sample(toy_pipe, recipe.prompts, recipe.seeds, steps=3, guidance=4.0).images
    plain = sample(toy_pipe, recipe.prompts, recipe.seeds, steps=3, guidance=4.0).images

    assert main(["steer", str(path), "--out", str(tmp_path / "out"), "--wandb", "false"]) == 0
    for k in range(2):
        got = np.asarray(Image.open(tmp_path / "out" / "after" / f"{k:04d}.png"))
        assert np.array_equal(got, np.asarray(expected[k]))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "before" / f"{k:04d}.png")), np.asarray(plain[k]))
    assert (tmp_path / "out" / "before_after.png").is_file()
    assert Recipe.load(tmp_path / "out" / "recipe.yaml").to_dict() == recipe.to_dict()


def test_recipe__bad_fields_and_seed_counts_are_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("prompts: [a red circle]\nsteeps: 3\n")
    with pytest.raises(ValueError, match=r"unknown recipe field\(s\) \['steeps'\].*valid fields: guidance"):
        Recipe.load(path)
    with pytest.raises(ValueError, match="2 prompts, 1 seeds"):
        Recipe(prompts=["a red circle", "a blue square"], seeds=[0])
    with pytest.raises(ValueError, match="unknown intervention kind 'feature_edits'.*feature_edit"):
        Recipe(prompts=["a"], interventions=[{"kind": "feature_edits"}])
