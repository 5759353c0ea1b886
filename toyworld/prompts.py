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
from toyworld.vocab import ATTRIBUTES, OBJECT_ATTRIBUTES

OBJECT_NAMES = tuple(OBJECT_ATTRIBUTES)

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


# --- reading a prompt back --------------------------------------------------------------------
class PromptGrammarError(ValueError):
    """The prompt is not written in the grammar of ``scene_to_prompt``."""


_STYLE_OF_PHRASE = {tuple(phrase.split()): style for style, phrases in STYLE_PHRASES.items() for phrase in phrases}
_ADJECTIVES = {value: name for name in ("size", "color", "texture") for value in ATTRIBUTES[name]}
_POSITION_WORDS = {tuple(p.split()): p for p in ATTRIBUTES["position"]}


def _read(prompt: str) -> tuple[list[dict], dict]:
    """(object attribute dicts, scene attribute dict) for the words ``prompt`` states, in any of the
    grammar's word orders; an object or scene attribute the prompt leaves out is absent from its dict."""
    words = [w for w in split_words(check_prompt(prompt)) if w != ","]
    objects: list[dict] = []
    scene: dict = {}

    def fail(why: str):
        raise PromptGrammarError(f"prompt {prompt!r} is not a toy-world scene description: {why}")

    def set_once(d: dict, key: str, value: str) -> None:
        if key in d:
            fail(f"it names a {key} twice ({d[key]!r} and {value!r})")
        d[key] = value

    i = 0
    while i < len(words):
        pair = tuple(words[i : i + 2])
        if pair in _STYLE_OF_PHRASE:
            set_once(scene, "style", _STYLE_OF_PHRASE[pair])
            i += 2
        elif words[i] == "on" and words[i + 1 : i + 2] == ["a"] and words[i + 3 : i + 4] == ["background"]:
            if words[i + 2] not in ATTRIBUTES["background"]:
                fail(f"{words[i + 2]!r} is not a background")
            set_once(scene, "background", words[i + 2])
            i += 4
        elif words[i] == "and" and objects:
            i += 1
        elif words[i] == "a":
            obj: dict = {}
            i += 1
            while i < len(words) and words[i] in _ADJECTIVES:
                set_once(obj, _ADJECTIVES[words[i]], words[i])
                i += 1
            if i == len(words) or words[i] not in ATTRIBUTES["shape"]:
                fail(f"an object's adjectives must end in a shape ({', '.join(ATTRIBUTES['shape'])})")
            obj["shape"] = words[i]
            i += 1
            if words[i : i + 2] in (["at", "the"], ["in", "the"]):
                for n in (2, 1):
                    if tuple(words[i + 2 : i + 2 + n]) in _POSITION_WORDS:
                        obj["position"] = _POSITION_WORDS[tuple(words[i + 2 : i + 2 + n])]
                        i += 2 + n
                        break
                else:
                    fail(f"'{' '.join(words[i : i + 2])}' is not followed by a position")
            objects.append(obj)
        else:
            fail(f"unexpected word {words[i]!r}")
    if not objects:
        fail("it names no object")
    return objects, scene


def parse_prompt(prompt: str) -> Scene:
    """The scene that ``prompt`` describes: the inverse of ``scene_to_prompt`` (any word order it writes).

    Raises ``PromptGrammarError`` when the prompt is not in the grammar or leaves an attribute
    out, and the Scene's ValueError when the scene is impossible (e.g. two objects at one position)."""
    objects, scene = _read(prompt)
    missing = [f"object {k + 1}'s {name}" for k, o in enumerate(objects) for name in OBJECT_NAMES if name not in o]
    missing += [name for name in ("background", "style") if name not in scene]
    if missing:
        raise PromptGrammarError(f"prompt {prompt!r} does not name {', '.join(missing)}")
    return Scene(tuple(Obj(**o) for o in objects), **scene)


def check_scene(prompt: str) -> str:
    """Refuse a prompt whose stated objects cannot form a scene, as ``Scene`` does (more than two
    objects, two at one position, a big one next to the center), even when it leaves attributes
    out: an unstated size counts as small, the size that fits anywhere. Free-form prompts outside
    the grammar pass (the vocabulary is checked by ``check_prompt``)."""
    try:
        objects, scene = _read(prompt)
    except PromptGrammarError:
        return prompt
    placed = [o for o in objects if "position" in o]
    if len(objects) > 2 or len(placed) == 2:
        # Scene's own checks, with any shape and colour standing in for ones the prompt leaves open.
        filler = {name: ATTRIBUTES[name][0] for name in OBJECT_NAMES}
        filler["size"] = "small"
        try:
            Scene(tuple(Obj(**{**filler, "position": ATTRIBUTES["position"][k], **o}) for k, o in enumerate(objects)))
        except ValueError as err:
            raise ValueError(f"prompt {prompt!r}: {err}") from None
    return prompt
