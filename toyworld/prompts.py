"""A small grammar that writes natural captions for scenes, with word-order variation, naming all
of a scene or only some of it.

"a small red striped circle at the top left on a gray background, at night"  (everything named)
"at night, a big shape in the center"                                          (most left unsaid)
"striped"                                                                      (a short caption)

Real captions leave most of a picture unsaid, and a text-to-image model then lets the noise decide
the rest. Training captions here do the same (``draw_named``): each attribute phrase is dropped
independently, and some captions are short, so that one word alone is in distribution, as it is
for CLIP. An object whose shape is unsaid is "a shape"; every object of a long caption is
mentioned, so the number of objects is always said. Every word the grammar can write is in
``WORDS``; anything else is refused by ``check_prompt``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import numpy as np

from common.errors import UsageError
from toyworld.scene import HELD_OUT_KEY, Obj, Scene, is_held_out
from toyworld.vocab import ATTRIBUTES, OBJECT_ATTRIBUTES, SCENE_ATTRIBUTES

OBJECT_NAMES = tuple(OBJECT_ATTRIBUTES)
GENERIC_NOUN = "shape"  # the noun of an object whose shape the caption leaves unsaid

POSITION_PREPOSITIONS = ("at the", "in the")
STYLE_PHRASES = {"day": ("by day", "in daylight"), "night": ("at night", "by night")}
PUNCTUATION = (",",)

FUNCTION_WORDS = ("a", "the", "at", "in", "on", "and", "background", "by", "day", "daylight", "night", GENERIC_NOUN)
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        FUNCTION_WORDS
        + PUNCTUATION
        + tuple(word for values in ATTRIBUTES.values() for value in values for word in value.split())
    )
)

DROP_PROB = 0.4
"""Training captions leave each attribute phrase out with this probability, independently (real
captions name few of the attributes a picture shows)."""
SHORT_PROB = 0.15
"""Share of one-object training captions that are short: one or two attributes, tersely
("striped", "a red circle", "big, at night")."""


@dataclass(frozen=True)
class Named:
    """Which attributes a caption names: one set per object (of ``OBJECT_ATTRIBUTES``) and one for
    the scene (background, style). ``short`` writes the terse form of a one-object caption."""

    objects: tuple[frozenset[str], ...]
    scene: frozenset[str]
    short: bool = False

    @classmethod
    def everything(cls, scene: Scene) -> "Named":
        return cls(tuple(frozenset(OBJECT_NAMES) for _ in scene.objects), frozenset(SCENE_ATTRIBUTES))

    @classmethod
    def all_but(cls, scene: Scene, *unnamed: str) -> "Named":
        """Everything but ``unnamed`` (attribute names), for every object."""
        for name in unnamed:
            if name not in ATTRIBUTES:
                raise UsageError(f"unknown attribute {name!r}; valid attributes: {', '.join(ATTRIBUTES)}")
        full = cls.everything(scene)
        return cls(tuple(o - set(unnamed) for o in full.objects), full.scene - set(unnamed))


def draw_named(scene: Scene, rng: np.random.Generator, drop_prob: float = DROP_PROB,
               short_prob: float = SHORT_PROB) -> Named:
    """What a training caption of ``scene`` names: each attribute phrase dropped with ``drop_prob``;
    a one-object scene gets a short caption (one or two attributes) with ``short_prob``. A held-out
    object (``toyworld.scene.is_held_out``) is never named in full: if the draw names all of its
    shape, colour, texture and position, one of them, drawn uniformly, is left out."""
    if len(scene.objects) == 1 and rng.random() < short_prob:
        every = (*OBJECT_NAMES, *SCENE_ATTRIBUTES)
        picked = {every[i] for i in rng.choice(len(every), size=int(rng.integers(1, 3)), replace=False)}
        return Named((frozenset(picked & set(OBJECT_NAMES)),), frozenset(picked & set(SCENE_ATTRIBUTES)), short=True)
    objects = []
    for obj in scene.objects:
        named = {name for name in OBJECT_NAMES if rng.random() >= drop_prob}
        if is_held_out(obj) and named >= set(HELD_OUT_KEY):
            named.discard(HELD_OUT_KEY[int(rng.integers(len(HELD_OUT_KEY)))])
        objects.append(frozenset(named))
    return Named(tuple(objects), frozenset(n for n in SCENE_ATTRIBUTES if rng.random() >= drop_prob))


def object_phrase(obj: Obj, rng: np.random.Generator | None, named: frozenset[str] = frozenset(OBJECT_NAMES),
                  article: bool = True) -> str:
    # Adjective order varies; the noun closes the phrase and the position follows it, so a causal
    # text encoder has seen every stated attribute of an object by the time it reaches its noun.
    # Without the article (short captions) and with neither shape nor position, the adjectives
    # stand alone ("striped", "big red").
    adjectives = [getattr(obj, n) for n in ("size", "color", "texture") if n in named]
    if rng is not None and rng.random() < 0.3:
        adjectives = [adjectives[i] for i in rng.permutation(len(adjectives))]
    if not article and adjectives and not named & {"shape", "position"}:
        return " ".join(adjectives)
    noun = obj.shape if "shape" in named else GENERIC_NOUN
    phrase = " ".join(["a", *adjectives, noun])
    if "position" in named:
        preposition = POSITION_PREPOSITIONS[0 if rng is None else rng.integers(len(POSITION_PREPOSITIONS))]
        phrase += f" {preposition} {obj.position}"
    return phrase


def scene_to_prompt(scene: Scene, rng: np.random.Generator | None = None, named: Named | None = None) -> str:
    """Write one caption for ``scene`` naming ``named`` (default: everything); ``rng`` picks among
    the grammar's variants (None: the canonical wording)."""
    named = named if named is not None else Named.everything(scene)
    if len(named.objects) != len(scene.objects):
        raise ValueError(f"named lists {len(named.objects)} objects but the scene holds {len(scene.objects)}")
    canonical = rng is None
    background = f"on a {scene.background} background" if "background" in named.scene else None
    style_options = STYLE_PHRASES[scene.style]
    style = None
    if "style" in named.scene:
        style = style_options[0] if canonical else style_options[rng.integers(len(style_options))]
    if named.short:
        parts = [object_phrase(scene.objects[0], rng, named.objects[0], article=False)] if named.objects[0] else []
        return ", ".join(parts + [p for p in (background, style) if p])
    objects = " and ".join(object_phrase(o, rng, n) for o, n in zip(scene.objects, named.objects))
    layout = 0 if canonical else rng.integers(3)
    if layout == 0:
        return objects + (f" {background}" if background else "") + (f", {style}" if style else "")
    if layout == 1:
        return (f"{background}, " if background else "") + objects + (f", {style}" if style else "")
    return (f"{style}, " if style else "") + objects + (f" {background}" if background else "")


