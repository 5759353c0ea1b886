"""Toy-world specifics of the analysis: concept prompts and the pixel-oracle scorer.

Imported only when the toy scorer is chosen (the rest of ``analysis`` works on any model).
Every toy prompt names one value of each of the seven attributes, so one prompt set serves every
concept and the images of the order-independent points (no head and all heads weakened) are shared.
"""

from __future__ import annotations

import numpy as np

from common.errors import UsageError
from toyworld.oracle import CHECKS, read_scene
from toyworld.prompts import scene_to_prompt
from toyworld.scene import Scene, sample_scene


def toy_prompts(n: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """``n`` one-object toy scenes and a prompt for each (held-in object pool, varied wording)."""
    rng = np.random.default_rng([seed, 7])
    scenes = [sample_scene(rng, num_objects=1) for _ in range(n)]
    return [(scene_to_prompt(s, rng), s) for s in scenes]


def reads_value(truth: Scene, image: np.ndarray, concept: str) -> bool:
    """Does the oracle read ``truth``'s value of ``concept`` in ``image``? Scene attributes
    (background, style) are compared directly; an object attribute counts when any object read
    has the prompt's value, wherever it is. (``toyworld.oracle.check_image`` matches objects by
    position, so an object that moved would fail its colour, shape, size and texture checks too:
    weakening a position head would then look like weakening every object attribute.)"""
    try:
        read = read_scene(np.asarray(image))
    except ValueError:  # nothing drawn: no value is read
        return False
    if concept in ("background", "style"):
        return getattr(read, concept) == getattr(truth, concept)
    wanted = {getattr(o, concept) for o in truth.objects}
    return wanted <= {getattr(o, concept) for o in read.objects}


class ToyOracleScorer:
    """Fraction of images in which the pixel oracle still reads the prompt's value of a concept
    (``reads_value``: object attributes are read wherever the object is)."""

    ylabel = "fraction read correctly"

    def check(self, concepts) -> None:
        bad = [c for c in concepts if c not in CHECKS or c == "count"]
        if bad:
            valid = [c for c in CHECKS if c != "count"]
            raise UsageError(f"the toy scorer reads only toy attributes; unknown concept(s) {bad}; valid: {', '.join(valid)}")

    def prompts(self, concept: str, n: int, seed: int) -> list[tuple[str, Scene]]:
        return toy_prompts(n, seed)  # the same prompts for every concept (see module doc)

    def score(self, concept: str, images: list[np.ndarray], targets: list[Scene]) -> list[float]:
        return [float(reads_value(scene, img, concept)) for img, scene in zip(images, targets)]
