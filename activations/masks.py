"""Spatial masks: which patches of a site's map an intervention touches.

A site's map is an H x W grid (16 x 16 at SD's mid resolution, 8 x 8 for the toy's middle level);
one mask spelling must mean the same region at every site, so every mask is resolved against the
grid of the call it applies to (``on_grid(h, w) -> bool [h*w]``, row-major like ``(h w)``):

==============  ===========================================  =====================================
mask            Python                                       YAML
==============  ===========================================  =====================================
patches         ``Patches([0, 5, 7], grid=(4, 4))``          ``{patches: [0, 5, 7], grid: [4, 4]}``
box             ``Box(top=0, left=0, bottom=0.5, right=0.5)``  ``{box: [0, 0, 0.5, 0.5]}``
quadrant        ``Quadrant("top left")``                     ``{quadrant: top left}``
mask image      ``MaskImage(array_or_path)``                 ``{image: path/to/mask.png}``
==============  ===========================================  =====================================

Patches are indices of one grid: applied at a site of another grid they are an error, since the
same index means another place there. Boxes and quadrants are fractions of the image (0 = top /
left, 1 = bottom / right) and a patch is inside when its centre is. A mask image (any size, white =
selected) is resized to each grid by area: a patch is inside when at least half of it is white.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UsageError

QUADRANTS = {
    "top left": (0.0, 0.0, 0.5, 0.5),
    "top right": (0.0, 0.5, 0.5, 1.0),
    "bottom left": (0.5, 0.0, 1.0, 0.5),
    "bottom right": (0.5, 0.5, 1.0, 1.0),
}

MASK_FORMS = "{patches: [..], grid: [H, W]}, {box: [top, left, bottom, right]} (fractions), {quadrant: top left|top right|bottom left|bottom right}, {image: path}"


class Mask:
    def on_grid(self, h: int, w: int) -> torch.Tensor:
        """bool [h*w]: the patches of an h x w map inside the mask."""
        raise NotImplementedError

    def to_spec(self) -> dict:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Patches(Mask):
    """Flat patch indices (i * W + j) of one grid; ``grid`` says which (None: any grid large enough)."""

    indices: tuple[int, ...] = ()
    grid: tuple[int, int] | None = None

    def __init__(self, indices, grid=None):
        if isinstance(indices, torch.Tensor):
            if indices.dtype == torch.bool:  # a [H, W] boolean map
                grid = tuple(indices.shape) if indices.ndim == 2 else grid
                indices = torch.nonzero(indices.reshape(-1)).flatten()
            indices = indices.tolist()
        idx = tuple(int(i) for i in np.asarray(indices).reshape(-1))
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "grid", None if grid is None else (int(grid[0]), int(grid[1])))

    def on_grid(self, h, w):
        if self.grid is not None and tuple(self.grid) != (h, w):
            raise UsageError(f"patch mask made for a {self.grid[0]}x{self.grid[1]} grid applied at a {h}x{w} site; "
                             f"use a Box, Quadrant or MaskImage to mean the same region at every grid")
        bad = [i for i in self.indices if not 0 <= i < h * w]
        if bad:
            raise UsageError(f"patch index {bad[0]} out of range for a {h}x{w} grid (valid: 0..{h * w - 1})")
        m = torch.zeros(h * w, dtype=torch.bool)
        m[list(self.indices)] = True
        return m

    def to_spec(self):
        spec: dict[str, Any] = {"patches": list(self.indices)}
        if self.grid is not None:
            spec["grid"] = list(self.grid)
        return spec


@dataclasses.dataclass(frozen=True)
class Box(Mask):
    """A rectangle in fractions of the image: rows [top, bottom), columns [left, right)."""

    top: float = 0.0
    left: float = 0.0
    bottom: float = 1.0
    right: float = 1.0

    def __post_init__(self):
        if not (0 <= self.top < self.bottom <= 1 and 0 <= self.left < self.right <= 1):
            raise UsageError(f"box [top, left, bottom, right] = {[self.top, self.left, self.bottom, self.right]} must be "
                             f"fractions of the image with 0 <= top < bottom <= 1 and 0 <= left < right <= 1")

    def on_grid(self, h, w):
        ci = (torch.arange(h, dtype=torch.float64) + 0.5) / h  # patch centres
        cj = (torch.arange(w, dtype=torch.float64) + 0.5) / w
        rows = (ci >= self.top) & (ci < self.bottom)
        cols = (cj >= self.left) & (cj < self.right)
        return (rows[:, None] & cols[None, :]).reshape(-1)

    def to_spec(self):
        return {"box": [self.top, self.left, self.bottom, self.right]}


@dataclasses.dataclass(frozen=True)
class Quadrant(Mask):
    """One quarter of the image: ``top left``, ``top right``, ``bottom left`` or ``bottom right``."""

    name: str = "top left"

    def __post_init__(self):
        if self.name not in QUADRANTS:
            raise UsageError(f"unknown quadrant {self.name!r}; valid quadrants: {', '.join(QUADRANTS)}")

    def on_grid(self, h, w):
        return Box(*QUADRANTS[self.name]).on_grid(h, w)

    def to_spec(self):
        return {"quadrant": self.name}


@dataclasses.dataclass(frozen=True, eq=False)
class MaskImage(Mask):
    """A mask image of any size (array [H, W] of bools or values in [0, 1], or a PNG path)."""

    source: Any = None

    def array(self) -> np.ndarray:
        src = self.source
        if isinstance(src, (str, Path)):
            from PIL import Image

            path = Path(src)
            if not path.exists():
                raise FileNotFoundError(f"mask image {str(path)!r} does not exist")
            return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
        arr = src.detach().cpu().numpy() if isinstance(src, torch.Tensor) else np.asarray(src)
        if arr.ndim != 2:
            raise UsageError(f"a mask image must be 2-D [H, W], got shape {list(arr.shape)}")
        return arr.astype(np.float32)

    def on_grid(self, h, w):
        a = torch.from_numpy(self.array())[None, None]
        # area resize: the share of each patch that is white
        cover = torch.nn.functional.adaptive_avg_pool2d(a, (h, w))[0, 0]
        return (cover >= 0.5).reshape(-1)

    def to_spec(self):
        if isinstance(self.source, (str, Path)):
            return {"image": str(self.source)}
        return {"image": self.array().round(3).tolist()}


def parse_mask(spec: Any) -> Mask | None:
    """A Mask from a spelling of the module doc (or None / an existing Mask)."""
    if spec is None or isinstance(spec, Mask):
        return spec
    if isinstance(spec, dict):
        keys = set(spec)
        if keys <= {"patches", "grid"} and "patches" in keys:
            return Patches(spec["patches"], spec.get("grid"))
        if keys == {"box"}:
            v = spec["box"]
            if not isinstance(v, (list, tuple)) or len(v) != 4:
                raise UsageError(f"{{box: [top, left, bottom, right]}} needs four fractions, got {v!r}")
            return Box(*(float(x) for x in v))
        if keys == {"quadrant"}:
            return Quadrant(spec["quadrant"])
        if keys == {"image"}:
            return MaskImage(spec["image"])
    raise UsageError(f"unknown mask {spec!r}; valid: {MASK_FORMS}")


def mask_spec(mask: Mask | None) -> dict | None:
    return None if mask is None else mask.to_spec()
