"""Labelled image grids: each image with its prompt and the oracle's verdict underneath."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from toyworld.oracle import compare, read_scene
from toyworld.scene import Scene


def verdict(truth: Scene, image: np.ndarray) -> tuple[bool, str]:
    """(all correct, a short line naming what the oracle found wrong)."""
    try:
        checks = compare(truth, read_scene(image))
    except ValueError as err:  # no object found
        return False, str(err)
    wrong = [name for name, ok in checks.items() if not ok]
    return not wrong, "all correct" if not wrong else "wrong: " + ", ".join(wrong)


def labelled_grid(images: list[np.ndarray], scenes: list[Scene], prompts: list[str], columns: int = 4,
                  scale: int = 3) -> tuple[Image.Image, float]:
    """A grid of upscaled images, each with its prompt and verdict; returns (grid, share all correct)."""
    font = ImageFont.load_default()
    tile = images[0].shape[0] * scale
    text_lines = 7
    width_chars = tile // 6
    cell_h = tile + 12 * text_lines
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (tile + 8), rows * (cell_h + 8)), "white")
    draw = ImageDraw.Draw(grid)
    correct = 0
    for k, (image, scene, prompt) in enumerate(zip(images, scenes, prompts)):
        ok, line = verdict(scene, image)
        correct += ok
        x, y = (k % columns) * (tile + 8) + 4, (k // columns) * (cell_h + 8) + 4
        grid.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (x, y))
        verdict_lines = textwrap.wrap(line, width=width_chars)[:2]
        prompt_lines = textwrap.wrap(prompt, width=width_chars)[: text_lines - len(verdict_lines)]
        for j, text in enumerate(prompt_lines + verdict_lines):
            color = "black" if j < len(prompt_lines) else ("darkgreen" if ok else "red")
            draw.text((x, y + tile + 2 + 12 * j), text, fill=color, font=font)
    return grid, correct / max(1, len(images))
