"""Sites: the named places of a denoiser that we read and edit.

U-Nets (SD 1.x, SD 2.x, SDXL):

* block site: a ``Transformer2DModel`` (e.g. ``mid_block.attentions.0``); its value is the
  residual update Δ = output − input, ``[batch, H*W, C]``.
* head site: a cross-attention module ``...transformer_blocks.N.attn2``; its value is the per-head
  output before ``to_out``, ``[batch, H*W, heads * head_dim]`` (heads concatenated).

MMDiTs (SD3 / SD3.5: ``SD3Transformer2DModel``; FLUX.1: ``FluxTransformer2DModel``):

* block site: a transformer block (``transformer_blocks.{i}``, FLUX's
  ``single_transformer_blocks.{j}``); its value is the image tokens' residual update,
  ``[batch, H*W, inner_dim]`` on the token grid (the latent after patchifying: H/2 x W/2).
* text-stream block site ``<block>.context``: the text tokens' residual update of a block whose
  text output a later block reads, ``[batch, T, inner_dim]``; its resolution is ``(1, T)``, T
  the text length of the pipeline's default call (SD3 77 + 256, FLUX 512). SD3's last block
  (``context_pre_only``) and FLUX's last single block have none (see ``activations.families``).
* head site: the joint attention module ``<block>.attn`` (image and text tokens attend to each
  other); its value is the image queries' per-head output, ``[batch, H*W, heads * head_dim]``.
  Its ``probs`` are the image-query x text-key slice of the joint softmax, normalised over ALL
  keys (text and image), so a row sums to the share of attention that goes to the text, not to 1:
  the slice is comparable with a U-Net's cross-attention map only up to that share. The processor
  that computes it is ``activations.joint_processor``; every client reaches MMDiT sites through
  ``activations.hooks`` as it reaches a U-Net's.

Which blocks and attention modules a denoiser has is declared per architecture in
``activations.families``; this module builds the same ``Site``s from every one.

The global head index orders all head sites' heads by module in forward order (a U-Net's down
blocks, mid block, up blocks, each block's attentions and transformer layers in order; an
MMDiT's transformer blocks, then FLUX's single blocks) and by head inside each module.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Sequence
from typing import Literal, Optional, get_args

from activations.families import architecture_of, denoiser_of, pair
from activations.text import text_length
from common.errors import UnknownNameError, UsageError

SiteKind = Literal["block", "head"]
SITE_KINDS = get_args(SiteKind)
SITE_GROUPS = ("all", "blocks", "heads")


@dataclasses.dataclass(frozen=True)
class Site:
    """One site. For a block site, heads/head_dim/first_head describe the attention heads inside
    it (a text-stream site: those of its block); for a head site, its own."""

    name: str
    kind: str  # "block" | "head"
    resolution: tuple[int, int]  # (H, W) of the latent map at this site
    width: int  # channels of one stored row
    heads: int
    head_dim: int
    first_head: int  # global index of the first head (see module doc)
    block: str  # the block site that contains it (itself for a block site)

    @property
    def tokens_per_image(self) -> int:
        return self.resolution[0] * self.resolution[1]

    @property
    def head_range(self) -> range:
        return range(self.first_head, self.first_head + self.heads)


def latent_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The latent (H, W) of a pipeline call at ``height`` x ``width`` pixels (None: the default).

    A size the model cannot take is a UsageError naming it and the valid sizes: a multiple of the
    VAE factor times the denoiser's latent multiple (``Architecture.latent_multiple``: a U-Net's
    halvings, an MMDiT's patch).
    """
    denoiser = denoiser_of(pipe)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    arch = architecture_of(denoiser)
    default = pair(getattr(pipe, "default_sample_size", None) or arch.default_latent(denoiser))
    multiple = int(arch.latent_multiple(denoiser))
    step = factor * multiple
    size = []
    for name, value, dflt in (("height", height, default[0]), ("width", width, default[1])):
        if value is None:
            size.append(dflt)
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < step or value % step:
            raise UsageError(
                f"{name} must be a positive multiple of {step} pixels for this model (VAE factor {factor} x "
                f"latent multiple {multiple}), got {value!r}; valid sizes: "
                f"{', '.join(str(step * k) for k in range(1, 5))}, ... (default {dflt * factor})"
            )
        size.append(value // factor)
    return size[0], size[1]


def list_sites(model, sample_size=None, *, text_tokens: int | None = None) -> list[Site]:
    """All block sites and head sites of a denoiser (or of the pipeline holding it), in forward
    order: each block, then its text-stream site if it has one, then its heads.

    ``sample_size``: the latent size (H, W) or H of the run, which decides each site's resolution;
    None: the default of ``model``'s pipeline call if it is a pipeline, else the denoiser's. ``text_tokens``: the text length of an MMDiT run (its text-stream
    sites are ``(1, T)``); None: the length of ``model``'s calls if it is a pipeline, else the
    family's default (``Architecture.default_text_tokens``).
    """
    denoiser = denoiser_of(model)
    if model is not denoiser:  # a pipeline: the latent and text length of its own default call
        sample_size = latent_size(model) if sample_size is None else sample_size
        text_tokens = text_length(model) if text_tokens is None else text_tokens
    sites: list[Site] = []
    next_head = 0
    for block in architecture_of(denoiser).blocks(denoiser, sample_size, text_tokens):
        heads_here: list[Site] = []
        for name, attn in block.attentions:
            inner = attn.to_q.out_features
            heads_here.append(
                Site(name=name, kind="head", resolution=block.resolution, width=inner, heads=attn.heads,
                     head_dim=inner // attn.heads, first_head=next_head, block=block.name)
            )
            next_head += attn.heads
        heads = dict(
            heads=sum(s.heads for s in heads_here),
            head_dim=heads_here[0].head_dim if heads_here else 0,
            first_head=heads_here[0].first_head if heads_here else next_head,
        )
        sites.append(Site(name=block.name, kind="block", resolution=block.resolution, width=block.width, block=block.name, **heads))
        if block.context is not None:
            sites.append(Site(name=block.context, kind="block", resolution=(1, block.text_tokens), width=block.width,
                              block=block.context, **heads))
        sites += heads_here
    return sites


def head_table(unet_or_sites) -> list[tuple[str, int]]:
    """Global head index -> (head site name, head within the module)."""
    sites = unet_or_sites if isinstance(unet_or_sites, list) else list_sites(unet_or_sites)
    table = []
    for s in sites:
        if s.kind == "head":
            table += [(s.name, h) for h in range(s.heads)]
    return table


def head_sites(model) -> list[Site]:
    """The head sites of a pipeline, a denoiser or a list of sites, in global head order."""
    sites = model if isinstance(model, list) else list_sites(model)
    return [s for s in sites if s.kind == "head"]


def heads_by_site(model, heads) -> dict[str, list[int]]:
    """Global head indices or (site, module head) pairs -> {site: [module heads]}, sites in head
    order. Out-of-range heads and unknown sites are a ValueError naming the valid ones."""
    sites = head_sites(model)
    total = sum(s.heads for s in sites)
    by_name = {s.name: s for s in sites}
    out: dict[str, list[int]] = {}
    for h in heads:
        if isinstance(h, (list, tuple)):
            if len(h) != 2 or h[0] not in by_name:
                raise UsageError(f"head {list(h)!r} is not a (site, head) pair of this model; valid sites: {', '.join(by_name)}")
            site, local = by_name[h[0]], int(h[1])
            if not 0 <= local < site.heads:
                raise UsageError(f"head {local} out of range at {site.name} with {site.heads} heads (valid: 0..{site.heads - 1})")
        else:
            g = int(h)
            if not 0 <= g < total:
                raise UsageError(f"global head {g} out of range for this model's {total} cross-attention heads (valid: 0..{total - 1})")
            site = next(s for s in sites if g in s.head_range)
            local = g - site.first_head
        out.setdefault(site.name, [])
        if local not in out[site.name]:
            out[site.name].append(local)
    return {s.name: sorted(out[s.name]) for s in sites if s.name in out}


def resolve_sites(unet_or_sites, names: str | Iterable[str]) -> list[Site]:
    """Sites for ``names``: site names, or the groups "all", "blocks", "heads".

    An unknown name is a KeyError that names it, its closest matches and the valid sites.
    """
    sites = unet_or_sites if isinstance(unet_or_sites, list) else list_sites(unet_or_sites)
    by_name = {s.name: s for s in sites}
    if isinstance(names, str):
        names = [names]
    chosen: dict[str, Site] = {}
    for name in names:
        if name == "all":
            chosen.update(by_name)
        elif name == "blocks":
            chosen.update({s.name: s for s in sites if s.kind == "block"})
        elif name == "heads":
            chosen.update({s.name: s for s in sites if s.kind == "head"})
        elif name in by_name:
            chosen[name] = by_name[name]
        else:
            close = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.6)
            hint = f" Closest matches: {', '.join(close)}." if close else ""
            raise UnknownNameError(
                f"unknown site {name!r}.{hint} Valid sites: {', '.join(by_name)} (or the groups {', '.join(SITE_GROUPS)})"
            )
    # keep forward order regardless of the order asked for
    return [s for s in sites if s.name in chosen]


# --------------------------------------------------------------------------------------------
# diffatlas sites


def denoiser_for(spec: str):
    """A denoiser (weights not needed) for a model spec: a config name of configs/models/, a YAML
    path, a registered model name ("toy"), or a local diffusers pipeline folder / hub id (config
    only, weights on meta). Its class is the one its family declares (``activations.families``)."""
    from activations.families import ARCHITECTURES
    from activations.models import build_denoiser, model_config
    from common import plugins

    if plugins.model_plugin(spec) is not None:
        return build_denoiser(spec)
    try:
        model_config(spec)
    except ValueError as err:
        from pathlib import Path

        local = Path(spec).exists()
        if not local and spec.count("/") != 1:  # neither a folder nor a hub id: do not go online
            raise
        archs = {a.denoiser_class: a for a in ARCHITECTURES.values()}
        # a denoiser folder itself, else the pipeline's unet/ or transformer/ subfolder
        subs = [None] if local and (Path(spec) / "config.json").exists() else list(dict.fromkeys(a.denoiser for a in archs.values()))
        if local:
            subs = [s for s in subs if s is None or (Path(spec) / s).is_dir()] or subs
        reader = next(iter(archs.values())).denoiser_cls()  # any model class reads a model's config.json
        problem = None
        for sub in subs:
            try:
                config = reader.load_config(spec, subfolder=sub)
            except Exception as e:  # noqa: BLE001 - the last reason is reported below
                problem = e
                continue
            arch = archs.get(config.get("_class_name"))
            if arch is None:
                raise UsageError(f"{spec!r} holds a {config.get('_class_name')!r}, not a known denoiser; known: {', '.join(archs)}") from None
            import torch

            with torch.device("meta"):
                return arch.denoiser_cls().from_config(config)
        raise UsageError(f"{err} Also not a diffusers pipeline folder or reachable hub id: {spec!r} ({problem})") from None
    return build_denoiser(spec, device="meta")


def format_table(sites: Sequence[Site], attention: str = "cross-attention") -> str:
    """The sites as a table; ``attention`` names the head modules in the last line (an
    architecture's ``attention``: cross-attention, joint attention)."""
    rows = [("site", "kind", "H x W", "width", "heads", "head_dim", "first_head")]
    rows += [
        (s.name, s.kind, f"{s.resolution[0]}x{s.resolution[1]}", str(s.width), str(s.heads), str(s.head_dim), str(s.first_head))
        for s in sites
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[c]) if c == 0 else cell.rjust(widths[c]) for c, cell in enumerate(r)) for r in rows]
    n_heads = sum(s.heads for s in sites if s.kind == "head")
    n_mod = sum(1 for s in sites if s.kind == "head")
    n_blocks = sum(1 for s in sites if s.kind == "block")
    lines.append(f"{n_blocks} block sites, {n_mod} {attention} modules, {n_heads} heads")
    return "\n".join(lines)


