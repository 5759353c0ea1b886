"""Prompt text to the embeddings the denoiser reads (a U-Net's cross-attention keys and values,
an MMDiT's text stream): the one place that calls the pipeline's ``encode_prompt``.

Going through the pipeline's own method keeps every model's details (SD 1.x's one encoder, SDXL's
two encoders' penultimate states concatenated, SD3's CLIP and T5 tokens one after the other,
clip skip, attention masks) in diffusers, so HRV words, evaluation, head swaps, the harvest of
real images and the explorer all read exactly what generation feeds the denoiser. Where each
tokenizer's tokens sit in that text is ``text_layout``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

import torch

from activations.families import architecture_of, denoiser_of
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


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of the text the denoiser reads: ``length`` tokens from ``start``, written by
    ``tokenizer`` (None: tokens that carry no words, such as SD3's zeros where it has no T5)."""

    tokenizer: object | None
    start: int
    length: int


def text_layout(pipe) -> list[Segment]:
    """The segments of the text ``pipe``'s denoiser reads, in sequence order, as its family declares
    them (``Architecture.text_segments``): SD 1.x/2.x/SDXL one padded prompt; SD3 the CLIP tokens
    then the T5 tokens; FLUX the T5 tokens only. A word's token index in the text is its index
    under the segment's tokenizer plus the segment's start."""
    if denoiser_of(pipe) is pipe or not callable(pipe):
        raise UsageError(f"{type(pipe).__name__} is not a pipeline: its text layout needs the pipeline's tokenizers")
    segments, start = [], 0
    for attr, n in architecture_of(pipe).text_segments(pipe, call_options(pipe).get("max_sequence_length")):
        segments.append(Segment(getattr(pipe, attr) if attr else None, start, int(n)))
        start += int(n)
    return segments


def text_length(pipe) -> int | None:
    """The text length of ``pipe``'s calls: the token axis of its attention maps (a U-Net's padded
    prompt; an MMDiT's joint text, e.g. SD3's CLIP then T5 tokens) and the length of its
    text-stream sites. None for a bare denoiser (or an object holding one that is not a pipeline),
    which has no tokenizer to say."""
    if denoiser_of(pipe) is pipe or not callable(pipe):
        return None
    return sum(seg.length for seg in text_layout(pipe))


def semantic_mask(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """[b, text_length] bool: True on each prompt's own tokens in every segment, False on start,
    end and padding tokens and where no tokenizer writes."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    masks = []
    for seg in text_layout(pipe):
        if seg.tokenizer is None:
            masks.append(torch.zeros(len(prompts), seg.length, dtype=torch.bool))
            continue
        ids = seg.tokenizer(prompts, padding="max_length", max_length=seg.length, truncation=True, return_tensors="pt").input_ids
        masks.append(~torch.isin(ids, torch.tensor(sorted(set(seg.tokenizer.all_special_ids)))))
    return torch.cat(masks, 1)


def word_positions(pipe, prompt: str, word: str) -> list[int]:
    """Indices in ``prompt``'s text of ``word``'s tokens: its first occurrence in every segment
    that has a tokenizer (SD3: in the CLIP tokens and again in the T5 tokens). A word the prompt
    does not contain is a UsageError naming the prompt's words."""
    out = []
    for seg in text_layout(pipe):
        if seg.tokenizer is None:
            continue
        tok = seg.tokenizer
        ids = list(tok(prompt, truncation=True, max_length=seg.length)["input_ids"])
        sub = list(tok(word, add_special_tokens=False)["input_ids"])
        for i in range(len(ids) - len(sub) + 1) if sub else ():
            if ids[i: i + len(sub)] == sub:
                out += [seg.start + i + k for k in range(len(sub))]
                break
    if not out:
        tok = next(seg.tokenizer for seg in text_layout(pipe) if seg.tokenizer is not None)
        ids = tok(prompt, truncation=True)["input_ids"]
        words = [w for w in tok.convert_ids_to_tokens(ids) if w not in tok.all_special_tokens]
        raise UsageError(f"token {word!r} is not in the prompt {prompt!r}; its tokens: {', '.join(words)}")
    return out
