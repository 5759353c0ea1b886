"""The same image everywhere: generate, the harvester and a traced pipeline call give the same image
for the same prompt, seed, steps and guidance (bit for bit at one batch size, within float
tolerance across batch sizes); and block and head rows harvested at one image, step and position
join on (image, step, i, j)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from activations.config import HarvestConfig, PromptSource
from activations.generate import generate, sample
from activations.harvest import harvest
from activations.store import ActivationStore
from activations.trace import trace

PROMPTS = ["a big red plain circle at the center on a gray background, by day",
           "a small blue striped square at the top left on a black background, at night"]
STEPS, GUIDANCE = 3, 4.0
BLOCK = "down_blocks.1.attentions.0"
HEAD = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def pipe(random_toy_pipe):
    return random_toy_pipe


@pytest.fixture(autouse=True)
def one_thread():
    # CPU kernels round differently with other thread counts; the harvester runs with its
    # config's `threads` (1 by default), so every side of a comparison runs with 1 here
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def generated(pipe, batch_size):
    return [np.asarray(im) for _, _, im in generate(pipe, [(p, 7 + k) for k, p in enumerate(PROMPTS)], STEPS, GUIDANCE,
                                                    batch_size=batch_size, progress=False)]


def test_generate_harvest_and_trace__give_the_same_image(pipe, tmp_path):
    ref = generated(pipe, batch_size=2)
    cfg = HarvestConfig(model="toy", out=str(tmp_path / "h"), sites=[BLOCK], seed=7, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, prompts=PromptSource(kind="list", texts=PROMPTS), batch_size=2,
                        images_per_shard=2, progress=False)
    harvest(cfg, pipe=pipe)
    store = ActivationStore(tmp_path / "h")
    harvested = [np.asarray(Image.open(store.image_path(i))) for i in range(2)]
    with trace(pipe, sites=BLOCK):
        traced = [np.asarray(im) for im in sample(pipe, PROMPTS, [7, 8], steps=STEPS, guidance=GUIDANCE).images]
    for a, b, c in zip(ref, harvested, traced):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_across_batch_sizes__within_float_tolerance(pipe):
    one_by_one, together = generated(pipe, batch_size=1), generated(pipe, batch_size=2)
    for a, b in zip(one_by_one, together):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # uint8 levels: rounding of batched kernels


def test_block_and_head_rows__join_on_image_step_and_position(pipe, tmp_path):
    cfg = HarvestConfig(model="toy", out=str(tmp_path / "j"), sites=[BLOCK, HEAD], seed=3, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, prompts=PromptSource(kind="toyworld", num_prompts=3), positions=5,
                        batch_size=3, images_per_shard=3, save_images=False, progress=False)
    harvest(cfg, pipe=pipe)
    store = ActivationStore(tmp_path / "j")
    keys = []
    for site in (BLOCK, HEAD):
        reader = store.site(site)
        _, meta = reader.read(np.arange(reader.num_rows))
        keys.append({(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(meta["image"], meta["step"], meta["i"], meta["j"])})
    assert keys[0] == keys[1] and len(keys[0]) == 3 * STEPS * 5
    # positions differ between steps (drawn from seed, image and step)
    steps_of = {}
    for image, step, i, j in keys[0]:
        steps_of.setdefault((image, step), set()).add((i, j))
    assert steps_of[(0, 0)] != steps_of[(0, 1)] or steps_of[(0, 1)] != steps_of[(0, 2)]
