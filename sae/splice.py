"""``SAESplice``: run an SAE inside the denoiser (U-Net or MMDiT) during generation (an Intervention kind).

The site's value x becomes x̂' + (x − x̂) with the error term, or x̂' alone without it, where x̂ is
the SAE's reconstruction of x and x̂' the reconstruction from the latents after ``edit`` (none:
x̂' = x̂). Keeping the error term means that an edit of one latent changes the site's value by that
latent's contribution only, as SAELens' ``use_error_term`` does; without an edit it leaves the
value unchanged up to float rounding. Without it the denoiser sees what the SAE can express, which is
what "loss recovered" scores. Without ``when`` it acts at the steps the SAE was trained on (its
placement's window); an explicit ``when`` wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from activations.intervention import Intervention, register_intervention
from common.errors import UsageError


def placed_site(sae, site: str | None, stage: str | None, what: str) -> tuple[str | None, str]:
    """The (site, stage) an SAE acts at: its placement's unless given; another site than the one it
    was trained on is refused (``what`` names the intervention in the message)."""
    placed = sae.placement
    site = site or placed.site
    if placed.site is not None and site != placed.site:
        raise UsageError(f"this SAE was trained on site {placed.site!r} (width {sae.d_in}); {what} site {site!r}")
    return site, stage or placed.stage or "block"


def check_sae_fits(sae, pipe, site: str | None = None, stage: str | None = None, model: str | None = None) -> None:
    """Refuse an SAE that cannot run on ``pipe``: non-finite weights, weights of another model (its
    recorded fingerprint, else the model name ``model`` when given), a site the model lacks, or
    another width; each message names the value and the valid choices. The one check of
    ``SAESplice``, ``steering.FeatureEdit`` and the explorer."""
    from activations.families import denoiser_of
    from activations.pipeline import model_fingerprint
    from activations.sites import list_sites

    p = sae.placement
    where = f" ({sae.source})" if getattr(sae, "source", None) is not None else ""
    for name, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UsageError(f"this SAE{where} has non-finite weights (NaN or inf) in {name}; retrain it or give another SAE")
    of_model = f"model {model!r}" if model else "this model"
    denoiser = denoiser_of(pipe)  # a pipeline or its denoiser (a U-Net or an MMDiT transformer)
    sae.check_model(model_fingerprint(denoiser), of_model)
    if p.model_revision is None and model and p.model and p.model != model:
        raise UsageError(f"this SAE{where} was trained on model {p.model!r}, not {model!r}; use model {p.model!r} "
                         f"or an SAE trained on {model!r}")
    site = site or p.site
    stage = stage or p.stage or "block"
    kind = "block" if stage == "block" else "head"
    sites = {s.name: s for s in list_sites(pipe) if s.kind == kind}
    if site not in sites:
        raise UsageError(f"this SAE's site {site!r} is not a {kind} site of {of_model}; valid sites: {', '.join(sites)}")
    width = sites[site].width  # a head site's width is heads x head_dim, the per-head outputs concatenated
    if width != sae.d_in:
        fits = [s.name for s in sites.values() if s.width == sae.d_in]
        raise UsageError(f"this SAE takes width {sae.d_in} but site {site!r} of {of_model} has width {width}; "
                         f"sites of width {sae.d_in}: {', '.join(fits) or 'none'}")


@register_intervention("sae_splice")
@dataclasses.dataclass(kw_only=True, eq=False)
class SAESplice(Intervention):
    """Replace a site's value by an SAE's reconstruction (``error_term`` keeps x − x̂)."""

    stages = ("block", "heads")
    stage: str = ""
    sae: Any = None
    """a SparseCoder, or the folder it was saved to"""
    error_term: bool = True
    """add the SAE's error x − x̂ back (edits then change only the edited latents' contribution)"""
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Python only: dense latents [n, m] -> edited latents (steering edits build on this)"""

    def __post_init__(self):
        from sae.sparse_coder import SparseCoder

        if isinstance(self.sae, (str, Path)):
            self.sae = SparseCoder.from_pretrained(self.sae)
        if not isinstance(self.sae, SparseCoder):
            raise UsageError(f"SAESplice needs an SAE (a SparseCoder or its folder), got {type(self.sae).__name__}")
        self.site, self.stage = placed_site(self.sae, self.site, self.stage, "it cannot be applied at")
        if self.when is None:  # the steps the SAE was trained on; an explicit when (also "all") wins
            self.when = self.sae.placement.window
        super().__post_init__()

    def check(self, pipe) -> None:
        check_sae_fits(self.sae, pipe, self.site, self.stage)

    def _flat(self, x: torch.Tensor, call) -> torch.Tensor:
        flat = rearrange(x, "b n c -> (b n) c") if self.stage == "block" else rearrange(x, "b h n d -> (b n) (h d)")
        if flat.shape[-1] != self.sae.d_in:
            raise UsageError(f"this SAE takes width {self.sae.d_in} (trained on {self.sae.placement.site!r}) but site "
                             f"{call.site!r} has width {flat.shape[-1]}")
        return flat

    def _unflat(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.stage == "block":
            return rearrange(flat, "(b n) c -> b n c", b=x.shape[0])
        return rearrange(flat, "(b n) (h d) -> b h n d", b=x.shape[0], h=x.shape[1])

    @torch.no_grad()
    def apply(self, x, call):
        flat = self._flat(x, call)
        sae = self.sae.to(x.device)
        inputs = flat.to(sae.dtype)
        latents = sae.encode(inputs)
        recon = sae.decode(latents)
        edited = recon if self.edit is None else sae.decode_dense(self.edit(latents.to_dense()))
        out = edited + (inputs - recon) if self.error_term else edited
        return self._unflat(out.to(x.dtype), x)

    def to_dict(self):
        source = getattr(self.sae, "source", None)
        if source is None:
            raise ValueError("an SAE splice can be written to a recipe only for an SAE loaded from a folder "
                             "(save it with save_pretrained and load it with SAE.from_pretrained)")
        if self.edit is not None:
            raise ValueError("SAESplice.edit is a Python function and cannot be written to a recipe")
        return _with_sae_path(self, source)


def _with_sae_path(splice: SAESplice, source) -> dict:
    sae, edit = splice.sae, splice.edit
    try:
        splice.sae, splice.edit = str(source), None
        return Intervention.to_dict(splice)
    finally:
        splice.sae, splice.edit = sae, edit
