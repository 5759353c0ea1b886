"""Tiny MMDiT calls shared by the MMDiT tests: one transformer call with the inputs the pipelines
build, its output, and the joint attention written out by hand."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

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


def capture_inputs(module):
    """The inputs of ``module``'s latest call, and the hook's handle."""
    seen = {}

    def hook(mod, args, kwargs):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["ctx"] = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        seen["rope"] = kwargs.get("image_rotary_emb")

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def by_hand(attn, x, ctx, rope, flux: bool, text: int = TEXT):
    """q, k, v of the joint sequence [b, h, S, d] and the (text, image) slices, written out
    (FLUX puts the text first, SD3 last; ``text``: the text length)."""
    h = attn.heads

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], h, -1)

    def norm(f, t):
        return t if f is None else f(t)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
    q, k = norm(attn.norm_q, q), norm(attn.norm_k, k)
    if ctx is not None:
        tq, tk, tv = heads(attn.add_q_proj(ctx)), heads(attn.add_k_proj(ctx)), heads(attn.add_v_proj(ctx))
        tq, tk = norm(attn.norm_added_q, tq), norm(attn.norm_added_k, tk)
        cat = (lambda t, i: torch.cat([t, i], 1)) if flux else (lambda t, i: torch.cat([i, t], 1))
        q, k, v = cat(tq, q), cat(tk, k), cat(tv, v)
    if rope is not None:
        q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    seq = q.shape[2]
    txt, img = (slice(0, text), slice(text, seq)) if flux else (slice(seq - text, seq), slice(0, seq - text))
    return q, k, v, txt, img
