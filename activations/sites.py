"""Sites: the named places of a U-Net that we read and edit.

* block site: a ``Transformer2DModel`` (e.g. ``mid_block.attentions.0``); its value is the
  residual update Δ = output − input, ``[batch, H*W, C]``.
* head site: a cross-attention module ``...transformer_blocks.N.attn2``; its value is the per-head
  output before ``to_out``, ``[batch, H*W, heads * head_dim]`` (heads concatenated).

The global head index orders all cross-attention heads by module in forward order (down blocks,
mid block, up blocks, each block's attentions and transformer layers in order) and by head inside
each module. Note that ``named_modules()`` lists ``up_blocks`` before ``mid_block`` (diffusers
registers them in that order), so the order is built explicitly here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Sequence
from typing import Literal, Optional, get_args

from common.errors import UnknownNameError, UsageError

SiteKind = Literal["block", "head"]
SITE_KINDS = get_args(SiteKind)
SITE_GROUPS = ("all", "blocks", "heads")


@dataclasses.dataclass(frozen=True)
class Site:
    """One site. For a block site, heads/head_dim/first_head describe the cross-attention heads
    inside it; for a head site, its own."""

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


def _pair(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def _ordered_blocks(unet, sample_size=None) -> list[tuple[str, object, tuple[int, int]]]:
    """(prefix, block, resolution) for down blocks, mid block and up blocks, in forward order."""
    h, w = _pair(unet.config.sample_size if sample_size is None else sample_size)
    out, down_sizes = [], []
    for k, block in enumerate(unet.down_blocks):
        down_sizes.append((h, w))
        out.append((f"down_blocks.{k}", block, (h, w)))
        if getattr(block, "downsamplers", None):
            h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 conv with padding 1 rounds up
    if unet.mid_block is not None:
        out.append(("mid_block", unet.mid_block, (h, w)))
    # up block k works at the resolution of the mirrored down block (skip connections match)
    n = len(unet.up_blocks)
    for k, block in enumerate(unet.up_blocks):
        out.append((f"up_blocks.{k}", block, down_sizes[n - 1 - k] if n == len(down_sizes) else (h, w)))
    return out


def num_downsamplings(unet) -> int:
    return sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def latent_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The latent (H, W) of a pipeline call at ``height`` x ``width`` pixels (None: the default).

    A size the model cannot take is a ValueError naming it and the valid sizes: every U-Net level
    halves the latent, and the skip connections only match when each halving is exact.
    """
    unet = pipe.unet
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    default = _pair(getattr(pipe, "default_sample_size", None) or unet.config.sample_size)
    step = factor * 2 ** num_downsamplings(unet)
    size = []
    for name, value, dflt in (("height", height, default[0]), ("width", width, default[1])):
        if value is None:
            size.append(dflt)
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < step or value % step:
            raise UsageError(
                f"{name} must be a positive multiple of {step} pixels for this model (VAE factor {factor} x "
                f"2^{num_downsamplings(unet)} U-Net downsamplings), got {value!r}; valid sizes: "
                f"{', '.join(str(step * k) for k in range(1, 5))}, ... (default {dflt * factor})"
            )
        size.append(value // factor)
    return size[0], size[1]


def list_sites(unet, sample_size=None) -> list[Site]:
    """All block sites and head sites of ``unet`` in forward order (each block then its heads).

    ``sample_size``: the latent size (H, W) or H of the run, which decides each site's
    resolution; None: the U-Net's default sample size.
    """
    sites: list[Site] = []
    next_head = 0
    for prefix, block, res in _ordered_blocks(unet, sample_size):
        for a, transformer in enumerate(getattr(block, "attentions", None) or []):
            block_name = f"{prefix}.attentions.{a}"
            heads_here: list[Site] = []
            for b, tblock in enumerate(getattr(transformer, "transformer_blocks", None) or []):
                attn = getattr(tblock, "attn2", None)
                if attn is None:
                    continue
                inner = attn.to_q.out_features
                heads_here.append(
                    Site(
                        name=f"{block_name}.transformer_blocks.{b}.attn2",
                        kind="head",
                        resolution=res,
                        width=inner,
                        heads=attn.heads,
                        head_dim=inner // attn.heads,
                        first_head=next_head,
                        block=block_name,
                    )
                )
                next_head += attn.heads
            channels = transformer.config.in_channels if hasattr(transformer, "config") else heads_here[0].width
            sites.append(
                Site(
                    name=block_name,
                    kind="block",
                    resolution=res,
                    width=int(channels),
                    heads=sum(s.heads for s in heads_here),
                    head_dim=heads_here[0].head_dim if heads_here else 0,
                    first_head=heads_here[0].first_head if heads_here else next_head,
                    block=block_name,
                )
            )
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
    """The cross-attention head sites of a pipeline, a U-Net or a list of sites, in global head order."""
    sites = model if isinstance(model, list) else list_sites(getattr(model, "unet", model))
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


def unet_for(spec: str):
    """A U-Net (weights not needed) for a model spec: a config name of configs/models/, a YAML
    path, a registered model name ("toy"), or a local diffusers pipeline folder / hub id (config
    only, weights on meta)."""
    from activations.models import build_unet, model_config
    from common import plugins

    if plugins.model_plugin(spec) is not None:
        return build_unet(spec)
    try:
        model_config(spec)
    except ValueError as err:
        from pathlib import Path

        from diffusers import UNet2DConditionModel

        local = Path(spec).exists()
        if not local and spec.count("/") != 1:  # neither a folder nor a hub id: do not go online
            raise
        try:
            sub = "unet" if not local or (Path(spec) / "unet").is_dir() else None
            config = UNet2DConditionModel.load_config(spec, subfolder=sub)
        except Exception as e:
            raise UsageError(f"{err} Also not a diffusers pipeline folder or reachable hub id: {spec!r} ({e})") from None
        import torch

        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)
    return build_unet(spec, device="meta")


def format_table(sites: Sequence[Site]) -> str:
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
    lines.append(f"{n_blocks} block sites, {n_mod} cross-attention modules, {n_heads} heads")
    return "\n".join(lines)


@dataclasses.dataclass
class SitesConfig:
    """List a model's block sites and cross-attention head sites."""

    model: str = ""
    """config name (sd-1.4, sd-1.5, sd-2.1, sdxl-base), a YAML path, 'toy', or a pipeline folder; may
    also be given as the first argument"""
    json: bool = False
    """print JSON (one object per site) instead of a table"""
    kind: Optional[SiteKind] = None
    """only sites of this kind"""


def main(argv: list[str] | None = None) -> int:
    """``diffatlas sites <model> [--json] [--kind block|head]``; bad input raises (the dispatcher prints it)."""
    from common.config import parse

    args = parse(SitesConfig, argv, "diffatlas sites", SitesConfig.__doc__, positional=("model",))
    if not args.model:
        raise UsageError("give a model: diffatlas sites <model> (sd-1.4, sd-1.5, sd-2.1, sdxl-base, toy, a YAML path or a pipeline folder)")
    sites = list_sites(unet_for(args.model))
    if args.kind:
        sites = [s for s in sites if s.kind == args.kind]
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in sites], indent=1))
    else:
        print(format_table(sites))
    return 0
