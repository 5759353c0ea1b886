"""Token grounding: supervise a toy denoiser's text-attention maps with the world's object masks.

A denoising loss alone teaches a small model from scratch what the *global* words mean (background,
style) long before it learns which patches an object's words belong to: the binding that
composition needs. The toy world knows every object's pixels, so training can say it directly:
each object word (its size, colour, texture, shape and position words, and the generic noun
"shape") should draw its
cross-attention from the patches of its own object. This is TokenCompose's token loss
(Wang et al., 2024, "TokenCompose: Text-to-Image Diffusion with Token-level Supervision", eq. 2):

    L_token = mean over supervised tokens i of (1 - sum_{u in B_i} A_{u,i} / sum_u A_{u,i})^2

with A the attention probabilities (patches u x tokens i) averaged over the heads of one
cross-attention module and B_i the patches of token i's object. Averaging over heads leaves each
head free to specialise, which is what the head-level analysis later measures. Function words,
the background and the style words get no grounding target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange

from toyworld.prompts import ADJECTIVES, GENERIC_NOUN, split_words
from toyworld.render import Rendered, patch_coverage
from toyworld.vocab import POSITIONS, SHAPES

NOUNS = frozenset(SHAPES + (GENERIC_NOUN,))
OBJECT_WORDS = frozenset(ADJECTIVES) | NOUNS | frozenset(w for p in POSITIONS for w in p.split())
OPENS_OBJECT = frozenset(ADJECTIVES) | NOUNS  # "a" followed by one of these starts an object phrase


def word_owners(prompt: str) -> list[int]:
    """For each word of ``prompt`` (as the toy tokenizer splits it), the index of the object it
    describes, or -1 (function words, background, style). Objects are numbered in prompt order,
    which is scene order for prompts written by ``scene_to_prompt``; a short caption's bare
    adjectives ("big red, at night") describe its one object."""
    words = split_words(prompt)
    owners, current = [], -1
    for i, word in enumerate(words):
        if word == "a" and i + 1 < len(words) and words[i + 1] in OPENS_OBJECT:
            current += 1
        elif current < 0 and word in ADJECTIVES:
            current = 0
        owners.append(current if word in OBJECT_WORDS and current >= 0 else -1)
    return owners


def token_owners(prompt: str, num_tokens: int) -> torch.Tensor:
    """``word_owners`` at token positions: int64 [num_tokens], the start token and padding -1."""
    owners = torch.full((num_tokens,), -1, dtype=torch.long)
    words = word_owners(prompt)[: num_tokens - 2]
    owners[1 : 1 + len(words)] = torch.tensor(words, dtype=torch.long)
    return owners


def object_masks(rendered: Rendered, grid: int, max_objects: int = 2) -> torch.Tensor:
    """Share of each patch of a ``grid`` x ``grid`` map that each object of a rendered scene
    covers, zero rows for absent objects: float [max_objects, grid, grid]."""
    cover = torch.from_numpy(patch_coverage(rendered.masks, grid))
    out = torch.zeros(max_objects, grid, grid)
    out[: len(cover)] = cover
    return out


@contextlib.contextmanager
def record_cross_attention(unet) -> Iterator[list[torch.Tensor]]:
    """While open, every text-attention module of ``unet`` (a U-Net's cross-attention, an MMDiT's
    joint attention) appends its head-averaged attention probabilities [b, patches, tokens] to the
    yielded list, in call order, with gradients (clear it before each forward pass). Uses the
    project's attention processors (activations.processor, activations.joint_processor), whose
    explicit path computes exactly these probabilities; an MMDiT's are the image-query x text-key
    slice of its joint softmax, so a row sums to the share of attention on the text (< 1), which
    ``grounding_loss`` is indifferent to: it compares each token's mass inside its object with its
    mass over all patches."""
    from activations.hooks import attach
    from activations.sites import list_sites

    store: list[torch.Tensor] = []

    def record(call) -> None:
        store.append(call.probs.mean(dim=1))

    with attach(unet) as tap, contextlib.ExitStack() as observers:
        for site in list_sites(unet):
            if site.kind == "head":
                observers.enter_context(tap.observe_heads(site.name, record, needs=("probs",)))
        yield store


def grounding_loss(maps: list[torch.Tensor], owners: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss averaged over the cross-attention modules.

    maps: head-averaged probabilities, one [b, n, t] per module (n = g*g patches);
    owners: int [b, t], the object each token describes or -1; masks: float [b, objects, G, G]
    object coverage on the finest grid G. A patch belongs to an object when the object covers any
    of it, so the target is reachable at every resolution.
    """
    supervised = owners >= 0
    if not supervised.any():
        return maps[0].new_zeros(())
    losses = []
    for probs in maps:
        grid = int(round(probs.shape[1] ** 0.5))
        cover = F.adaptive_avg_pool2d(masks, grid) if grid != masks.shape[-1] else masks
        inside = rearrange((cover > 0).to(probs.dtype), "b o gh gw -> b o (gh gw)")
        target = torch.gather(inside, 1, owners.clamp(min=0)[..., None].expand(-1, -1, inside.shape[-1]))  # [b, t, n]
        mass = probs.transpose(1, 2)  # [b, t, n]
        ratio = (mass * target).sum(-1) / mass.sum(-1).clamp(min=1e-8)
        losses.append(((1 - ratio) ** 2)[supervised].mean())
    return torch.stack(losses).mean()
