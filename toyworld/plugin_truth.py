"""The toy world's ground truth, offered to the analyses through the ``toy`` model plugin
(``common.plugins.WorldTruth``; ``toyworld.plugin.MODEL.truth``): the pixel-oracle scorer of the
ordered weakening, the concept values a patch shows, the scene saved beside each harvested image
and how much of each patch an object covers. ``analysis`` and ``steering`` ask for it by the model's
name and never import toyworld.

Every toy prompt of the scorer names one value of each of the seven attributes, so one prompt set
serves every concept and the images of the order-independent points (no head and all heads
weakened) are shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.errors import UsageError
from common.plugins import WorldTruth
from toyworld.oracle import CHECKS, read_scene
from toyworld.prompts import parse_prompt, scene_to_prompt
from toyworld.render import patch_coverage, render, token_labels
from toyworld.scene import Scene, sample_scene
from toyworld.vocab import ATTRIBUTES


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

    reads_value = staticmethod(reads_value)


class ToyTruth(WorldTruth):
    """The toy world's truth (see ``common.plugins.WorldTruth``)."""

    def scorer(self) -> ToyOracleScorer:
        return ToyOracleScorer()

    def concept_values(self) -> list[tuple[str, str]]:
        """Every (attribute, value) of the toy world, in ``toyworld.vocab.ATTRIBUTES`` order."""
        return [(a, v) for a, vs in ATTRIBUTES.items() for v in vs]

    def scene(self, store_root, image: int) -> Scene:
        path = Path(store_root) / "images" / f"{int(image)}.json"
        if not path.exists():
            raise FileNotFoundError(f"no toy scene for image {image} at {path} (a toyworld harvest with save_images: true writes it)")
        return Scene.from_dict(json.loads(path.read_text())["scene"])

    def patch_targets(self, store_root, meta, grid) -> np.ndarray:
        """[rows, values] bool (``concept_values`` order). A patch carries the value of the object
        covering at least half of it (``toyworld.render.token_labels``), none on the background;
        background and style label every patch."""
        if grid[0] != grid[1]:
            raise ValueError(f"toy labels need a square grid, got {grid}")
        values = self.concept_values()
        images = np.asarray(meta["image"]).astype(int)
        out = np.zeros((len(images), len(values)), dtype=bool)
        labels = {int(im): token_labels(self.scene(store_root, int(im)), grid[0]) for im in np.unique(images)}
        for n, (attr, val) in enumerate(values):
            code = ATTRIBUTES[attr].index(val)
            lab = np.stack([labels[int(im)][attr] for im in images]) if len(images) else np.zeros((0,) + tuple(grid))
            out[:, n] = lab[np.arange(len(images)), meta["i"].astype(int), meta["j"].astype(int)] == code
        return out

    def object_coverage(self, text: str, grid: int) -> np.ndarray:
        """[grid, grid]: the share of each patch that an object covers, of the scene ``text``
        describes (parsed back from the caption and rendered)."""
        return patch_coverage(render(parse_prompt(text)).masks, grid).max(0)
