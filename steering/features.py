"""SAE feature edits at one site (Tinaz et al., arXiv 2504.15473).

``FeatureEdit`` changes the activation z_k of SAE features k at the SAE's site, then writes the
change back into the site's value x (a block's Δ, or a head site's per-head outputs):

* ``via="add"`` (default, as Tinaz et al.): x += (z'_k − z_k) · d_k with d_k the decoder direction,
  the features' decoder directions added to the block output rather than a reconstruction decoded;
* ``via="splice"``: through the SAE with its error term (``sae.splice``'s ``edit``): x becomes
  decode(z') + (x − decode(z)). The decoder is linear, so both agree up to rounding; the splice
  form also allows ``error_term=False``.

Operations (β = ``strength``, ‖Z_ij‖ = norm of the site's value at patch (i, j)):

* ``inject``:  z'_k = z_k + β·‖Z_ij‖ (no encoding needed);
* ``add``:     z'_k = z_k + β, a fixed amount (the explorer's inject; no encoding needed);
* ``scale``:   z'_k = β·z_k;        ``clamp``: z'_k = β;        ``ablate``: z'_k = 0;
* ``spatial``: z'_k = β·‖Z_ij‖ inside ``region``, 0 outside (Tinaz et al.'s spatial edit: early
  edits move composition);
* ``global``:  x += β·‖Z_ij‖ / Σ_ij ‖Z‖ · d_k at every position of each image (their style edit).

``mask`` (as every intervention's) limits where the edit writes at all; ``region`` is the
spatial edit's inside. One line in Python or YAML::

    FeatureEdit(sae="runs/sae/up2", features=[12], op="spatial", strength=4, region={"quadrant": "top left"}, when="early")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from activations.intervention import Intervention, register_intervention
from activations.masks import mask_spec, parse_mask
from common.errors import UsageError
from sae.splice import check_sae_fits, placed_site

OPS = ("inject", "add", "scale", "clamp", "ablate", "spatial", "global")
VIAS = ("add", "splice")


@register_intervention("feature_edit")
@dataclasses.dataclass(kw_only=True, eq=False)
class FeatureEdit(Intervention):
    """Inject, scale, clamp, ablate, or spatially / globally set SAE features at the SAE's site."""

    stages = ("block", "heads")
    stage: str = ""
    sae: Any = None
    """the SAE: its folder (as in recipes) or a loaded SparseCoder with a .source folder"""
    features: Any = None
    """one feature index or a list of them"""
    op: str = "inject"
    """inject, add, scale, clamp, ablate, spatial or global (see the module doc)"""
    strength: float = 1.0
    """β: the factor of ‖Z_ij‖ (inject, spatial, global), the amount added, the scale, or the clamp value"""
    region: Any = None
    """spatial only: inside of the edit, a mask spec ({quadrant: ..}, {box: ..}, {patches: ..}, {image: ..})"""
    via: str = "add"
    """add: add decoder directions (Tinaz et al.); splice: through the SAE with its error term"""
    error_term: bool = True
    """splice only: keep the SAE's error x − x̂"""

    def __post_init__(self):
        from sae.sparse_coder import SparseCoder

        if isinstance(self.sae, (str, Path)):
            self.sae = SparseCoder.from_pretrained(self.sae)
        if not isinstance(self.sae, SparseCoder):
            raise UsageError(f"FeatureEdit needs an SAE (a SparseCoder or its folder), got {type(self.sae).__name__}")
        self.site, self.stage = placed_site(self.sae, self.site, self.stage, "it cannot edit")
        if self.site is None:
            raise UsageError("FeatureEdit needs site= (this SAE does not record the site it was trained on)")
        if self.when is None:  # the steps the SAE was trained on; an explicit when (also "all") wins
            self.when = self.sae.placement.window
        super().__post_init__()
        if self.op not in OPS:
            raise UsageError(f"unknown feature op {self.op!r}; valid ops: {', '.join(OPS)}")
        if self.via not in VIAS:
            raise UsageError(f"unknown via {self.via!r}; valid: {', '.join(VIAS)}")
        feats = [self.features] if isinstance(self.features, int) else list(self.features if self.features is not None else [])
        if not feats:
            raise UsageError("FeatureEdit needs features= (one index or a list)")
        m = self.sae.num_latents
        for f in feats:
            if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < m:
                raise UsageError(f"feature {f!r} out of range for this SAE with {m} latents (valid: 0..{m - 1})")
        self.features = feats
        self.region = parse_mask(self.region)
        if self.op == "spatial" and self.region is None:
            raise UsageError("op 'spatial' needs region= (where the feature is set to strength·‖Z_ij‖; 0 elsewhere)")
        if self.op != "spatial" and self.region is not None:
            raise UsageError(f"region is for op 'spatial' only (op is {self.op!r}); use mask= to limit other edits")

    # -- checks against the model ---------------------------------------------------------
    def check(self, model) -> None:
        """Refuse an SAE that does not fit the model, a pipeline or its U-Net (``sae.splice.check_sae_fits``)."""
        check_sae_fits(self.sae, model, self.site, self.stage)

    # -- the edit -------------------------------------------------------------------------
    def _flat(self, x):
        flat = rearrange(x, "b n c -> b n c") if self.stage == "block" else rearrange(x, "b h n d -> b n (h d)")
        if flat.shape[-1] != self.sae.d_in:
            raise UsageError(f"this SAE takes width {self.sae.d_in} (trained on {self.sae.placement.site!r}) but site "
                             f"{self.site!r} has width {flat.shape[-1]}")
        return flat

    def _unflat(self, flat, x):
        return flat if self.stage == "block" else rearrange(flat, "b n (h d) -> b h n d", h=x.shape[1])

    def _targets(self, z_bnf, norms_bn, call) -> torch.Tensor:
        """Edited activations z' [b, n, f] of the chosen features."""
        beta = float(self.strength)
        if self.op == "inject":
            return z_bnf + beta * norms_bn[..., None]
        if self.op == "add":
            return z_bnf + beta
        if self.op == "scale":
            return beta * z_bnf
        if self.op == "clamp":
            return torch.full_like(z_bnf, beta)
        if self.op == "ablate":
            return torch.zeros_like(z_bnf)
        inside_n = self.region.on_grid(*call.grid).to(z_bnf.device)  # spatial
        if inside_n.numel() != z_bnf.shape[1]:
            raise UsageError(f"region of {inside_n.numel()} patches does not fit site {self.site} with {z_bnf.shape[1]}")
        return torch.where(inside_n[None, :, None], beta * norms_bn[..., None], torch.zeros_like(z_bnf))

    @torch.no_grad()
    def apply(self, x, call):
        flat_bnc = self._flat(x)
        sae = self.sae if self.sae.device == x.device else self.sae.to(x.device)
        inputs = flat_bnc.to(sae.dtype)
        dirs_fc = sae.W_dec[self.features]
        norms_bn = inputs.norm(dim=-1)
        if self.op == "global":
            share_bn = norms_bn / norms_bn.sum(1, keepdim=True).clamp_min(1e-12)
            out = inputs + float(self.strength) * share_bn[..., None] * dirs_fc.sum(0)
            return self._unflat(out.to(x.dtype), x)
        rows = rearrange(inputs, "b n c -> (b n) c")
        if self.via == "splice":
            latents = sae.encode(rows)
            recon = sae.decode(latents)
            dense = latents.to_dense()
            z = rearrange(dense[:, self.features], "(b n) f -> b n f", b=x.shape[0])
            dense = dense.clone()
            dense[:, self.features] = rearrange(self._targets(z, norms_bn, call), "b n f -> (b n) f").to(dense.dtype)
            edited = sae.decode_dense(dense)
            out = edited + (rows - recon) if self.error_term else edited
            out = rearrange(out, "(b n) c -> b n c", b=x.shape[0])
        else:
            if self.op in ("inject", "add"):  # z' − z does not depend on z
                z = torch.zeros(*norms_bn.shape, len(self.features), dtype=inputs.dtype, device=inputs.device)
            else:
                z = rearrange(sae.encode(rows).to_dense()[:, self.features], "(b n) f -> b n f", b=x.shape[0])
            out = inputs + (self._targets(z, norms_bn, call) - z).to(inputs.dtype) @ dirs_fc
        return self._unflat(out.to(x.dtype), x)

    def to_dict(self):
        source = getattr(self.sae, "source", None)
        if source is None:
            raise ValueError("a feature edit can be written to a recipe only for an SAE loaded from a folder "
                             "(save it with save_pretrained and load it with SAE.from_pretrained)")
        sae, region = self.sae, self.region
        try:
            self.sae, self.region = str(source), mask_spec(region)
            return Intervention.to_dict(self)
        finally:
            self.sae, self.region = sae, region


def feature_edit(sae, features, op: str = "inject", strength: float = 1.0, **kw) -> FeatureEdit:
    """One-line form: ``feature_edit("runs/sae/x", 12, "spatial", 4, region={"quadrant": "top left"}, when="early")``."""
    return FeatureEdit(sae=sae, features=features, op=op, strength=strength, **kw)
