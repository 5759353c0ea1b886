"""The pixel oracle: read a toy-world image back into a ``Scene`` with plain image analysis.

The world is flat colours and simple shapes, so no learned model is needed:

1. style and background: the median colour of the image border (objects touch at most a
   little of it),
   matched to the six (style, background) colours;
2. object pixels: pixels far from that background colour; connected components are grouped by
   the position anchor (quadrant centre) nearest to their centroid, so a fragmented object stays one object;
3. per object: colour by nearest-palette votes; texture by whether the rows that stripes tint
   (fixed phase) look more like the colour's tint than the other rows do; shape and size
   together, by matching the object's soft foreground (where each pixel lies between the
   background and the object's colour) against each shape's template at each size, sharp and
   blurred, and a pixel smaller or larger.

It reads generated images too, so every step tolerates blur and colour drift: a decoder that
rounds a small cross's corners still leaves more mass on its arms than a circle would.
"""

from __future__ import annotations

import numpy as np

from functools import lru_cache

from toyworld.render import shape_mask, stripe_rows
from toyworld.scene import Obj, Scene
from toyworld.vocab import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLORS,
    HALF_EXTENT,
    OBJECT_ATTRIBUTES,
    OBJECT_RGB,
    POSITION_ANCHOR,
    POSITIONS,
    SHAPES,
    STYLES,
    apply_style,
    object_center,
    stripe_rgb,
)

MIN_OBJECT_PIXELS = 12  # smaller groups of foreground pixels are noise, not objects
BORDER = 3  # pixels of the frame used to read the background
# what the benchmarks report per image, in the order of their JSON
REPORTED = ("color", "shape", "background", "position", "size", "texture", "style")
CHECKS = ("background", "style", "count", *OBJECT_ATTRIBUTES)  # the keys of compare()


def _palettes():
    backgrounds = {(s, b): apply_style(BACKGROUND_RGB[b], s) for s in STYLES for b in BACKGROUNDS}
    objects = {
        s: (
            np.stack([apply_style(OBJECT_RGB[c], s) for c in COLORS]),
            np.stack([apply_style(stripe_rgb(c), s) for c in COLORS]),
        )
        for s in STYLES
    }
    return backgrounds, objects


BACKGROUND_PALETTE, OBJECT_PALETTE = _palettes()


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks (min-label propagation)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, labels):
            break
        labels = updated
    return [labels == value for value in np.unique(labels[mask])]


def read_background(image: np.ndarray) -> tuple[str, str]:
    """(style, background) from the median colour of the image's border."""
    frame = np.concatenate(
        [image[:BORDER].reshape(-1, 3), image[-BORDER:].reshape(-1, 3),
         image[:, :BORDER].reshape(-1, 3), image[:, -BORDER:].reshape(-1, 3)]
    ).astype(np.float32)
    median = np.median(frame, axis=0)
    (style, background), _ = min(BACKGROUND_PALETTE.items(), key=lambda kv: np.linalg.norm(kv[1] - median))
    return style, background


BLURS = (0.0, 0.8, 1.4)  # Gaussian sigmas (px) the shape templates are matched at
# Changes (px) of a size's half-extent the templates are also tried at: a decoder that draws a
# small square a pixel too small would otherwise match the smaller-area template, a circle, best.
GROW = (-1, 0, 1)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return image
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    rows = np.apply_along_axis(np.convolve, 0, np.pad(image, ((radius, radius), (0, 0)), mode="edge"), kernel, "valid")
    return np.apply_along_axis(np.convolve, 1, np.pad(rows, ((0, 0), (radius, radius)), mode="edge"), kernel, "valid")


@lru_cache(maxsize=None)
def _template(shape: str, size: str, position: str, sigma: float, grow: int = 0) -> np.ndarray:
    sharp = shape_mask(shape, object_center(position, size), HALF_EXTENT[size] + grow).astype(np.float32)
    return _blur(sharp, sigma)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    return ~_dilate(~mask, steps)


