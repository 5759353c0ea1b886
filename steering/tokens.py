"""Where a word sits in a prompt: token indices of the text sequence the denoiser reads, found with
the pipeline's own tokenizers.

The text sequence's layout is declared per family (``activations.families.Architecture.text_segments``):

* U-Nets: one tokenizer's tokens (start token at 0; SDXL's two encoders share the positions);
* SD3: ``[CLIP tokens (tokenizer_max_length), T5 tokens (max_sequence_length)]``: a word has a
  position in each segment, and a word edit acts on both;
* FLUX: T5 tokens only (``tokenizer_2``; the CLIP tokenizer only feeds the pooled vector). A real
  T5 tokenizer has no start token, so the first word is token 0.

A token given as an index is used as is, checked against the whole text length
(``activations.sites.text_length``: the joint text of an MMDiT).
"""

from __future__ import annotations

from common.errors import UsageError


def prompt_ids(tokenizer, prompt: str, max_length: int | None = None) -> list[int]:
    """The prompt's token ids, special tokens included, unpadded, truncated at ``max_length``
    (None: the tokenizer's ``model_max_length``)."""
    return list(tokenizer(prompt, truncation=True, max_length=int(max_length or tokenizer.model_max_length))["input_ids"])


def segments(pipe) -> list[tuple[object, int, int]]:
    """(tokenizer, offset, length) of each part of ``pipe``'s text sequence, in order
    (``Architecture.text_segments``)."""
    from activations.families import architecture_of
    from activations.pipeline import call_options

    layout = architecture_of(pipe).text_segments(pipe, call_options(pipe).get("max_sequence_length"))
    out = []
    for attr, offset, length in layout:
        tokenizer = getattr(pipe, attr, None)
        if tokenizer is not None:
            out.append((tokenizer, int(offset), int(length)))
    if not out:
        raise UsageError(f"{type(pipe).__name__} has none of the tokenizers its text sequence is made of "
                         f"({', '.join(a for a, *_ in layout)}); load the pipeline with them")
    return out


def sequence_length(pipe) -> int:
    """The length of the text sequence the denoiser reads (an MMDiT's joint text; a U-Net's padded prompt)."""
    from activations.sites import text_length

    n = text_length(pipe)
    return int(n) if n is not None else max(offset + length for _, offset, length in segments(pipe))


def shown_tokens(pipe, prompt: str) -> list[str]:
    """The prompt's tokens in the first segment (offset 0: token k is text position k), special tokens included."""
    tokenizer, _, length = segments(pipe)[0]
    return [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(prompt_ids(tokenizer, prompt, length))]


def _specials(tokenizer) -> set[int]:
    return {int(i) for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}


def word_indices(pipe, prompt: str, shown_only: bool = False) -> list[int]:
    """Text positions of the prompt's word tokens (no start, end or padding token) in every segment
    (only the first, which ``shown_tokens`` lists, with ``shown_only``)."""
    out = []
    for tokenizer, offset, length in segments(pipe)[: 1 if shown_only else None]:
        special = _specials(tokenizer)
        out += [offset + k for k, i in enumerate(prompt_ids(tokenizer, prompt, length)) if i not in special]
    return out


def token_positions(tokenizer, prompt: str, word: str, max_length: int | None = None) -> list[int]:
    """Token indices of ``word``'s tokens in ``prompt`` (its first occurrence) for one tokenizer.

    A word of several tokens gives all of them. Raises a UsageError naming the word and the
    prompt's words when the word is not in the prompt.
    """
    found = _find(tokenizer, prompt, word, max_length)
    if found is None:
        ids = prompt_ids(tokenizer, prompt, max_length)
        words = [w for w in tokenizer.convert_ids_to_tokens(ids) if w not in tokenizer.all_special_tokens]
        raise UsageError(f"token {word!r} is not in the prompt {prompt!r}; its tokens: {', '.join(words)}")
    return found


def _find(tokenizer, prompt: str, word: str, max_length: int | None) -> list[int] | None:
    ids = prompt_ids(tokenizer, prompt, max_length)
    sub = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    if sub:
        for start in range(len(ids) - len(sub) + 1):
            if ids[start:start + len(sub)] == sub:
                return list(range(start, start + len(sub)))
    return None


def word_positions(pipe, prompt: str, word: str) -> list[int]:
    """Text positions of ``word`` in ``prompt`` in ``pipe``'s text sequence: its first occurrence in
    each segment (SD3: the CLIP tokens and the T5 tokens). A word in no segment is a UsageError
    naming it and the prompt's tokens."""
    out = []
    parts = segments(pipe)
    for tokenizer, offset, length in parts:
        found = _find(tokenizer, prompt, word, length)
        out += [offset + k for k in found or []]
    if not out:
        token_positions(parts[0][0], prompt, word, parts[0][2])  # raises, naming the prompt's tokens
    return out


def resolve_tokens(pipe, prompts, token) -> list[list[int]]:
    """Per prompt, the text positions of ``token`` (a word, found by ``word_positions``, or a token
    index used as is, checked against the text length)."""
    if isinstance(token, int) and not isinstance(token, bool):
        n = sequence_length(pipe)
        if not 0 <= token < n:
            counts = "; ".join(f"the prompt {p!r} has {len(word_indices(pipe, p, shown_only=True))} word tokens" for p in prompts[:3])
            raise UsageError(f"token index {token} out of range for this model's text of {n} tokens (valid: 0..{n - 1}; {counts})")
        return [[token] for _ in prompts]
    return [word_positions(pipe, p, str(token)) for p in prompts]
