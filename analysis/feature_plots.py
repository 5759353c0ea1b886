"""Pictures of one SAE feature (PIL + numpy): its top images with the feature's heatmap overlaid,
a strip of one image's heatmap across steps (tau from 1 to 0), and its timestep profile.

Heatmaps come from the store's rows (``SiteReader``) encoded by the SAE: the feature's activation
per harvested position of the site's grid at one (image, step, branch); positions that were not
harvested (position subsampling) are NaN and drawn as a grey checkerboard, so a missing value is
never mistaken for a zero. The background is the store's final image (``ActivationStore.image_path``)
or a plain grey square when the store kept no images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from analysis.plots import _colormap, _font
from common.errors import UnknownNameError

TILE = 128


def feature_heatmap(sae, reader, feature: int, image: int, step: int, branch: str = "cond") -> np.ndarray:
    """[H, W] float32 activation of ``feature`` at one image, step and branch; NaN where not harvested."""
    from analysis.features import feature_values

    rows = reader.select(branch=branch, images=[image], steps=[step])
    h, w = reader.grid
    out = np.full((h, w), np.nan, dtype=np.float32)
    if not len(rows):
        return out
    _, meta = reader.read(rows)
    vals = feature_values(sae, reader, rows, [feature])[:, 0]
    out[meta["i"].astype(int), meta["j"].astype(int)] = vals
    return out


def _background(store_root: Path | None, image: int, size: int) -> np.ndarray:
    path = None if store_root is None else Path(store_root) / "images" / f"{int(image)}.png"
    if path is not None and path.exists():
        return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    return np.full((size, size, 3), 128.0, dtype=np.float32)


def overlay(background: np.ndarray, heat_hw: np.ndarray, vmax: float, alpha: float = 0.6) -> Image.Image:
    """The heatmap (nearest-neighbour upsampled) blended over a [S, S, 3] background; NaN = checkerboard."""
    size = background.shape[0]
    h, w = heat_hw.shape
    ys, xs = (np.arange(size) * h // size), (np.arange(size) * w // size)
    up = heat_hw[ys][:, xs]
    missing = np.isnan(up)
    x = np.where(missing, 0.0, up) / max(vmax, 1e-12)
    rgb = _colormap(x).astype(np.float32)
    a = alpha * np.clip(x, 0.15, 1.0)[..., None]  # weak activations keep the image readable
    out = background * (1 - a) + rgb * a
    yy, xx = np.mgrid[:size, :size]
    checker = np.where(((yy // 8 + xx // 8) % 2 == 0)[..., None], 170.0, 110.0)
    out = np.where(missing[..., None], 0.5 * background + 0.5 * checker, out)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _caption(tiles: list[Image.Image], captions: list[str], title: str) -> Image.Image:
    font = _font()
    pad, top = 4, 18
    width = len(tiles) * (TILE + pad) + pad
    canvas = Image.new("RGB", (max(width, 200), TILE + 2 * top + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 3), title, fill=(0, 0, 0), font=font)
    for n, (tile, cap) in enumerate(zip(tiles, captions)):
        x = pad + n * (TILE + pad)
        canvas.paste(tile, (x, top))
        draw.text((x, top + TILE + 2), cap, fill=(0, 0, 0), font=font)
    return canvas


def top_images_png(stats, sae, reader, feature: int, path: str | Path, n: int = 6, store_root: str | Path | None = None) -> Path:
    """The feature's top images (distinct images, strongest first), each with the feature's heatmap at the
    step where it fired most in that image, over the final image. One PNG."""
    store_root = Path(store_root or stats.info.get("store", "")) if (store_root or stats.info.get("store")) else None
    seen, tiles, caps = set(), [], []
    vmax = float(stats.max[feature]) or 1.0
    for ex in stats.top_examples(feature):
        if ex["image"] in seen:
            continue
        seen.add(ex["image"])
        branch = "cond" if ex["branch"] == 1 else "uncond"
        heat = feature_heatmap(sae, reader, feature, ex["image"], ex["step"], branch)
        tiles.append(overlay(_background(store_root, ex["image"], TILE), heat, vmax))
        caps.append(f"img {ex['image']} tau {ex['tau']:.2f} {ex['activation']:.2f}")
        if len(tiles) == n:
            break
    if not tiles:
        tiles, caps = [Image.new("RGB", (TILE, TILE), (235, 235, 235))], ["never fires"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _caption(tiles, caps, f"feature {feature} at {stats.info.get('site', '')}: top images").save(path)
    return path


def step_strip_png(sae, reader, feature: int, image: int, path: str | Path, branch: str = "cond",
                   store_root: str | Path | None = None) -> Path:
    """One image's heatmap of ``feature`` at every stored step, tau from 1 (noise) to 0. One PNG."""
    rows = reader.select(branch=branch, images=[image])
    if not len(rows):
        raise UnknownNameError(f"site {reader.name} has no rows for image {image}, branch {branch!r}")
    _, meta = reader.read(rows)
    steps = {int(s): float(t) for s, t in zip(meta["step"], meta["tau"])}
    order = sorted(steps, key=lambda s: -steps[s])
    heats = [feature_heatmap(sae, reader, feature, image, s, branch) for s in order]
    vmax = max([float(np.nanmax(h)) if np.isfinite(h).any() else 0.0 for h in heats] + [1e-6])
    bg = _background(Path(store_root) if store_root else reader.dir.parent, image, TILE)
    tiles = [overlay(bg, h, vmax) for h in heats]
    caps = [f"tau {steps[s]:.2f}" for s in order]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _caption(tiles, caps, f"feature {feature}, image {image}: tau 1 -> 0 (max {vmax:.2f})").save(path)
    return path


def tau_profile_png(stats, feature: int, path: str | Path, size: tuple[int, int] = (220, 120)) -> Path:
    """Mean activation against tau (x: tau from 1 on the left to 0), one line per branch present."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    taus = stats.taus.numpy()
    prof = stats.tau_profile[:, :, feature].numpy()
    top = float(np.nanmax(prof)) if np.isfinite(prof).any() else 0.0
    l, r, t, b = 28, w - 6, 14, h - 16
    draw.rectangle([l, t, r, b], outline=(200, 200, 200))
    draw.text((2, 1), f"mean act vs tau (max {top:.3g})", fill=(0, 0, 0), font=_font())
    draw.text((l, b + 2), "1", fill=(0, 0, 0), font=_font())
    draw.text((r - 6, b + 2), "0", fill=(0, 0, 0), font=_font())
    for br, color in ((1, (214, 39, 40)), (0, (31, 119, 180))):
        ys = prof[br]
        if not np.isfinite(ys).any():
            continue
        pts = [(l + (1 - float(tt)) * (r - l), b - (float(y) / (top or 1)) * (b - t)) for tt, y in zip(taus, ys) if np.isfinite(y)]
        if len(pts) == 1:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        else:
            draw.line(pts, fill=color, width=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
