"""The explorer's model side: generations with every head's attention maps, and edits.

Everything here reads or writes the denoiser (a U-Net or an MMDiT transformer) through the
Intervention protocol only:

* a generation attaches one ``Observe`` at stage ``probs`` per head site (a U-Net's cross-attention
  ``attn2``, an MMDiT's joint attention ``attn``: its image-query x text-key slice), which copies the
  conditional rows' attention probabilities [heads, patches, prompt tokens] of every step to the
  CPU as float16 while the image is drawn; views (the head grid, one head, a hovered patch) are
  then slices of that cache, never recomputed (Patch Explorer, Grabe et al. 2025, computes its
  views the same way, from maps recorded during one generation);
* an edit is a list of interventions (``HeadEdit`` at stage ``probs``, ``SwapKV``,
  ``FeatureEdit``) built from an ``EditSpec``; it becomes a ``steering.Recipe`` and the edited
  image is drawn by ``steering.run_recipe`` itself (with the recipe's checks: heads, steps inside
  the run, each kind's own ``check``), so the page, the recipe and ``diffatlas steer`` agree bit
  for bit. Step windows and branches are ``activations.timesteps`` gates, heads are grouped by
  ``activations.sites.heads_by_site``.

An opened image (``open_image``) is inverted by ``activations.invert.invert``, the function of
``diffatlas invert``, and saved as that command saves it; until ``close_image``, generations start
from its inverted noise (``Inversion.sample``) instead of a seed, and their edits are recipes with
``inversion:`` naming that folder, drawn by ``run_recipe`` as ``diffatlas steer`` draws them.

Requests have limits that ``/api/info`` states and the page shows (``LIMITS``): a generation holds
every head's maps of every step in memory, so its steps are capped well below a recipe's.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import itertools
import json
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activations.timesteps import parse_branch, parse_when
from common.config import MAX_SEED
from common.errors import UnknownNameError, UsageError
from steering.recipe import Recipe, check_number, run_recipe

OPS = ("scale", "swap", "sae")
SAE_MODES = {"inject": "add", "scale": "scale", "ablate": "ablate"}  # the page's word -> FeatureEdit's op
# a head attends from a patch to a token when it gives the token at least this many times the
# share uniform attention over its keys would (1 / keys); below that a hovered patch (often the
# background) names no heads, since the largest of many near-zero values says nothing
ABOVE_UNIFORM = 2.0
# one generation of the toy model at 100 steps: about 10 s on one CPU thread and 20-60 MB of maps
LIMITS = {"steps": 100, "seed": MAX_SEED}


def _ints(what: str, values) -> list[int]:
    if not isinstance(values, (list, tuple)):
        raise UsageError(f"{what} must be a list of integers, got {values!r}")
    return [check_number(f"{what} entry", v, integer=True) for v in values]


def png_base64(image) -> str:
    """A PIL image (or uint8 [H, W, 3] array) as base64 PNG (lossless: the page shows these bytes)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclasses.dataclass
class Generation:
    """One drawn image with its maps: ``maps[site]`` float16 [steps, heads, H*W, tokens]."""

    id: str
    prompt: str
    seed: int
    steps: int
    guidance: float
    tokens: list[str]
    image: np.ndarray  # uint8 [H, W, 3]
    maps: dict[str, torch.Tensor]
    edits: dict[str, dict] = dataclasses.field(default_factory=dict)  # edit id -> {"recipe", "image"}
    sae_acts: torch.Tensor | None = None  # with an SAE: its site's value, float16 [steps, H*W, width]
    keys: int = 0  # keys each head's softmax ran over (padding included): uniform attention is 1 / keys
    words: list[int] = dataclasses.field(default_factory=list)  # indices of ``tokens`` that are words (no start / end token)
    inversion: str | None = None  # drawn from an opened image: its inversion folder (the seed is unused)


