"""The pixel oracle: read a toy-world image back into a ``Scene`` with plain image analysis.

The world is flat colours and simple shapes, so no learned model is needed:

1. style and background: the median colour of the image border (objects never reach it),
   matched to the six (style, background) colours;
2. object pixels: pixels far from that background colour; connected components are grouped by
   the position centre nearest to their centroid, so a fragmented object stays one object;
3. per object: size from its extent, shape by the best IoU against each shape's template drawn
   at that position and size, colour by nearest-palette votes, texture by the share of pixels
   nearest to a stripe tint.

It reads generated images too, so every step tolerates blur and colour drift.
"""

from __future__ import annotations

import numpy as np

from toyworld.render import shape_mask
from toyworld.scene import Obj, Scene
from toyworld.vocab import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLORS,
    HALF_EXTENT,
    OBJECT_RGB,
    POSITION_CENTER,
    POSITIONS,
    SHAPES,
    STYLES,
    apply_style,
    stripe_rgb,
)

MIN_OBJECT_PIXELS = 12  # smaller groups of foreground pixels are noise, not objects
BORDER = 3  # pixels of the frame used to read the background


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


def read_object(image: np.ndarray, mask: np.ndarray, position: str, style: str) -> Obj:
    ys, xs = np.nonzero(mask)
    cx, cy = POSITION_CENTER[position]
    # extent around the position's centre; big is 11 px, small 6 px: split at the midpoint
    half = max(np.percentile(np.abs(xs + 0.5 - cx), 95), np.percentile(np.abs(ys + 0.5 - cy), 95))
    size = "big" if half > (HALF_EXTENT["big"] + HALF_EXTENT["small"]) / 2 else "small"

    def iou(shape: str) -> float:
        template = shape_mask(shape, (cx, cy), HALF_EXTENT[size])
        return (template & mask).sum() / (template | mask).sum()

    shape = max(SHAPES, key=iou)

    base, tint = OBJECT_PALETTE[style]
    pixels = image[mask].astype(np.float32)  # [n, 3]
    d_base = np.linalg.norm(pixels[:, None] - base[None], axis=-1)  # [n, colors]
    d_tint = np.linalg.norm(pixels[:, None] - tint[None], axis=-1)
    is_tint = d_tint.min(axis=1) < d_base.min(axis=1)
    # base-colour pixels decide the colour; tints only vote where there are no base pixels
    votes = np.bincount(d_base.argmin(axis=1)[~is_tint], minlength=len(COLORS)).astype(np.float32)
    votes += 0.25 * np.bincount(d_tint.argmin(axis=1)[is_tint], minlength=len(COLORS))
    color = COLORS[int(votes.argmax())]
    texture = "striped" if is_tint.mean() > 0.25 else "plain"
    return Obj(shape=shape, color=color, position=position, size=size, texture=texture)


def read_scene(image: np.ndarray) -> Scene:
    """Read a uint8 [64, 64, 3] image back into a Scene (objects in position order).

    Raises ValueError when it finds no object at all (a scene needs one); more than two
    object groups keeps the two largest.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image * 255.0 if image.max() <= 1.0 else image), 0, 255).astype(np.uint8)
    style, background = read_background(image)
    bg = BACKGROUND_PALETTE[(style, background)]
    base, tint = OBJECT_PALETTE[style]
    # a pixel is foreground when it is closer to some object colour than to the background
    pixels = image.astype(np.float32)
    d_bg = np.linalg.norm(pixels - bg, axis=-1)
    d_obj = np.linalg.norm(pixels[..., None, :] - np.concatenate([base, tint])[None, None], axis=-1).min(-1)
    foreground = d_obj < d_bg

    groups: dict[str, np.ndarray] = {}
    centers = np.array([POSITION_CENTER[p] for p in POSITIONS], dtype=np.float32)
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
    objects = [read_object(image, groups[p], p, style) for p in sorted(kept, key=POSITIONS.index)]
    if len(objects) == 2 and objects[0].position != objects[1].position:
        try:
            return Scene(tuple(objects), background, style)
        except ValueError:  # the read is of an impossible scene: report what was seen anyway
            scene = Scene(tuple(objects[:1]), background, style)
            object.__setattr__(scene, "objects", tuple(objects))
            return scene
    return Scene(tuple(objects), background, style)


def compare(truth: Scene, read: Scene) -> dict[str, bool]:
    """Attribute-by-attribute agreement, objects matched by position.

    Returns {"background", "style", "count", and per object attribute: all objects right}.
    """
    result = {"background": truth.background == read.background, "style": truth.style == read.style,
              "count": len(truth.objects) == len(read.objects)}
    by_position = {o.position: o for o in read.objects}
    for name in ("color", "shape", "position", "size", "texture"):
        result[name] = all(
            o.position in by_position and getattr(by_position[o.position], name) == getattr(o, name)
            for o in truth.objects
        )
    return result
