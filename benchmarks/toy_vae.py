"""The ceiling the toy VAE puts on generation: the oracle's accuracy on VAE reconstructions.

    python benchmarks/toy_vae.py [--vae toyworld/weights/vae] [--n 400]

Renders held-out one-object scenes, encodes them to posterior means, decodes, and reads the
reconstructions with the pixel oracle. The U-Net can do no better than this per attribute.
Last line: {"n": ..., "one_object": {attribute: accuracy}}.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class VAEConfig:
    vae: str = "toyworld/weights/vae"
    """A diffusers AutoencoderKL folder."""
    n: int = 400
    """Scenes to reconstruct (one object each, held-out split)."""
    seed: int = 1234
    """Seed of the scenes."""
    batch_size: int = 100
    """Images per encode/decode batch."""


def main(argv: list[str] | None = None) -> dict:
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from common.config import parse
    from toyworld.oracle import REPORTED, check_image
    from toyworld.render import render
    from toyworld.scene import sample_scene
    from toyworld.train import to_images, to_tensor

    cfg = parse(VAEConfig, argv, "toy_vae", __doc__.split("\n\n")[0])
    vae = AutoencoderKL.from_pretrained(cfg.vae, torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng, num_objects=1, split="test") for _ in range(cfg.n)]
    verdicts = []
    for start in tqdm(range(0, cfg.n, cfg.batch_size), desc="reconstruct", unit="batch"):
        batch = scenes[start : start + cfg.batch_size]
        with torch.no_grad():
            images = torch.stack([to_tensor(render(s).image) for s in batch])
            recon = vae.decode(vae.encode(images).latent_dist.mean).sample
        for scene, image in zip(batch, to_images(recon)):
            verdicts.append(check_image(scene, image))
    result = {"n": cfg.n, "one_object": {k: round(float(np.mean([v[k] for v in verdicts])), 3) for k in REPORTED}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
