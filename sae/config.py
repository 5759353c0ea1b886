"""The SAE's own configuration: what is saved as ``cfg.json`` beside ``sae.safetensors``.

Field docstrings are the ``--help`` text of ``diffatlas train`` (jsonargparse reads attribute
docstrings). The first block of fields mirrors EleutherAI sparsify's ``SparseCoderConfig`` so that
a TopK SAE saved here loads there (sparsify drops the fields it does not know); the rest are ours.
Training-only settings (learning rate, schedules, initialisation) live on ``LitSAE``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from common.errors import UsageError


@dataclass
class SparseCoderConfig:
    """Shape and sparsity mechanism of one sparse autoencoder."""

    architecture: str = "topk"
    """Registered architecture: relu (L1 penalty), topk, batchtopk or jumprelu (see sae.registry)."""

    num_latents: int = 0
    """Dictionary size. 0 means d_in * expansion_factor."""

    expansion_factor: int = 8
    """Latents per input dimension, used when num_latents is 0."""

    k: int = 32
    """Active latents per token: exact for topk, the batch average for batchtopk (Gao et al. 2024;
    Bussmann et al. 2024). Ignored by relu and jumprelu."""

    normalize_decoder: bool = True
    """Keep decoder rows at unit norm, removing the gradient component parallel to each row before
    every optimiser step (Bricken et al. 2023)."""

    auxk_coefficient: float = 1.0 / 32.0
    """Weight of the AuxK loss that makes dead latents predict the residual (Gao et al. 2024, App. B.1:
    1/32). 0 disables it. Used by topk and batchtopk."""

    k_aux: int = 0
    """Dead latents used by AuxK per token. 0 means d_in // 2 (Gao et al. 2024)."""

    dead_tokens_threshold: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead (Gao et al. 2024 use
    10M tokens). Feeds AuxK and the dead fraction."""

    l1_coefficient: float = 5.0
    """relu: weight of the sparsity penalty sum_i f_i * ||W_dec,i|| on activations normalised to
    E||x||^2 = d_in (Anthropic's April 2024 update of Bricken et al. 2023 uses ~5)."""

    l1_warmup_fraction: float = 0.05
    """relu: the L1 coefficient ramps linearly from 0 over this fraction of training (Anthropic,
    April 2024 update)."""

    l0_coefficient: float = 1.0
    """jumprelu: weight of the L0 penalty, trained through the straight-through estimator of
    Rajamanoharan et al. 2024."""

    jumprelu_threshold_init: float = 0.001
    """jumprelu: initial per-latent threshold (Rajamanoharan et al. 2024)."""

    jumprelu_bandwidth: float = 0.001
    """jumprelu: kernel bandwidth epsilon of the straight-through pseudo-derivative
    (Rajamanoharan et al. 2024)."""

    threshold_momentum: float = 0.99
    """batchtopk: the inference threshold is an exponential moving average of the smallest selected
    activation per training batch (Bussmann et al. 2024 average it over batches)."""

    # Fields sparsify writes and reads; fixed here so its loader builds the same module.
    activation: str = "topk"
    """Written for sparsify's loader; always 'topk' (sparsify has no other matching mechanism)."""

    multi_topk: bool = False
    """Written for sparsify's loader; Multi-TopK is not implemented here and must stay false."""

    skip_connection: bool = False
    """Written for sparsify's loader; skip connections are not implemented here and must stay false."""

    transcode: bool = False
    """Written for sparsify's loader; transcoders are not implemented here and must stay false."""

    def resolved_num_latents(self, d_in: int) -> int:
        return self.num_latents or d_in * self.expansion_factor

    def resolved_k_aux(self, d_in: int) -> int:
        return self.k_aux or max(1, d_in // 2)

    def validate(self, d_in: int) -> None:
        """Raise ValueError naming the bad field, its value and what would be valid (the
        architecture name is checked by the registry when its class is looked up)."""
        if d_in <= 0:
            raise UsageError(f"d_in must be positive, got {d_in}")
        m = self.resolved_num_latents(d_in)
        if m <= 0:
            raise UsageError(f"num_latents must be positive, got {m} (num_latents={self.num_latents}, "
                             f"expansion_factor={self.expansion_factor})")
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= m:
            raise UsageError(f"k must be in [1, num_latents={m}] for {self.architecture}, got {self.k}")
        for name in ("multi_topk", "skip_connection", "transcode"):
            if getattr(self, name):
                raise UsageError(f"{name}=True is not supported by diffatlas SAEs; valid: False")

    def to_dict(self, d_in: int) -> dict[str, Any]:
        """The cfg.json payload: our fields plus d_in, num_latents resolved."""
        out = dataclasses.asdict(self)
        out["num_latents"] = self.resolved_num_latents(d_in)
        out["d_in"] = d_in
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> tuple["SparseCoderConfig", int]:
        """Inverse of to_dict; unknown keys (e.g. another library's) are ignored. Returns (cfg, d_in)."""
        data = dict(data)
        if "d_in" not in data:
            raise UsageError(f"cfg.json has no d_in (the SAE's input width); its keys: {', '.join(sorted(data))}")
        d_in = int(data.pop("d_in"))
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        return cfg, d_in


@dataclass
class Placement:
    """Where an SAE belongs: the site and stage it reads, the timesteps and branch it was trained
    on, the model and the normaliser folded into its weights. Saved in cfg.json beside the
    architecture (as SAELens' SAEs carry their hook), restored by ``SAE.from_pretrained``."""

    site: str | None = None
    """the site it was trained on (a block site or an attn2 head site), None if unknown"""
    stage: str = "block"
    """the value it reads: block (a block's Δ) or heads (a head site's per-head outputs, heads concatenated)"""
    window: Any = None
    """the timestep gate of its training rows (all, early, {tau: [lo, hi]}, ...); None = every step"""
    branch: str | None = None
    """the guidance branch of its training rows (cond / uncond); None = every stored row"""
    model: str | None = None
    """the model id of the harvest it was trained on"""
    model_revision: str | None = None
    """the weights fingerprint recorded by the harvest (tells retrained weights apart)"""
    normalizer_folded: float = 1.0
    """the input scale folded into the weights (the SAE takes raw activations)"""

    KEYS = ("site", "stage", "window", "branch", "model", "model_revision", "normalizer_folded")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Placement":
        return cls(**{k: data[k] for k in cls.KEYS if k in data})

    @property
    def window_label(self) -> str:
        """The window as a short name (``early``, ``tau0.6-1``, ``all``)."""
        from activations.timesteps import Window, parse_when

        gate = parse_when(self.window)
        return gate.label if isinstance(gate, Window) else str(gate)
