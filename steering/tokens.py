"""Where a word sits in a prompt: token indices of the text sequence the denoiser reads.

The layout of that text is declared per family and read through ``activations.text.text_layout``
(U-Nets: one tokenizer's tokens, start token at 0; SD3: the CLIP tokens, then the T5 tokens, so a
word has a position in each and a word edit acts on both; FLUX: T5 tokens only, and a real T5
tokenizer has no start token, so the first word is token 0). ``word_positions`` is
``activations.text.word_positions``. A token given as an index is used as is, checked against the
whole text length (``activations.text.text_length``: the joint text of an MMDiT).
"""

from __future__ import annotations

from activations.text import text_layout, text_length, word_positions
from common.errors import UsageError


def _written(pipe) -> list:
    """The segments of ``pipe``'s text that a tokenizer writes, in order."""
    return [seg for seg in text_layout(pipe) if seg.tokenizer is not None]


def _ids(seg, prompt: str) -> list[int]:
    return list(seg.tokenizer(prompt, truncation=True, max_length=seg.length)["input_ids"])


def shown_tokens(pipe, prompt: str) -> list[str]:
    """The prompt's tokens in the first segment (it starts at 0: token k is text position k),
    special tokens included."""
    seg = _written(pipe)[0]
    return [t.replace("</w>", "") for t in seg.tokenizer.convert_ids_to_tokens(_ids(seg, prompt))]


def word_indices(pipe, prompt: str, shown_only: bool = False) -> list[int]:
    """Text positions of the prompt's word tokens (no start, end or padding token) in every segment
    (only the first, which ``shown_tokens`` lists, with ``shown_only``)."""
    out = []
    for seg in _written(pipe)[: 1 if shown_only else None]:
        tok = seg.tokenizer
        special = {int(i) for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}
        out += [seg.start + k for k, i in enumerate(_ids(seg, prompt)) if i not in special]
    return out


def resolve_tokens(pipe, prompts, token) -> list[list[int]]:
    """Per prompt, the text positions of ``token`` (a word, found by ``word_positions``, or a token
    index used as is, checked against the text length)."""
    if isinstance(token, int) and not isinstance(token, bool):
        n = text_length(pipe)
        if not 0 <= token < n:
            counts = "; ".join(f"the prompt {p!r} has {len(word_indices(pipe, p, shown_only=True))} word tokens" for p in prompts[:3])
            raise UsageError(f"token index {token} out of range for this model's text of {n} tokens (valid: 0..{n - 1}; {counts})")
        return [[token] for _ in prompts]
    return [word_positions(pipe, p, str(token)) for p in prompts]


__all__ = ["resolve_tokens", "shown_tokens", "word_indices", "word_positions"]