@dataclasses.dataclass
class SitesConfig:
    """List a model's block sites and attention head sites (U-Nets: cross-attention; SD3 / FLUX:
    joint attention, the text stream's block sites as <block>.context)."""

    model: str = ""
    """config name (sd-1.4, sd-1.5, sd-2.1, sdxl-base, sd-3-medium, sd-3.5-large, flux-1-dev), a YAML
    path, 'toy', or a pipeline folder; may also be given as the first argument"""
    json: bool = False
    """print JSON (one object per site) instead of a table"""
    kind: Optional[SiteKind] = None
    """only sites of this kind"""


def main(argv: list[str] | None = None) -> int:
    """``diffatlas sites <model> [--json] [--kind block|head]``; bad input raises (the dispatcher prints it)."""
    from common.config import parse

    args = parse(SitesConfig, argv, "diffatlas sites", SitesConfig.__doc__, positional=("model",))
    if not args.model:
        from activations.models import MODEL_CONFIGS

        raise UsageError(f"give a model: diffatlas sites <model> ({', '.join(MODEL_CONFIGS)}, toy, a YAML path or a pipeline folder)")
    denoiser = denoiser_for(args.model)
    sites = list_sites(denoiser)
    if args.kind:
        sites = [s for s in sites if s.kind == args.kind]
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in sites], indent=1))
    else:
        print(format_table(sites, architecture_of(denoiser).attention))
    return 0
