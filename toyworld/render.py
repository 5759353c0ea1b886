"""Render a scene to pixels, with per-object masks and per-token labels on any grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import UsageError
from toyworld.scene import Obj, Scene
from toyworld.vocab import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    HALF_EXTENT,
    IMAGE_SIZE,
    OBJECT_ATTRIBUTES,
    OBJECT_RGB,
    STRIPE_PERIOD,
    apply_style,
    object_center,
    stripe_rgb,
)


def shape_mask(shape: str, center: tuple[float, float], half: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [size, size] mask of ``shape`` centred at ``center`` (x, y) with half-extent ``half``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    u, v = (xs - center[0]) / half, (ys - center[1]) / half  # unit box coordinates, v grows downwards
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.88) & (np.abs(v) <= 0.88)
    if shape == "triangle":  # apex up, base down, filling its box: half the box's area
        return (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "cross":
        arm = 0.36
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def object_mask(obj: Obj, size: int = IMAGE_SIZE) -> np.ndarray:
    return shape_mask(obj.shape, object_center(obj.position, obj.size), HALF_EXTENT[obj.size], size)


def stripe_rows(size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [size, 1]: rows drawn in the stripe tint (second half of every period)."""
    rows = np.arange(size)[:, None]
    return (rows % STRIPE_PERIOD) >= STRIPE_PERIOD // 2


@dataclass
class Rendered:
    image: np.ndarray  # uint8 [H, W, 3]
    scene: Scene
    masks: np.ndarray  # bool [num_objects, H, W]


def render(scene: Scene) -> Rendered:
    """Draw ``scene`` as a 64x64 RGB image with one boolean mask per object."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    canvas[:] = BACKGROUND_RGB[scene.background]
    masks = np.stack([object_mask(o) for o in scene.objects])
    tint_rows = stripe_rows()
    for obj, mask in zip(scene.objects, masks):
        canvas[mask] = OBJECT_RGB[obj.color]
        if obj.texture == "striped":
            canvas[mask & tint_rows] = stripe_rgb(obj.color)
    canvas = apply_style(canvas, scene.style)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Rendered(image=image, scene=scene, masks=masks)


def patch_coverage(masks: np.ndarray, grid: int) -> np.ndarray:
    """The share of each patch of a ``grid`` x ``grid`` map that each object mask covers:
    bool [n, IMAGE_SIZE, IMAGE_SIZE] -> float32 [n, grid, grid]."""
    if IMAGE_SIZE % grid:
        raise UsageError(f"grid {grid} does not divide the image size {IMAGE_SIZE}; valid grids: "
                         f"{', '.join(str(g) for g in range(1, IMAGE_SIZE + 1) if IMAGE_SIZE % g == 0)}")
    cell = IMAGE_SIZE // grid
    # "n (gi ci) (gj cj) -> n gi gj" mean-pool
    return masks.astype(np.float32).reshape(len(masks), grid, cell, grid, cell).mean(axis=(2, 4))


def token_labels(scene: Scene, grid: int, min_coverage: float = 0.5) -> dict[str, np.ndarray]:
    """What each patch of a ``grid`` x ``grid`` map shows (e.g. a U-Net site's 16x16 or 8x8 map).

    Returns int arrays [grid, grid]:
    - ``object``: index of the object covering at least ``min_coverage`` of the patch, else -1;
    - one array per object attribute (shape, color, ...): the index of the value in
      ``toyworld.vocab.ATTRIBUTES[name]`` for patches that show an object, -1 on background;
    - ``background`` and ``style``: the scene's value index everywhere;
    and ``coverage``: float [num_objects, grid, grid], the fraction of each patch each object covers.
    """
    coverage = patch_coverage(render(scene).masks, grid)
    best = coverage.argmax(axis=0)
    covered = coverage.max(axis=0) >= min_coverage
    labels: dict[str, np.ndarray] = {"object": np.where(covered, best, -1)}
    for name, values in OBJECT_ATTRIBUTES.items():
        codes = np.array([values.index(getattr(o, name)) for o in scene.objects])
        labels[name] = np.where(covered, codes[best], -1)
    for name in ("background", "style"):
        labels[name] = np.full((grid, grid), ATTRIBUTES[name].index(getattr(scene, name)))
    labels["coverage"] = coverage
    return labels