def read_object(image: np.ndarray, mask: np.ndarray, background: np.ndarray, position: str, style: str) -> Obj:
    """Read one object from its pixel group ``mask`` on a ``background`` colour (RGB)."""
    base, tint = OBJECT_PALETTE[style]
    pixels = image[mask].astype(np.float32)  # [n, 3]
    d_base = np.linalg.norm(pixels[:, None] - base[None], axis=-1)  # [n, colors]
    d_tint = np.linalg.norm(pixels[:, None] - tint[None], axis=-1)
    is_tint = d_tint.min(axis=1) < d_base.min(axis=1)
    # base-colour pixels decide the colour; tints only vote where there are no base pixels
    votes = np.bincount(d_base.argmin(axis=1)[~is_tint], minlength=len(COLORS)).astype(np.float32)
    votes += 0.25 * np.bincount(d_tint.argmin(axis=1)[is_tint], minlength=len(COLORS))
    c = int(votes.argmax())

    # texture: stripes tint every other pair of rows at a fixed phase, so compare those rows'
    # tint-likeness with the other rows' inside the object (its eroded interior, blur-free)
    interior = _erode(mask, 1)
    if interior.sum() < 6:
        interior = mask
    inside = image.astype(np.float32)
    tintness = np.linalg.norm(inside - base[c], axis=-1) - np.linalg.norm(inside - tint[c], axis=-1)
    tinted_rows = np.broadcast_to(stripe_rows(image.shape[0]), mask.shape)
    a, b = interior & tinted_rows, interior & ~tinted_rows
    contrast = (tintness[a].mean() - tintness[b].mean()) if a.any() and b.any() else 0.0
    texture = "striped" if contrast > 0.5 * np.linalg.norm(base[c] - tint[c]) else "plain"

    # shape and size: least squares between the soft foreground near this group and templates.
    # Soft foreground of this object: how far each pixel lies from the background towards the
    # object's own colour (or its stripe tint), so a blurred edge counts as the blend it is.
    near = np.zeros(mask.shape, np.float32)
    for colour in (base[c], tint[c]) if texture == "striped" else (base[c],):
        line = colour - background
        near = np.maximum(near, np.clip((inside - background) @ line / float(line @ line), 0, 1))
    near *= _dilate(mask, 2)
    scores = {
        (shape, size): min(
            float(((near - _template(shape, size, position, sigma, grow)) ** 2).sum())
            for sigma in BLURS
            for grow in GROW
        )
        for shape in SHAPES
        for size in HALF_EXTENT
    }
    shape, size = min(scores, key=scores.get)
    return Obj(shape=shape, color=COLORS[c], position=position, size=size, texture=texture)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image * 255.0 if image.max() <= 1.0 else image), 0, 255).astype(np.uint8)
    return image


def _foreground(image: np.ndarray, style: str, background: str) -> np.ndarray:
    """A pixel is foreground when it is closer to some object colour than to the background."""
    base, tint = OBJECT_PALETTE[style]
    pixels = image.astype(np.float32)
    d_bg = np.linalg.norm(pixels - BACKGROUND_PALETTE[(style, background)], axis=-1)
    d_obj = np.linalg.norm(pixels[..., None, :] - np.concatenate([base, tint])[None, None], axis=-1).min(-1)
    return d_obj < d_bg


def foreground(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: the pixels of an image that show an object rather than its background, by
    the oracle's own rule (how much of the frame a generated image's objects fill)."""
    image = _as_uint8(image)
    return _foreground(image, *read_background(image))


def read_scene(image: np.ndarray) -> Scene:
    """Read a uint8 [64, 64, 3] image back into a Scene (objects in position order).

    Raises ValueError when it finds no object at all (a scene needs one); more than two
    object groups keeps the two largest.
    """
    image = _as_uint8(image)
    style, background = read_background(image)
    bg = BACKGROUND_PALETTE[(style, background)]
    foreground = _foreground(image, style, background)

    groups: dict[str, np.ndarray] = {}
    centers = np.array([POSITION_ANCHOR[p] for p in POSITIONS], dtype=np.float32)
    for component in _components(foreground):
        if component.sum() < 3:
            continue
        ys, xs = np.nonzero(component)
        centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
        position = POSITIONS[int(np.linalg.norm(centers - centroid, axis=1).argmin())]
        groups[position] = groups.get(position, np.zeros_like(component)) | component
    groups = {p: m for p, m in groups.items() if m.sum() >= MIN_OBJECT_PIXELS}
    if not groups:
        raise ValueError("no object found in the image")
    kept = sorted(groups, key=lambda p: -groups[p].sum())[:2]
    objects = [read_object(image, groups[p], bg, p, style) for p in sorted(kept, key=POSITIONS.index)]
    if len(objects) == 2 and objects[0].position != objects[1].position:
        try:
            return Scene(tuple(objects), background, style)
        except ValueError:  # the read is of an impossible scene: report what was seen anyway
            scene = Scene(tuple(objects[:1]), background, style)
            object.__setattr__(scene, "objects", tuple(objects))
            return scene
    return Scene(tuple(objects), background, style)


def read_positions(image: np.ndarray) -> list[str]:
    """Where the oracle finds objects in ``image`` (position order); empty when it finds none."""
    try:
        return [o.position for o in read_scene(image).objects]
    except ValueError:  # no object
        return []


def compare(truth: Scene, read: Scene) -> dict[str, bool]:
    """Attribute-by-attribute agreement, objects matched by position.

    Returns {"background", "style", "count", and per object attribute: all objects right}.
    """
    result = {"background": truth.background == read.background, "style": truth.style == read.style,
              "count": len(truth.objects) == len(read.objects)}
    by_position = {o.position: o for o in read.objects}
    for name in OBJECT_ATTRIBUTES:
        result[name] = all(
            o.position in by_position and getattr(by_position[o.position], name) == getattr(o, name)
            for o in truth.objects
        )
    return result


def check_image(truth: Scene, image: np.ndarray) -> dict[str, bool]:
    """``compare(truth, read_scene(image))``, with every check failed when nothing is drawn."""
    try:
        return compare(truth, read_scene(image))
    except ValueError:
        return dict.fromkeys(CHECKS, False)