@dataclasses.dataclass
class Opened:
    """An image opened in the explorer: generations start from its inverted noise."""

    name: str  # the file name it was uploaded as
    caption: str
    folder: Path  # its inversion as ``diffatlas invert`` writes it: what the edits' recipes name
    inversion: Any  # ``activations.invert.Inversion`` read back from ``folder``: what those recipes draw from
    image: np.ndarray  # the opened pixels, uint8 [H, W, 3]

    def describe(self) -> dict:
        """What the page shows of it (``/api/open``, ``/api/info``): the image as base64 PNG."""
        return {"name": self.name, "caption": self.caption, "inversion": str(self.folder), "image": png_base64(self.image),
                "steps": self.inversion.steps, "guidance": self.inversion.guidance}


@dataclasses.dataclass
class EditSpec:
    """One edit made in the page (the JSON body of ``POST /api/edit``)."""

    gen: str
    """the generation edited (its prompt, seed, steps and guidance are reused)"""
    op: str = "scale"
    """scale (multiply the heads' attention), swap (the heads read another prompt) or sae (edit a feature)"""
    heads: list[int] = dataclasses.field(default_factory=list)
    """global head indices (the grid's); scale and swap need at least one"""
    patches: list[int] = dataclasses.field(default_factory=list)
    """patch indices on the selection grid (``select_grid``, row-major); empty = refused (use all=True)"""
    all_patches: bool = False
    """edit every patch instead of a selection"""
    when: Any = "all"
    """all / early / middle / late, or {"steps": [first, last]} (inclusive range)"""
    factor: float = -2.0
    """scale: the factor (-2: Park et al.'s weakening)"""
    tokens: list[int] | None = None
    """scale: token indices to scale (None: the prompt's words; start, end and padding untouched, as in
    Park et al.'s weakening, since scaling the start token, which soaks up most attention, swamps any edit)"""
    prompt: str = ""
    """swap: the other prompt encoded into the selection"""
    branch: str | None = None
    """cond / uncond / both (default: both for scale and sae, cond for swap)"""
    feature: int = 0
    """sae: the feature"""
    mode: str = "scale"
    """sae: inject / scale / ablate"""
    value: float = 0.0
    """sae: amount injected or factor"""

    def __post_init__(self):
        # the JSON body's types, checked before anything uses them ("36" is no list of heads)
        if not isinstance(self.gen, str):
            raise UsageError(f"gen must be a generation id such as 'g0', got {self.gen!r}")
        if self.op not in OPS:
            raise UsageError(f"unknown edit {self.op!r}; valid edits: {', '.join(OPS)}")
        self.heads = _ints("heads", self.heads)
        self.patches = _ints("patches", self.patches)
        if not isinstance(self.all_patches, bool):
            raise UsageError(f"all_patches must be true or false, got {self.all_patches!r}")
        self.when = parse_when(self.when)
        self.factor = check_number("factor", self.factor)
        self.tokens = None if self.tokens is None else _ints("tokens", self.tokens)
        if not isinstance(self.prompt, str):
            raise UsageError(f"prompt must be a text, got {self.prompt!r}")
        self.branch = None if self.branch is None else parse_branch(self.branch).name
        self.feature = check_number("feature", self.feature, integer=True)
        if self.mode not in SAE_MODES:
            raise UsageError(f"unknown SAE edit mode {self.mode!r}; valid modes: {', '.join(SAE_MODES)}")
        self.value = check_number("value", self.value)


