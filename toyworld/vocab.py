"""The toy world's vocabulary: every attribute, its values, and how each value looks.

A scene has one or two objects on a flat background. Composition concepts (shape, position,
size) say what is where; style concepts (texture of an object, global style of the whole
picture) say how it looks. Colours are flat and far apart so that a pixel oracle can read every
attribute back without a learned model.
"""

from __future__ import annotations

import difflib

from common.errors import UsageError

IMAGE_SIZE = 64  # pixels; the bundled VAE downsamples by 4 to a 16x16 latent grid

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
BACKGROUNDS = ("white", "gray", "black")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
SIZES = ("small", "big")
TEXTURES = ("plain", "striped")
STYLES = ("day", "night")

OBJECT_ATTRIBUTES = {
    "shape": SHAPES,
    "color": COLORS,
    "position": POSITIONS,
    "size": SIZES,
    "texture": TEXTURES,
}
SCENE_ATTRIBUTES = {"background": BACKGROUNDS, "style": STYLES}
ATTRIBUTES = {**OBJECT_ATTRIBUTES, **SCENE_ATTRIBUTES}

# Day colours (RGB). Chosen so that, within one style, every object colour, its stripe tint and
# every background are at least ~60 apart in RGB (a test checks this).
OBJECT_RGB = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 70, 225),
    "yellow": (235, 215, 35),
    "purple": (145, 45, 185),
    "cyan": (35, 195, 205),
}
BACKGROUND_RGB = {"white": (235, 235, 235), "gray": (125, 125, 125), "black": (22, 22, 22)}

# Stripes alternate the object colour with a lighter tint of it (mixed towards white). Horizontal,
# period 4 px with a fixed absolute phase, so a stripe period is exactly one latent cell high.
STRIPE_PERIOD = 4
STRIPE_TINT = 0.55

# Night darkens every pixel and shifts it to blue: rgb' = NIGHT_GAIN * rgb + NIGHT_OFFSET.
NIGHT_GAIN = 0.55
NIGHT_OFFSET = (0.0, 0.0, 55.0)

# Object geometry (v2: objects fill the frame, as a photo's subject does). A size is a
# half-extent in pixels; a corner position anchors the object's box MARGIN px from its corner, so
# a big object reaches past the middle of the frame and a small one stays in its quadrant; the
# center position centres it. The smallest shape, the triangle, covers half its box: 15.8% of the
# image when big, 5.4% when small (circle 24.8% / 8.4%).
HALF_EXTENT = {"small": 10.5, "big": 18.0}
MARGIN = 2  # px between a corner object's box and the image edge
# Where each position is, for reading it back: the centre of its quadrant (or of the image).
POSITION_ANCHOR = {  # (x, y)
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}


def object_center(position: str, size: str) -> tuple[float, float]:
    """The centre (x, y) in pixels of an object of ``size`` at ``position``."""
    if position == "center":
        return (IMAGE_SIZE / 2, IMAGE_SIZE / 2)
    near = MARGIN + HALF_EXTENT[size]
    far = IMAGE_SIZE - MARGIN - HALF_EXTENT[size]
    return (near if "left" in position else far, near if "top" in position else far)


def check_value(attribute: str, value: str) -> str:
    """Return ``value`` if it is a valid value of ``attribute``, else raise a helpful ValueError."""
    if attribute not in ATTRIBUTES:
        raise UsageError(f"unknown attribute {attribute!r}; valid attributes: {', '.join(ATTRIBUTES)}")
    valid = ATTRIBUTES[attribute]
    if value not in valid:
        close = difflib.get_close_matches(str(value), valid, n=2)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UsageError(f"unknown {attribute} {value!r}{hint}; valid {attribute}s: {', '.join(valid)}")
    return value


def stripe_rgb(color: str) -> tuple[int, int, int]:
    r, g, b = OBJECT_RGB[color]
    return tuple(round(c + (255 - c) * STRIPE_TINT) for c in (r, g, b))  # type: ignore[return-value]


def apply_style(rgb, style: str):
    """Map a day colour to its look under ``style`` (works on tuples and numpy arrays)."""
    import numpy as np

    arr = np.asarray(rgb, dtype=np.float32)
    if style == "night":
        arr = arr * NIGHT_GAIN + np.asarray(NIGHT_OFFSET, dtype=np.float32)
    return arr
