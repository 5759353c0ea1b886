"""PNG figures drawn with PIL and numpy (matplotlib is not a dependency): the HRV heatmap and the
weakening curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GRID = (255, 255, 255), (0, 0, 0), (200, 200, 200)
ORDER_COLORS = {"MoRHF": (214, 39, 40), "LeRHF": (31, 119, 180), "random": (127, 127, 127)}


def _font():
    return ImageFont.load_default()


def _colormap(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, white to dark red (a sequential map readable in print)."""
    x = np.clip(x, 0, 1)[..., None]
    lo, mid, hi = np.array([255, 255, 255.0]), np.array([253, 141, 60.0]), np.array([127, 0, 0.0])
    rgb = np.where(x < 0.5, lo + (mid - lo) * (x / 0.5), mid + (hi - mid) * ((x - 0.5) / 0.5))
    return rgb.astype(np.uint8)


def hrv_heatmap(hrv_ch: np.ndarray, concept_names: list[str], head_table: list[tuple[str, int]],
                resolutions: dict[str, tuple[int, int]], path: str | Path) -> Path:
    """Concepts x heads, heads in global order, a line between modules and a resolution label
    above each run of modules at the same resolution. Colour: each row scaled by its maximum."""
    C, H = hrv_ch.shape
    cell_w = max(1, min(12, 1200 // max(H, 1)))
    cell_h = 14
    left, top, bottom = 8 + 7 * max(len(n) for n in concept_names), 34, 16
    width, height = left + H * cell_w + 10, top + C * cell_h + bottom
    img = Image.new("RGB", (width, height), WHITE)
    rowmax = np.maximum(hrv_ch.max(1, keepdims=True), 1e-9)
    cells = _colormap(hrv_ch / rowmax)  # [C, H, 3]
    block = np.repeat(np.repeat(cells, cell_h, 0), cell_w, 1)
    img.paste(Image.fromarray(block), (left, top))
    draw, font = ImageDraw.Draw(img), _font()
    for c, name in enumerate(concept_names):
        draw.text((4, top + c * cell_h + 1), name, fill=BLACK, font=font)
    sites = [s for s, _ in head_table]
    boundaries = [h for h in range(1, H) if sites[h] != sites[h - 1]]
    for h in boundaries:  # module separators
        x = left + h * cell_w
        draw.line([(x, top), (x, top + C * cell_h)], fill=BLACK if cell_w > 2 else GRID, width=1)
    # resolution labels over runs of heads at the same resolution
    res = [resolutions.get(s, (0, 0)) for s in sites]
    start = 0
    for h in range(1, H + 1):
        if h == H or res[h] != res[start]:
            x0, x1 = left + start * cell_w, left + h * cell_w
            draw.line([(x0, top - 4), (x1 - 1, top - 4)], fill=BLACK)
            label = f"{res[start][0]}x{res[start][1]}"
            if x1 - x0 >= 6 * len(label) or h == H:
                draw.text((x0 + 1, top - 16), label, fill=BLACK, font=font)
            start = h
    draw.text((left, 2), f"HRV: {C} concepts x {H} heads (down -> mid -> up; row-normalised colour)", fill=BLACK, font=font)
    draw.text((left, top + C * cell_h + 2), f"modules: {len(boundaries) + 1}", fill=BLACK, font=font)
    path = Path(path)
    img.save(path)
    return path


def weakening_curves(curves: dict[str, dict[str, tuple[list[float], list[float]]]], path: str | Path,
                     ylabel: str = "survival") -> Path:
    """One panel per concept: score against the fraction of heads weakened, one line per order.

    ``curves[concept][order] = (fractions, scores)``.
    """
    names = list(curves)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    pw, ph, pad = 220, 170, 34
    img = Image.new("RGB", (max(cols * pw, 460), rows * ph + 34), WHITE)
    draw, font = ImageDraw.Draw(img), _font()
    all_scores = [s for c in curves.values() for _, ys in c.values() for s in ys]
    lo = min(0.0, min(all_scores, default=0.0))
    hi = max(1.0, max(all_scores, default=1.0))
    for k, name in enumerate(names):
        ox, oy = (k % cols) * pw, (k // cols) * ph
        x0, y0, x1, y1 = ox + pad, oy + 18, ox + pw - 8, oy + ph - 22
        draw.rectangle([x0, y0, x1, y1], outline=BLACK)
        draw.text((x0, oy + 4), name, fill=BLACK, font=font)
        draw.text((x0, y1 + 4), "0", fill=BLACK, font=font)
        draw.text((x1 - 30, y1 + 4), "all heads", fill=BLACK, font=font)
        draw.text((ox + 2, y0), f"{hi:.1f}", fill=BLACK, font=font)
        draw.text((ox + 2, y1 - 10), f"{lo:.1f}", fill=BLACK, font=font)
        for order, (xs, ys) in curves[name].items():
            pts = [(x0 + x * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)) for x, y in zip(xs, ys)]
            color = ORDER_COLORS.get(order, BLACK)
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for px, py in pts:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
    x = 4
    for order, color in ORDER_COLORS.items():
        draw.rectangle([x, rows * ph + 6, x + 10, rows * ph + 14], fill=color)
        draw.text((x + 14, rows * ph + 4), order, fill=BLACK, font=font)
        x += 90
    draw.text((4, rows * ph + 19), f"y: {ylabel}; x: fraction of heads weakened", fill=BLACK, font=font)
    path = Path(path)
    img.save(path)
    return path


def log_images(images: dict[str, Path], metrics: dict | None = None, out: str | Path = ".", name: str = "analysis") -> str | None:
    """Log PNGs (and numbers) to a W&B run, offline unless WANDB_MODE is set; returns the run folder."""
    import os

    import wandb

    mode = None if "WANDB_MODE" in os.environ else "offline"
    run = wandb.init(project="diffatlas", job_type=name, dir=str(out), mode=mode,
                     settings=wandb.Settings(console="off", silent=True))  # our own lines only
    try:
        run.log({k: wandb.Image(str(p)) for k, p in images.items()} | dict(metrics or {}))
        return str(Path(run.dir).parent)
    finally:
        run.finish()
