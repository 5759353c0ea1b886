"""A small grammar that writes natural prompts for scenes, with word-order variation.

"a small red striped circle at the top left on a gray background, at night"
"at night, on a black background, a plain big blue square in the center and a ..."
Every word the grammar can write is in ``WORDS``; anything else is refused by ``check_prompt``.
"""

from __future__ import annotations

import difflib
import re

import numpy as np

from toyworld.scene import Obj, Scene
from toyworld.vocab import ATTRIBUTES

POSITION_PREPOSITIONS = ("at the", "in the")
STYLE_PHRASES = {"day": ("by day", "in daylight"), "night": ("at night", "by night")}
PUNCTUATION = (",",)

FUNCTION_WORDS = ("a", "the", "at", "in", "on", "and", "background", "by", "day", "daylight", "night")
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        FUNCTION_WORDS
        + PUNCTUATION
        + tuple(word for values in ATTRIBUTES.values() for value in values for word in value.split())
    )
)


def object_phrase(obj: Obj, rng: np.random.Generator) -> str:
    # Adjective order varies; the noun (shape) closes the phrase and the position follows it, so a
    # causal text encoder has seen every attribute of an object by the time it reaches its noun.
    adjectives = [obj.size, obj.color, obj.texture]
    order = rng.permutation(3) if rng.random() < 0.3 else range(3)
    adjectives = [adjectives[i] for i in order]
    preposition = POSITION_PREPOSITIONS[rng.integers(len(POSITION_PREPOSITIONS))]
    return f"a {' '.join(adjectives)} {obj.shape} {preposition} {obj.position}"


def scene_to_prompt(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Write one prompt for ``scene``; ``rng`` picks among the grammar's variants (None: canonical)."""
    canonical = rng is None
    rng = rng if rng is not None else np.random.default_rng(0)
    objects = " and ".join(
        f"a {o.size} {o.color} {o.texture} {o.shape} at the {o.position}" if canonical else object_phrase(o, rng)
        for o in scene.objects
    )
    background = f"on a {scene.background} background"
    style_options = STYLE_PHRASES[scene.style]
    style = style_options[0] if canonical else style_options[rng.integers(len(style_options))]
    layout = 0 if canonical else rng.integers(3)
    if layout == 0:
        return f"{objects} {background}, {style}"
    if layout == 1:
        return f"{background}, {objects}, {style}"
    return f"{style}, {objects} {background}"


def split_words(prompt: str) -> list[str]:
    """Lower-case words and commas, the way the bundled word-level tokenizer splits them."""
    return re.findall(r"[a-z]+|,", prompt.lower())


def check_prompt(prompt: str) -> str:
    """Raise a ValueError naming every word of ``prompt`` that the toy world does not know."""
    stray = re.sub(r"[a-zA-Z]+|,|\s", "", prompt)
    if stray:
        raise ValueError(f"prompt {prompt!r} has characters {stray!r} the toy world does not know; "
                         f"it knows letters, spaces and commas")
    unknown = [w for w in split_words(prompt) if w not in WORDS]
    if unknown:
        hints = []
        for word in dict.fromkeys(unknown):
            close = difflib.get_close_matches(word, WORDS, n=2)
            hints.append(f"{word!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
        raise ValueError(
            f"prompt {prompt!r} uses words outside the toy world's vocabulary: {', '.join(hints)}; "
            f"valid words: {', '.join(WORDS)}"
        )
    return prompt
