"""CLIP image-text similarity between a generated image and its concept word (real models).

Loads a local CLIP folder (transformers ``CLIPModel`` and its tokenizer); images are resized to
the vision tower's size and normalised with CLIP's statistics (from preprocessor_config.json when
the folder has one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    ylabel = "CLIP similarity to the concept word"

    def __init__(self, model, tokenizer, template: str = "a photo of a {word}", concepts=None,
                 mean=CLIP_MEAN, std=CLIP_STD):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.concepts = concepts  # ConceptList: the words written into prompts
        self.size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def from_folder(cls, folder: str | Path, **kw) -> "ClipScorer":
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"CLIP folder {str(folder)!r} has no config.json; pass a local transformers CLIPModel folder")
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            kw.setdefault("mean", tuple(p.get("image_mean", CLIP_MEAN)))
            kw.setdefault("std", tuple(p.get("image_std", CLIP_STD)))
        return cls(CLIPModel.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder)), **kw)

    def check(self, concepts) -> None:
        if self.concepts is None:
            raise ValueError("the CLIP scorer needs the concept list (its words go into the prompts)")

    def prompts(self, concept: str, n: int, seed: int) -> list[tuple[str, str]]:
        words = self.concepts.words[self.concepts.index(concept)]
        rng = np.random.default_rng([seed, self.concepts.index(concept)])
        picked = [words[i] for i in rng.integers(0, len(words), size=n)]
        return [(self.template.format(word=w), w) for w in picked]

    @torch.no_grad()
    def score(self, concept: str, images: list[np.ndarray], targets: list[str]) -> list[float]:
        x = torch.stack([torch.as_tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1) / 255.0 for im in images])
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        img = self.model.get_image_features(pixel_values=x)
        tok = self.tokenizer(list(targets), padding=True, return_tensors="pt")
        txt = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        sim = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return sim.tolist()