def split_words(prompt: str) -> list[str]:
    """Lower-case words and commas, the way the bundled word-level tokenizer splits them."""
    return re.findall(r"[a-z]+|,", prompt.lower())


def check_prompt(prompt: str) -> str:
    """Raise a ValueError naming every word of ``prompt`` that the toy world does not know."""
    stray = re.sub(r"[a-zA-Z]+|,|\s", "", prompt)
    if stray:
        raise UsageError(f"prompt {prompt!r} has characters {stray!r} the toy world does not know; "
                         f"it knows letters, spaces and commas")
    unknown = [w for w in split_words(prompt) if w not in WORDS]
    if unknown:
        hints = []
        for word in dict.fromkeys(unknown):
            close = difflib.get_close_matches(word, WORDS, n=2)
            hints.append(f"{word!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
        raise UsageError(
            f"prompt {prompt!r} uses words outside the toy world's vocabulary: {', '.join(hints)}; "
            f"valid words: {', '.join(WORDS)}"
        )
    return prompt


# --- reading a prompt back --------------------------------------------------------------------
class PromptGrammarError(ValueError):
    """The prompt is not written in the grammar of ``scene_to_prompt``."""


_STYLE_OF_PHRASE = {tuple(phrase.split()): style for style, phrases in STYLE_PHRASES.items() for phrase in phrases}
# the words written before an object's noun, each with the attribute it names (the grounding reads them too)
ADJECTIVES = {value: name for name in ("size", "color", "texture") for value in ATTRIBUTES[name]}
_POSITION_WORDS = {tuple(p.split()): p for p in ATTRIBUTES["position"]}
_NOUNS = (*ATTRIBUTES["shape"], GENERIC_NOUN)


def read_named(prompt: str) -> tuple[list[dict], dict]:
    """What a caption names: (one {attribute: value} per object it mentions, {attribute: value} of
    the scene), in any of the grammar's word orders and forms; an attribute the caption leaves out
    is absent from its dict. Raises ``PromptGrammarError`` for a prompt outside the grammar."""
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
        elif words[i] in ADJECTIVES and not objects:  # a short caption's bare adjectives ("striped")
            obj: dict = {}
            while i < len(words) and words[i] in ADJECTIVES:
                set_once(obj, ADJECTIVES[words[i]], words[i])
                i += 1
            objects.append(obj)
        elif words[i] == "a":
            obj = {}
            i += 1
            while i < len(words) and words[i] in ADJECTIVES:
                set_once(obj, ADJECTIVES[words[i]], words[i])
                i += 1
            if i == len(words) or words[i] not in _NOUNS:
                fail(f"an object's adjectives must end in a noun ({', '.join(_NOUNS)})")
            if words[i] != GENERIC_NOUN:
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
    if not objects and not scene:
        fail("it names nothing")
    return objects, scene


def parse_prompt(prompt: str) -> Scene:
    """The scene that ``prompt`` describes: the inverse of ``scene_to_prompt`` (any word order it
    writes) for a caption that names everything.

    Raises ``PromptGrammarError`` when the prompt is not in the grammar or leaves an attribute
    out, and the Scene's ValueError when the scene is impossible (e.g. two objects at one position)."""
    objects, scene = read_named(prompt)
    if not objects:
        raise PromptGrammarError(f"prompt {prompt!r} names no object")
    missing = [f"object {k + 1}'s {name}" for k, o in enumerate(objects) for name in OBJECT_NAMES if name not in o]
    missing += [name for name in ("background", "style") if name not in scene]
    if missing:
        raise PromptGrammarError(f"prompt {prompt!r} does not name {', '.join(missing)}")
    return Scene(tuple(Obj(**o) for o in objects), **scene)


def check_scene(prompt: str) -> str:
    """Refuse a prompt whose stated objects cannot form a scene, as ``Scene`` does (more than two
    objects, two at one position, an object sharing the center, two big objects), even when it
    leaves attributes out: an unstated size counts as small, and an unstated position as any
    corner the other object leaves free. Free-form prompts outside the grammar pass (the
    vocabulary is checked by ``check_prompt``)."""
    try:
        objects, scene = read_named(prompt)
    except PromptGrammarError:
        return prompt
    if len(objects) < 2:
        return prompt
    # Scene's own checks, with fillers for what the prompt leaves open: small, and free corners.
    filler = {name: ATTRIBUTES[name][0] for name in OBJECT_NAMES}
    filler["size"] = "small"
    taken = {o["position"] for o in objects if "position" in o}
    free = iter([p for p in ATTRIBUTES["position"] if p != "center" and p not in taken] * 2)
    try:
        Scene(tuple(Obj(**{**filler, "position": o.get("position") or next(free), **o}) for o in objects))
    except ValueError as err:
        raise UsageError(f"prompt {prompt!r}: {err}") from None
    return prompt
