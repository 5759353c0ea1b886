"""Where a word sits in a prompt, with the pipeline's own tokenizer (token indices of the text
encoder's output, start token included)."""

from __future__ import annotations

from common.errors import UsageError


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids, start and end tokens included, unpadded (what recipes, HRV edits and
    the explorer index tokens by)."""
    return list(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"])


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token indices of ``word``'s tokens in ``prompt`` (its first occurrence).

    A word of several tokens gives all of them. Raises a ValueError naming the word and the
    prompt's words when the word is not in the prompt.
    """
    ids = prompt_ids(tokenizer, prompt)
    sub = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    if sub:
        for start in range(len(ids) - len(sub) + 1):
            if ids[start:start + len(sub)] == sub:
                return list(range(start, start + len(sub)))
    words = [w for w in tokenizer.convert_ids_to_tokens(ids) if w not in tokenizer.all_special_tokens]
    raise UsageError(f"token {word!r} is not in the prompt {prompt!r}; its tokens: {', '.join(words)}")


def resolve_tokens(tokenizer, prompts, token) -> list[list[int]]:
    """Per prompt, the token indices of ``token`` (a word, or a token index used as is)."""
    if isinstance(token, int) and not isinstance(token, bool):
        out = []
        for p in prompts:
            n = len(prompt_ids(tokenizer, p))
            if not 0 <= token < tokenizer.model_max_length:
                raise UsageError(f"token index {token} out of range (valid: 0..{tokenizer.model_max_length - 1}; "
                                 f"the prompt {p!r} has {n} tokens)")
            out.append([token])
        return out
    return [token_positions(tokenizer, p, str(token)) for p in prompts]
