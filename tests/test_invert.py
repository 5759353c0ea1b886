"""Inversion: a real image to the noise its pipeline draws it again from; drawing again reproduces
it (near exactly with the fixed-point refinement), on the toy U-Net (DDIM) and tiny MMDiTs (Euler)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from activations.evaluate import vae_latents
from activations.invert import invert
from activations.models import build_tiny_pipeline
from common.errors import UsageError

CAPTIONS = ["a red cat", "a dog"]


def latents_of(pipe, pixels):
    x = torch.stack([torch.from_numpy(np.array(p)) for p in pixels]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        return vae_latents(pipe.vae, x)


def drawn_again(pipe, inversion, captions):
    out = inversion.sample(pipe, captions, output_type="latent").images
    if out.ndim == 3:  # FLUX returns its packed tokens
        h, w = inversion.latents.shape[-2:]
        out = pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)
    return out


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_mmdit_inversion_draws_the_image_again_and_refining_makes_it_near_exact(family):
    pipe = build_tiny_pipeline(family)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in CAPTIONS]
    x0 = latents_of(pipe, pixels)
    errors = {}
    for refine in (0, 3):
        out = drawn_again(pipe, invert(pipe, pixels, CAPTIONS, 10, refine=refine), CAPTIONS)
        errors[refine] = float((out - x0).norm() / x0.norm())
    assert errors[3] < 0.05 < errors[0], errors


def test_toy_unet_inversion_of_renders_reads_back_every_attribute(tmp_path):
    from activations.pipeline import load_pipeline
    from toyworld.oracle import check_image
    from toyworld.prompts import scene_to_prompt
    from toyworld.render import render
    from toyworld.scene import sample_scene

    pipe = load_pipeline("toy", device="cpu")
    scenes = [sample_scene(np.random.default_rng([21, i, 0])) for i in range(4)]
    captions = [scene_to_prompt(s, np.random.default_rng([21, i, 1])) for i, s in enumerate(scenes)]
    pixels = [render(s).image for s in scenes]
    inversion = invert(pipe, pixels, captions, 25)
    assert inversion.sampler == "DDIMScheduler" and inversion.guidance == 1.0
    images = inversion.sample(pipe, captions, output_type="np").images
    read = [check_image(s, (im * 255).round().astype(np.uint8)) for s, im in zip(scenes, images)]
    assert np.mean([v for r in read for v in r.values()]) >= 0.9, read
    assert isinstance(pipe.scheduler, type(load_pipeline("toy", device="cpu").scheduler))  # the sampler is put back


def test_bad_input_is_one_line():
    pipe = build_tiny_pipeline("sd3")
    pixels = [np.zeros((16, 16, 3), dtype=np.uint8)]
    with pytest.raises(UsageError, match="one caption per image, got 2 for 1 images"):
        invert(pipe, pixels, CAPTIONS, 4)
    with pytest.raises(UsageError, match="refine must be a whole number >= 0, got -1"):
        invert(pipe, pixels, CAPTIONS[:1], 4, refine=-1)


def test_invert_cli_then_a_recipe_edits_the_real_images(tmp_path):
    """diffatlas invert writes an inversion; a recipe with `inversion:` draws the real images again
    (before: the reconstruction) and edits them; the inversion of another model is refused."""
    from PIL import Image

    from activations.invert import InvertConfig, load, run
    from steering.recipe import Recipe, run_recipe
    from toyworld.render import render
    from toyworld.scene import sample_scene

    scenes = [sample_scene(np.random.default_rng([22, i, 0])) for i in range(2)]
    paths = []
    for i, s in enumerate(scenes):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(render(s).image).save(paths[-1])
    captions = ["a circle", "a square"]
    folder = run(InvertConfig(images=paths, captions=captions, steps=8, out=str(tmp_path / "inv"), device="cpu"))
    inverted, meta = load(folder)
    assert inverted.latents.shape[0] == 2 and meta["captions"] == captions and (folder / "reconstruction.png").exists()
    recipe = Recipe(model="toy", prompts=captions, seeds=[], steps=None, guidance=None, inversion=str(folder),
                    interventions=[{"kind": "head_scale", "factor": 0.0,
                                    "heads": [["mid_block.attentions.0.transformer_blocks.0.attn2", h] for h in range(4)]}])
    assert (recipe.steps, recipe.guidance) == (8, 1.0)
    again = Recipe.from_dict(recipe.to_dict())
    assert again.inversion == recipe.inversion
    from activations.pipeline import load_pipeline

    pipe = load_pipeline("toy", device="cpu")
    before, after = run_recipe(again, pipe, output_type="np")
    assert np.abs(before - inverted.sample(pipe, captions, output_type="np").images).max() < 1e-5
    assert np.abs(after - before).max() > 0.01
    with pytest.raises(UsageError, match="holds 2 images; the recipe has 1 prompts"):
        Recipe(model="toy", prompts=captions[:1], seeds=[], steps=None, guidance=None, inversion=str(folder), interventions=[])
    with pytest.raises(UsageError, match="steps 25 differs from the inversion's 8"):
        Recipe(model="toy", prompts=captions, seeds=[], steps=25, guidance=None, inversion=str(folder), interventions=[])
    with pytest.raises(UsageError, match="inversion.safetensors does not exist"):
        Recipe(model="toy", prompts=captions, seeds=[], steps=None, guidance=None, inversion=str(tmp_path), interventions=[])


@pytest.mark.parametrize("args, message", [
    (["--images", "[]"], "--images is empty"),
    (["--images", "[a.png]", "--captions", "[]"], "one caption per image: 1 images, 0 captions"),
    (["--images", "[missing.png]", "--captions", "['a circle']"], "cannot read image .*missing.png"),
    (["--images", "[small.png]", "--captions", "['a circle']"], "is 16 x 16 pixels; model 'toy' takes 64 x 64"),
    (["--images", "[small.png]", "--captions", "['a unicorn']"], "unicorn"),
    (["--images", "[small.png]", "--captions", "['a circle']", "--refine", "-1"], "refine"),
    (["--images", "[small.png]", "--captions", "['a circle']", "--refine", "1000000"], "refine"),
    (["--images", "[small.png]", "--captions", "['a circle']", "--steps", "0"], "--steps must be an integer >= 1"),
    (["--images", "[small.png]", "--captions", "['a circle']", "--steps", "100000"], "--steps must be an integer >= 1"),
    (["--images", "[small.png]", "--captions", "['a circle']", "--guidance", "nan"], "--guidance must be a number"),
    (["--images", "[small.png]", "--captions", "['a circle']", "--guidance", "inf"], "--guidance must be a number"),
])
def test_invert_cli_bad_input_is_one_line_before_any_work(tmp_path, args, message):
    from PIL import Image

    from harvest_helpers import run_cli

    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    args = [a.replace("small.png", str(tmp_path / "small.png")).replace("missing.png", str(tmp_path / "missing.png")) for a in args]
    done = run_cli(["invert", *args, "--out", str(tmp_path / "out")])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("diffatlas invert: error:"), done.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_a_windowed_edit_sees_the_steps_of_each_redrawing():
    """Drawing again swaps in the DDIM sampler under an attached Tap: every redrawing is counted
    from step 0, so a windowed observer sees the same late steps each time."""
    from activations.edits import Observe
    from activations.generate import schedule
    from activations.hooks import intervene
    from activations.pipeline import load_pipeline
    from activations.timesteps import select_steps

    pipe = load_pipeline("toy", device="cpu")
    pixels = [np.zeros((64, 64, 3), dtype=np.uint8)]
    inversion = invert(pipe, pixels, ["a circle"], 8, refine=0)
    seen = []
    with intervene(pipe, Observe(site="mid_block.attentions.0", fn=lambda call: seen.append(call.step), when="late")):
        inversion.sample(pipe, ["a circle"], output_type="latent")
        inversion.sample(pipe, ["a circle"], output_type="latent")
    late = select_steps("late", schedule(pipe, 8), 1000)
    assert late and seen == late + late
