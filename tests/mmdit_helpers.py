"""Tiny MMDiT calls shared by the joint-processor and hooks tests: one transformer call with the
inputs the pipelines build, and its output."""

from __future__ import annotations

import torch

B, TEXT, LATENT = 2, 5, 8  # two images, 5 text tokens, an 8 x 8 latent: a 4 x 4 token grid
N = (LATENT // 2) ** 2


def inputs(family: str, model) -> dict:
    """One transformer call as the pipelines make it (FLUX: packed latents, img_ids / txt_ids as
    ``FluxPipeline._prepare_latent_image_ids`` and ``encode_prompt`` build them)."""
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    text = torch.randn(B, TEXT, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(B, cfg.pooled_projection_dim, generator=g)
    t = torch.tensor([700.0, 300.0])
    if family == "sd3":
        x = torch.randn(B, cfg.in_channels, LATENT, LATENT, generator=g)
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t)
    side = LATENT // 2
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] += torch.arange(side)[:, None]
    img_ids[..., 2] += torch.arange(side)[None, :]
    return dict(hidden_states=torch.randn(B, side * side, cfg.in_channels, generator=g), encoder_hidden_states=text,
                pooled_projections=pooled, timestep=t / 1000, img_ids=img_ids.reshape(-1, 3),
                txt_ids=torch.zeros(TEXT, 3), guidance=torch.full([B], 3.5))


def forward(model, family):
    with torch.no_grad():
        return model(**inputs(family, model)).sample
