"""Pictures made of pictures."""

from __future__ import annotations


def before_after_grid(before, after, scale: int = 1):
    """One PNG-ready picture: the ``before`` images (PIL) on the top row, the ``after`` ones below,
    enlarged ``scale`` times without smoothing."""
    from PIL import Image

    w, h = before[0].size
    grid = Image.new("RGB", (w * len(before), 2 * h), "white")
    for k, (a, b) in enumerate(zip(before, after)):
        grid.paste(a.convert("RGB"), (k * w, 0))
        grid.paste(b.convert("RGB"), (k * w, h))
    return grid if scale == 1 else grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