class Explorer:
    """A loaded model and its recent generations (kept in memory, the oldest dropped first); with an
    SAE, optionally its feature analysis read back (``labels``: ``analysis.feature_report.FeatureLabels``)."""

    def __init__(self, pipe, model: str = "toy", sae=None, hrv=None, keep: int = 8, labels=None, inversions=None):
        """``inversions``: the folder where opened images' inversions are written (one sub-folder per
        image, caption and settings; None: a new temporary folder on the first open)."""
        from activations.families import architecture_of
        from activations.sites import head_table, list_sites

        self.pipe, self.model, self.keep = pipe, model, keep
        pipe.set_progress_bar_config(disable=True)
        self.all_sites = {s.name: s for s in list_sites(pipe)}  # at the pipeline call's latent and text length
        self.sites = [s for s in self.all_sites.values() if s.kind == "head"]
        self.head_table = head_table(self.sites)
        # joint attention normalises a row over the image keys too (activations.joint_processor)
        self._image_keys = architecture_of(pipe).processor == "joint"
        self.sae, self.hrv, self.labels = sae, hrv, labels
        if sae is not None:
            self.check_sae(sae)
        if labels is not None:
            if sae is None:
                raise UsageError("a feature analysis (--features) labels an SAE's features; give that SAE with --sae")
            labels.check_sae(sae)
        if hrv is not None:
            hrv.check_model(pipe)
        self.generations: OrderedDict[str, Generation] = OrderedDict()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # one pipeline call at a time
        self.inversions = None if inversions is None else Path(inversions)
        self.opened: Opened | None = None  # None: generations start from seeds

    # -- model facts ----------------------------------------------------------------------
    @property
    def select_grid(self) -> tuple[int, int]:
        """The finest head grid: the page selects patches on it."""
        return max((s.resolution for s in self.sites), key=lambda r: r[0] * r[1])

    def site_grid(self, site: str) -> tuple[int, int]:
        """The grid of a site's values (an MMDiT text-stream site: (1, text length))."""
        return self.all_sites[site].resolution if site in self.all_sites else self.select_grid

    def defaults(self) -> dict:
        from activations.pipeline import model_defaults

        d = model_defaults(self.pipe)
        return {"steps": int(d["num_inference_steps"]), "guidance": float(d["guidance_scale"])}

    def info(self) -> dict:
        """What the page needs to lay out the grid: sites (columns) with their heads (rows)."""
        out = {"model": self.model, "select_grid": list(self.select_grid), "defaults": self.defaults(), "limits": dict(LIMITS),
               "sites": [{"name": s.name, "grid": list(s.resolution), "heads": s.heads, "first_head": s.first_head}
                         for s in self.sites],
               "num_heads": len(self.head_table), "sae": None, "hrv": None,
               "opened": None if self.opened is None else self.opened.describe()}
        if self.sae is not None:
            p = self.sae.placement
            out["sae"] = {"site": p.site, "stage": p.stage, "features": self.sae.num_latents, "source": str(self.sae.source),
                          "labels": None if self.labels is None else str(self.labels.folder)}
        if self.hrv is not None:
            hrv = self.hrv.hrv
            top = hrv.argmax(0).tolist()
            out["hrv"] = {"concepts": list(self.hrv.concepts.names), "head_concept": [self.hrv.concepts.names[c] for c in top]}
        return out

    def check_sae(self, sae) -> None:
        """Refuse an SAE that does not fit this model (``sae.splice.check_sae_fits``, the check every
        SAE edit runs): its weights, model, site or width."""
        from sae.splice import check_sae_fits

        check_sae_fits(sae, self.pipe, model=self.model)

    def tokens(self, prompt: str) -> list[str]:
        """The prompt's tokens as the tokenizer of the text sequence's first part splits it (start
        and end tokens included; token k is text position k): a U-Net's and SD3's CLIP tokens,
        FLUX's T5 tokens (``steering.tokens``)."""
        from steering.tokens import shown_tokens

        return shown_tokens(self.pipe, prompt)

    def check_prompt(self, prompt: str) -> None:
        """The check of ``diffatlas generate`` and of recipes: no empty prompt, no unknown word."""
        from activations.generate import check_prompts

        if not isinstance(prompt, str):
            raise UsageError(f"the prompt must be a text, got {prompt!r}")
        if not prompt.strip():
            raise UsageError("the prompt is empty; type at least one word")
        check_prompts(self.model, [prompt])

    # -- generation with the head grid captured ---------------------------------------------
    def generate(self, prompt: str, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 capture: bool = True) -> Generation:
        """Draw one image; with ``capture``, every head's maps at every step for every prompt token."""
        from activations.edits import Observe
        from activations.hooks import intervene

        opened = self.opened  # read once: an open or close during this call does not mix the two
        steps, guidance = self._settings(steps, guidance, opened)
        seed = check_number("seed", seed, integer=True, lo=0, hi=LIMITS["seed"])
        self.check_prompt(prompt)
        tokens = self.tokens(prompt)
        n_tok = len(tokens)
        per_site: dict[str, list[torch.Tensor]] = {s.name: [] for s in self.sites}
        keys = []

        def keeper(name):
            store = per_site[name]

            def keep(x, call):  # x: probs [b, heads, n, t]
                rows = call.rows("cond")
                row = x[rows[0]] if rows is not None else x[0]
                store.append(row[:, :, :n_tok].to(torch.float16).cpu())
                # the keys of the softmax: the text (padding included), and the image tokens in joint attention
                keys[:] = [x.shape[-1] + (x.shape[-2] if self._image_keys else 0)]

            return keep

        observers = [Observe(site=s.name, stage="probs", fn=keeper(s.name), sees="before") for s in self.sites] if capture else []
        sae_rows: list[torch.Tensor] = []
        if capture and self.sae is not None:
            def keep_sae(x, call):  # block [b, n, c] or heads [b, h, n, d]: the SAE's input rows
                rows = call.rows("cond")
                row = x[rows[0]] if rows is not None else x[0]
                row = row if row.ndim == 2 else row.permute(1, 0, 2).reshape(row.shape[1], -1)
                sae_rows.append(row.to(torch.float16).cpu())

            p = self.sae.placement
            observers.append(Observe(site=p.site, stage=p.stage or "block", fn=keep_sae, sees="before"))
        with self._lock:
            with intervene(self.pipe, *observers):
                images = self._draw(prompt, seed, steps, guidance, opened)
        maps = {name: torch.stack(v) if v else torch.zeros(0) for name, v in per_site.items()}
        from steering.tokens import word_indices

        gen = Generation(id=f"g{next(self._ids)}", prompt=prompt, seed=int(seed), steps=steps, guidance=guidance,
                         tokens=tokens, words=word_indices(self.pipe, prompt, shown_only=True), image=np.asarray(images[0].convert("RGB")), maps=maps,
                         sae_acts=torch.stack(sae_rows) if sae_rows else None, keys=keys[0] if keys else 0,
                         inversion=None if opened is None else str(opened.folder))
        self.generations[gen.id] = gen
        while len(self.generations) > self.keep:
            self.generations.popitem(last=False)
        return gen

    def _settings(self, steps, guidance, opened: Opened | None) -> tuple[int, float]:
        """The steps and guidance of a generation or an inversion (None: the model's defaults, or
        the opened image's, whose inversion fixes both: drawing at others would not draw it again)."""
        d = self.defaults() if opened is None else {"steps": opened.inversion.steps, "guidance": opened.inversion.guidance}
        steps = check_number("steps", d["steps"] if steps is None else steps, integer=True, lo=1, hi=LIMITS["steps"])
        guidance = check_number("guidance", d["guidance"] if guidance is None else guidance, lo=0)
        if opened is not None and (steps, guidance) != (d["steps"], d["guidance"]):
            raise UsageError(f"steps {steps} and guidance {guidance:g} differ from the opened image's inversion ({d['steps']} "
                             f"steps, guidance {d['guidance']:g}); open it again with them, or go back to seeds")
        return steps, guidance

    def _draw(self, prompt: str, seed: int, steps: int, guidance: float, opened: Opened | None) -> list:
        """One image: from the opened image's inverted noise as ``steering.recipe.draw`` draws an
        ``inversion:`` recipe, else from ``seed``."""
        if opened is not None:
            return opened.inversion.sample(self.pipe, [prompt]).images
        from activations.generate import sample

        return sample(self.pipe, [prompt], [int(seed)], steps=steps, guidance=guidance).images

    def get(self, gen_id: str) -> Generation:
        if gen_id not in self.generations:
            kept = ", ".join(self.generations) or "none"
            raise UnknownNameError(f"unknown generation {gen_id!r} (generations kept: {kept}); generate an image first")
        return self.generations[gen_id]

    # -- views, served from the cache ---------------------------------------------------
    def _check_view(self, gen: Generation, step: int, token: int | None = None) -> None:
        if not gen.maps or next(iter(gen.maps.values())).numel() == 0:
            raise UsageError(f"generation {gen.id} was drawn without its head maps")
        if not 0 <= int(step) < gen.steps:
            raise UsageError(f"step {step} out of range; generation {gen.id} has {gen.steps} steps (valid: 0..{gen.steps - 1})")
        if token is not None and not 0 <= int(token) < len(gen.tokens):
            raise UsageError(f"token {token} out of range; the prompt has {len(gen.tokens)} tokens "
                             f"(valid: 0..{len(gen.tokens) - 1}: {' '.join(gen.tokens)})")

    def _head(self, head: int) -> tuple[Any, int]:
        if not 0 <= int(head) < len(self.head_table):
            raise UsageError(f"head {head} out of range; the model has {len(self.head_table)} heads (valid: 0..{len(self.head_table) - 1})")
        name, local = self.head_table[int(head)]
        return next(s for s in self.sites if s.name == name), local

    def grid(self, gen_id: str, step: int, token: int) -> list[dict]:
        """Every head's map [H*W] for ``token`` at ``step``, in the global head order."""
        gen = self.get(gen_id)
        self._check_view(gen, step, token)
        out = []
        for s in self.sites:
            m = gen.maps[s.name][int(step), :, :, int(token)].float()  # [heads, n]
            for j in range(s.heads):
                out.append({"head": s.first_head + j, "site": s.name, "local": j, "grid": list(s.resolution),
                            "values": np.round(m[j].numpy(), 4).tolist()})
        return out

    def head_maps(self, gen_id: str, head: int, token: int | None = None, step: int | None = None) -> dict:
        """One head's maps: for one (token, step), or [steps][tokens][H*W] when both are None."""
        gen = self.get(gen_id)
        site, local = self._head(head)
        self._check_view(gen, 0 if step is None else step, token)
        m = gen.maps[site.name][:, local].float()  # [steps, n, tokens]
        base = {"head": int(head), "site": site.name, "local": local, "grid": list(site.resolution), "tokens": gen.tokens}
        if token is None and step is None:
            return {**base, "maps": np.round(m.permute(0, 2, 1).numpy(), 4).tolist()}
        if token is None or step is None:
            raise UsageError("give both token and step, or neither (all maps of the head)")
        return {**base, "values": np.round(m[int(step), :, int(token)].numpy(), 4).tolist()}

    def patch(self, gen_id: str, step: int, y: float, x: float, token: int | None = None, top: int = 10,
              top_heads: int = 5) -> dict:
        """Which heads attend from the image point (y, x) (fractions) to which token at ``step``:
        the ``top`` (head, word) pairs by attention and, with ``token``, each head's value for it and
        the ``top_heads`` heads giving it most; both only where the attention is at least
        ``ABOVE_UNIFORM`` times uniform (``threshold``), so a patch no head looks from names none."""
        gen = self.get(gen_id)
        self._check_view(gen, step, token)
        if not (0 <= y <= 1 and 0 <= x <= 1):
            raise UsageError(f"patch position must be fractions in [0, 1], got y={y}, x={x}")
        values = []  # [heads, tokens]
        for s in self.sites:
            h, w = s.resolution
            i, j = min(int(y * h), h - 1), min(int(x * w), w - 1)
            values.append(gen.maps[s.name][int(step), :, i * w + j, :].float())
        v = torch.cat(values)  # [num_heads, tokens]
        words = gen.words or list(range(v.shape[1]))  # the start / end tokens soak up attention; rank the words
        content = v[:, words]
        threshold = ABOVE_UNIFORM / gen.keys
        flat = content.flatten()
        best = torch.topk(flat, min(top, flat.numel()))
        pairs = [{"head": int(i) // content.shape[1], "token": words[int(i) % content.shape[1]],
                  "word": gen.tokens[words[int(i) % content.shape[1]]], "value": round(float(val), 4)}
                 for val, i in zip(best.values, best.indices) if val >= threshold]
        out = {"pairs": pairs, "uniform": round(1.0 / gen.keys, 4), "threshold": round(threshold, 4)}
        if token is not None:
            to_token = v[:, int(token)]
            strong = torch.nonzero(to_token >= threshold).flatten()
            strong = strong[torch.argsort(to_token[strong], descending=True)][:top_heads]
            out["token_values"] = np.round(to_token.numpy(), 4).tolist()
            out["heads"] = [int(h) for h in strong]
        return out

    def features(self, gen_id: str, step: int, y: float, x: float, top: int = 8) -> dict:
        """The SAE features active at the image point (y, x) at ``step``, strongest first, each with
        its heatmap over the site's patches at that step, the fraction of patches where it fires and,
        with a feature analysis (``labels``), what it says of the feature (``FeatureLabels.of``)."""
        if self.sae is None:
            raise UsageError("no SAE loaded: start the explorer with --sae DIR to list features")
        gen = self.get(gen_id)
        self._check_view(gen, step)
        if gen.sae_acts is None:
            raise UsageError(f"generation {gen.id} was drawn before the SAE was loaded; generate again")
        if not (0 <= y <= 1 and 0 <= x <= 1):
            raise UsageError(f"patch position must be fractions in [0, 1], got y={y}, x={x}")
        site = self.sae.placement.site
        h, w = self.site_grid(site)
        with torch.no_grad():
            z = self.sae.encode(gen.sae_acts[int(step)].float().to(self.sae.dtype)).to_dense().float()  # [n, m]
        p = min(int(y * h), h - 1) * w + min(int(x * w), w - 1)
        vals = z[p]
        k = min(top, int((vals > 0).sum()))
        best = torch.topk(vals, k) if k else None
        feats = [] if best is None else [
            {"feature": int(f), "value": round(float(v), 4), "density": round(float((z[:, f] > 0).float().mean()), 4),
             "heatmap": np.round(z[:, f].numpy(), 4).tolist(),
             "labels": None if self.labels is None else self.labels.of(int(f))} for v, f in zip(best.values, best.indices)]
        return {"site": site, "grid": [h, w], "patch": p, "features": feats}

    # -- edits ---------------------------------------------------------------------------
    def _mask_for(self, spec: EditSpec, grid: tuple[int, int]):
        """The selection (on ``select_grid``) as Patches on ``grid``: a coarse patch is in when
        any fine patch inside it is."""
        from activations.masks import Patches

        if spec.all_patches:
            return None
        H, W = self.select_grid
        sel = np.zeros(H * W, dtype=bool)
        sel[np.asarray(spec.patches, dtype=int)] = True
        sel = sel.reshape(H, W)
        h, w = grid
        coarse = np.zeros((h, w), dtype=bool)
        ii, jj = np.nonzero(sel)
        coarse[(ii * h) // H, (jj * w) // W] = True
        return Patches(np.flatnonzero(coarse), grid=(h, w))

    def interventions(self, spec: EditSpec) -> list:
        """The interventions of one edit (one per head site with chosen heads, or one SAE splice)."""
        from activations.sites import heads_by_site

        gen = self.get(spec.gen)
        H, W = self.select_grid
        if not spec.all_patches:
            if not spec.patches:
                raise UsageError("no patches selected: drag a box or brush on the image, or choose 'all patches'")
            bad = [p for p in spec.patches if not 0 <= int(p) < H * W]
            if bad:
                raise UsageError(f"patch {bad[0]} out of range for the {H}x{W} selection grid (valid: 0..{H * W - 1})")
        when = spec.when  # a gate; steps outside this generation's run are refused by the recipe's check
        branch = spec.branch or ("cond" if spec.op == "swap" else "both")
        if spec.op == "sae":
            return [self._sae_edit(spec, when, branch)]
        if not spec.heads:
            raise UsageError("no heads selected: click heads in the grid (or pick the top heads of an HRV concept)")
        by_site = heads_by_site(self.sites, spec.heads)
        grids = {s.name: s.resolution for s in self.sites}
        if spec.op == "scale":
            from activations.edits import HeadEdit

            from steering.tokens import word_indices

            # the prompt's words in every part of the text (SD3: its CLIP and its T5 tokens)
            tokens = word_indices(self.pipe, gen.prompt) if spec.tokens is None else spec.tokens
            for t in spec.tokens or ():
                self._check_view(gen, 0, t)
            if not tokens:
                raise UsageError("no tokens to scale: the prompt has no words")
            return [HeadEdit(site=name, stage="probs", heads=locals_, tokens=tokens, scale=float(spec.factor),
                             mask=self._mask_for(spec, grids[name]), when=when, branch=branch)
                    for name, locals_ in by_site.items()]
        from activations.edits import SwapKV

        from steering.heads import prompt_sources

        self.check_prompt(spec.prompt)
        # what each head reads of the other prompt: its encoding (U-Nets) or its text keys and
        # values recorded by drawing it at this generation's steps (MMDiTs), as EncodePrompt does
        sources = prompt_sources(self.pipe, spec.prompt, spec.heads, gen.steps, gen.guidance)
        return [SwapKV(site=name, heads=locals_, mask=self._mask_for(spec, grids[name]), when=when, branch=branch, **source)
                for name, (locals_, source) in sources.items()]

    def _sae_edit(self, spec: EditSpec, when, branch):
        if self.sae is None:
            raise UsageError("no SAE loaded: start the explorer with --sae DIR to edit SAE features")
        from steering.features import FeatureEdit

        site = self.sae.placement.site
        grid = self.site_grid(site)
        # through the SAE with its error term, as a recipe's FeatureEdit; the page's inject adds a fixed amount
        return FeatureEdit(sae=self.sae, features=[spec.feature], op=SAE_MODES[spec.mode], strength=spec.value,
                           via="splice", mask=self._mask_for(spec, grid), when=when, branch=branch)

    def edit(self, spec: EditSpec) -> dict:
        """Draw the edited image through its recipe: {edit id, image (PNG base64), diff, recipe}."""
        gen = self.get(spec.gen)
        interventions = self.interventions(spec)
        recipe = Recipe(model=self.model, prompts=[gen.prompt], seeds=[gen.seed], steps=gen.steps, guidance=gen.guidance,
                        interventions=interventions, inversion=gen.inversion)
        with self._lock:
            image = np.asarray(run_recipe(recipe, self.pipe, before=False)[1][0].convert("RGB"))
        diff = np.abs(image.astype(np.int16) - gen.image.astype(np.int16))
        # amplified so that small changes show; the max says how large it really is
        shown = np.clip(diff.astype(np.float32) * (255.0 / max(int(diff.max()), 1)), 0, 255).astype(np.uint8)
        edit_id = f"e{next(self._ids)}"
        gen.edits[edit_id] = {"recipe": recipe, "image": image}
        return {"edit": edit_id, "gen": gen.id, "image": png_base64(image), "diff": png_base64(shown),
                "max_diff": int(diff.max()), "changed_pixels": int((diff.max(-1) > 0).sum()),
                "recipe": recipe.to_yaml()}

    def recipe(self, gen_id: str, edit_id: str) -> str:
        gen = self.get(gen_id)
        if edit_id not in gen.edits:
            raise UnknownNameError(f"unknown edit {edit_id!r} of generation {gen_id} (edits: {', '.join(gen.edits) or 'none'})")
        return gen.edits[edit_id]["recipe"].to_yaml()

    # -- real images ---------------------------------------------------------------------
    def open_image(self, data: bytes, name: str, caption: str = "", steps: int | None = None,
                   guidance: float | None = None) -> Opened:
        """Open an image file's bytes: invert it with ``caption`` at ``steps`` and ``guidance`` (None:
        the model's defaults) and draw every later generation from its noise. Bad input (not an
        image, another size than the model's, a caption the model cannot read) is refused before
        any work, and a failed open leaves the explorer and the inversions folder as they were."""
        from activations.generate import check_prompts
        from activations.images import read_pixels
        from activations.invert import REFINE, check_size, inversion_record, load

        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"name must be the image's file name, got {name!r}")
        if not isinstance(caption, str):
            raise UsageError(f"caption must be a text (empty for none), got {caption!r}")
        steps, guidance = self._settings(steps, guidance, None)
        if caption.strip():  # "" is allowed: the image is inverted without a caption, as `diffatlas invert` allows
            check_prompts(self.model, [caption])
        pixels = read_pixels(io.BytesIO(data), name)
        check_size(self.pipe, pixels, name, self.model)
        record = inversion_record(self.pipe, self.model, [caption], [name], REFINE)
        with self._lock:
            folder = self._inversion_folder(pixels, record, steps, guidance)
            opened = Opened(name=name, caption=caption, folder=folder, inversion=load(folder)[0], image=pixels)
        self.opened = opened
        return opened

    def close_image(self) -> None:
        """Back to seeds: later generations start from their seed again (earlier ones keep their image)."""
        self.opened = None

    def _inversion_folder(self, pixels: np.ndarray, record: dict, steps: int, guidance: float) -> Path:
        """The folder of this image's inversion (named by the pixels, caption, settings and weights, so
        reopening an image reuses it), inverted and written now if absent: into a temporary folder
        renamed when complete, so a failure leaves no folder behind and a recipe never names a partial one."""
        from activations.invert import invert, save

        key = hashlib.sha256(json.dumps({**record, "images": None, "steps": steps, "guidance": guidance}, sort_keys=True)
                             .encode() + np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]
        name = f"opened-{key}"
        if self.inversions is not None and (self.inversions / name).is_dir():
            return self.inversions / name
        inversion = invert(self.pipe, [pixels], [record["captions"][0]], steps, guidance, refine=record["refine"])
        root = self._inversions_root()  # made only now: a failed inversion leaves not even an empty folder
        folder = root / name
        tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            save(inversion, tmp, record)
            from PIL import Image

            Image.fromarray(pixels).save(tmp / "image.png")  # what was opened, beside its inversion
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def _inversions_root(self) -> Path:
        if self.inversions is None:
            import tempfile

            self.inversions = Path(tempfile.mkdtemp(prefix="diffatlas-explore-"))
        self.inversions.mkdir(parents=True, exist_ok=True)
        return self.inversions

    def hrv_top(self, concept: str, n: int) -> list[int]:
        """The global heads of the ``n`` largest HRV entries of ``concept``."""
        if self.hrv is None:
            raise UsageError("no HRVs loaded: start the explorer with --hrv DIR")
        names = list(self.hrv.concepts.names)
        if concept not in names:
            raise UsageError(f"unknown concept {concept!r}; valid concepts: {', '.join(names)}")
        if not 1 <= int(n) <= len(self.head_table):
            raise UsageError(f"n must be in 1..{len(self.head_table)}, got {n}")
        return [h for h, *_ in self.hrv.top_heads(concept, int(n))]
