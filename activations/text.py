"""Prompt text to the embeddings the denoiser reads (a U-Net's cross-attention keys and values,
an MMDiT's text stream): the one place that calls the pipeline's ``encode_prompt``.

Going through the pipeline's own method keeps every model's details (SD 1.x's one encoder, SDXL's
two encoders' penultimate states concatenated, SD3's CLIP and T5 tokens one after the other,
clip skip, attention masks) in diffusers, so HRV
words, evaluation, head swaps and the explorer all read exactly what generation feeds the U-Net.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from activations.pipeline import call_options
from common.errors import UsageError


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], batch_size: int | None = None, *, full: bool = False):
    """Conditional prompt embeddings [n, tokens, width] on ``pipe.device``, in the pipeline's dtype.

    ``batch_size`` bounds how many prompts go through the text encoder at once (None: all).
    ``full``: the whole tuple the pipeline's ``encode_prompt`` returns instead, i.e. everything its
    denoiser call reads (SD 1.x / 2.x: embeds, None; SDXL and SD3: embeds, None, pooled, None;
    FLUX: embeds, pooled, text ids), which ``Architecture.denoise`` interprets. Per-prompt tensors
    are concatenated over the batches; the others (FLUX's text ids [tokens, 3]) come from the first.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UsageError("encode_prompts: no prompts to encode (got an empty list)")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"encode_prompts: batch_size must be a positive integer or None, got {batch_size!r}")
    step = batch_size or len(prompts)
    # keywords, not positions: SDXL's encode_prompt takes prompt_2 second, SD's takes the device.
    # What each pipeline's method accepts decides the rest: SD3 needs prompt_2 / prompt_3 (None:
    # the same prompt for every encoder) and FLUX has no guidance switch (no uncond branch)
    params = inspect.signature(pipe.encode_prompt).parameters
    extra = {k: v for k, v in call_options(pipe).items() if k in params}
    extra.update({k: None for k in ("prompt_2", "prompt_3") if k in params})
    if "do_classifier_free_guidance" in params:
        extra["do_classifier_free_guidance"] = False
    chunks = []
    for lo in range(0, len(prompts), step):
        out = pipe.encode_prompt(prompt=prompts[lo : lo + step], device=pipe.device, num_images_per_prompt=1, **extra)
        chunks.append((len(prompts[lo : lo + step]), tuple(out) if full else out[0]))
    if not full:
        return chunks[0][1] if len(chunks) == 1 else torch.cat([c for _, c in chunks])
    if len(chunks) == 1:
        return chunks[0][1]
    return tuple(_join([c[k] for _, c in chunks], [n for n, _ in chunks]) for k in range(len(chunks[0][1])))


def _join(parts: list, sizes: list[int]):
    """One element of ``encode_prompt``'s tuple over batches of ``sizes`` prompts: the batches'
    tensors concatenated where every one has a row per prompt, else the first batch's."""
    first = parts[0]
    if torch.is_tensor(first) and all(torch.is_tensor(p) and p.shape[0] == n for p, n in zip(parts, sizes)):
        return torch.cat(parts)
    return first
