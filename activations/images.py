"""Real images for the harvester: a folder with an optional captions file, a ``datasets`` image
column, or the true renders of a prompt source's scenes (toy world).

``ImageSet`` is indexable like ``PromptSet`` (any process reads its own images); every image is
checked when the set is opened (readable, the run's size), so a bad file is named before anything
is written. The harvester VAE-encodes each image, noises it to the selected timesteps with one
seeded noise per image (the family's training objective, ``Architecture.objective``) and passes
it through the denoiser once per timestep with its caption: the usual way SAE work reads real
images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from activations.config import ImageSource
from common.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_KINDS = ("none", "folder", "dataset", "renders")


class ImageSet:
    """The images of a harvest and their captions, indexable by image index: ``pixels(i)`` (uint8
    [H, W, 3]), ``text(i)``, ``sha256(i)`` (of the pixels), ``name(i)`` (where it came from) and,
    for renders, ``ground_truth(i)``."""

    def __init__(self, source: ImageSource, prompts=None):
        if source.kind not in IMAGE_KINDS or source.kind == "none":
            raise UsageError(f"images.kind {source.kind!r} reads no images; valid kinds: {', '.join(IMAGE_KINDS[1:])}")
        self.source, self.prompts = source, prompts
        self._files: list[Path] = []
        self._texts: list[str] = []
        self._dataset = None
        self._hashes: dict[int, str] = {}
        if source.kind == "folder":
            self._open_folder(source)
        elif source.kind == "dataset":
            self._open_dataset(source)
        else:
            if prompts is None or prompts.plugin is None:
                raise UsageError("images.kind 'renders' needs a prompt source that renders its scenes (prompts.kind: toyworld)")
            self._texts = [prompts.text(i) for i in range(len(prompts))]
        available = len(self._texts)
        n = source.num_images if source.num_images is not None else available
        if n > available:
            raise UsageError(f"images.num_images={n} but the {source.kind} source holds only {available} images")
        if n < 1:
            raise UsageError(f"the {source.kind} source {source.path or ''} holds no images; valid image files: "
                             f"{', '.join(IMAGE_SUFFIXES)}")
        self.n = int(n)

    # -- opening -----------------------------------------------------------------------------
    def _open_folder(self, source: ImageSource) -> None:
        if not source.path:
            raise UsageError("images.kind 'folder' needs images.path (a folder of images)")
        folder = Path(source.path)
        if not folder.is_dir():
            raise UsageError(f"images.path {str(folder)!r} is not a folder")
        self._files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self._files:
            raise UsageError(f"images.path {str(folder)!r} holds no images; valid image files: {', '.join(IMAGE_SUFFIXES)}")
        if source.captions is None:
            self._texts = [""] * len(self._files)
            return
        captions = _read_captions(Path(source.captions))
        missing = [p.name for p in self._files if p.name not in captions]
        if missing:
            raise UsageError(f"{source.captions}: no caption for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                             f"(every image of {folder} needs a line {{\"file\": <name>, \"text\": <caption>}})")
        self._texts = [captions[p.name] for p in self._files]

    def _open_dataset(self, source: ImageSource) -> None:
        from activations.prompts import open_dataset

        columns = [source.column] + ([source.caption_column] if source.caption_column else [])
        self._dataset = open_dataset(source.path, source.split, columns, "images")
        n = len(self._dataset)
        self._texts = [str(t) for t in self._dataset[source.caption_column]] if source.caption_column else [""] * n

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def text(self, index: int) -> str:
        return self._texts[index]

    def name(self, index: int) -> str:
        if self._files:
            return str(self._files[index])
        if self._dataset is not None:
            return f"{self.source.path}[{self.source.split}][{index}].{self.source.column}"
        return f"render of prompt {index}"

    def pixels(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3]; an unreadable image is a UsageError naming it."""
        if self.prompts is not None and self.source.kind == "renders":
            return np.asarray(self.prompts.truth_image(index), dtype=np.uint8)[..., :3]
        if self._files:
            return read_pixels(self._files[index], self.name(index))
        try:
            image = self._dataset[index][self.source.column]
            return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)[..., :3]
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read image {self.name(index)}: {e}") from None

    def sha256(self, index: int) -> str:
        """A hash of the image's pixels (recorded with every harvested image)."""
        if index not in self._hashes:
            self._hashes[index] = _hash(self.pixels(index))
        return self._hashes[index]

    def ground_truth(self, index: int) -> dict | None:
        return self.prompts.ground_truth(index) if self.source.kind == "renders" else None

    def check(self, size: tuple[int, int]) -> None:
        """Every image readable and ``size`` (H, W) pixels, before anything is written."""
        for i in range(self.n):
            pixels = self.pixels(i)
            self._hashes[i] = _hash(pixels)
            h, w = pixels.shape[:2]
            if (h, w) != tuple(size):
                raise UsageError(f"image {self.name(i)} is {w} x {h} pixels; this run takes {size[1]} x {size[0]} "
                                 "(set height and width to the images' size, a size the model can take)")


def read_pixels(source, name: str) -> np.ndarray:
    """The image file ``source`` (a path or a binary file object, e.g. an upload's bytes) as uint8
    [H, W, 3] RGB; a missing, unreadable or non-image file is a UsageError naming ``name``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:  # PIL's own message names a file object, not the file
        raise UsageError(f"cannot read image {name}: not an image file (e.g. {', '.join(IMAGE_SUFFIXES)})") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read image {name}: {e}") from None


def _hash(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]


def _read_captions(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise UsageError(f"images.captions {str(path)!r} does not exist (a JSONL file of {{\"file\", \"text\"}} lines)")
    out = {}
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["file"])] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{path} line {k} is not a JSON object with \"file\" and \"text\": {line[:80]!r}") from None
    return out
