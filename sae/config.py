"""The SAE's own configuration: what is saved as ``cfg.json`` beside ``sae.safetensors``.

Field docstrings are the ``--help`` text of ``diffatlas train`` (jsonargparse reads attribute
docstrings). The first block of fields mirrors EleutherAI sparsify's ``SparseCoderConfig`` so that
a TopK SAE saved here loads there (sparsify drops the fields it does not know); the rest are ours.
Training-only settings (learning rate, schedules, initialisation) live on ``LitSAE``.
"""

from __future__ import annotations

import dataclasses
import math
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
    def from_dict(cls, data: dict[str, Any], source: str = "cfg.json") -> tuple["SparseCoderConfig", int]:
        """Inverse of to_dict, for a saved SAE (``source`` names its file in errors). Returns (cfg, d_in).

        What decides the SAE's outputs must be in the file, never defaulted: d_in, num_latents
        (0 with expansion_factor, as sparsify writes it), k for topk and batchtopk, and the
        architecture (sparsify's files name none: their ``activation: topk`` says it). Every known
        field must have its type. Unknown keys (another library's) are ignored; training settings
        a file lacks (sparsify's name none of ours) keep their defaults, as they change nothing a
        loaded SAE computes. Errors are UsageErrors naming the file and the field.
        """
        data = dict(data)
        ours = {"l1_coefficient", "threshold_momentum", "normalizer_folded"}  # keys only diffatlas writes
        if "architecture" not in data and data.get("activation") == "topk" and not ours & set(data):
            data["architecture"] = "topk"  # sparsify's file: TopK is its only mechanism that matches ours
        required = ["architecture", "d_in", "num_latents"]
        if data.get("architecture") in ("topk", "batchtopk"):
            required.append("k")
        if data.get("num_latents") == 0:
            required.append("expansion_factor")
        types = {f.name: f.type for f in dataclasses.fields(cls)} | {"d_in": "int"}
        for name in required:
            if name not in data:
                raise UsageError(f"{source} has no field {name!r} ({_REQUIRED_WHY[name]}); a missing field is not "
                                 f"defaulted: add it with the value the SAE was trained with")
        for name, kind in types.items():
            if name in data and not _has_type(data[name], kind):
                raise UsageError(f"{source}: field {name!r} is {data[name]!r}, not a{'n' if kind == 'int' else ''} {kind}")
        d_in = data.pop("d_in")
        cfg = cls(**{k: v for k, v in data.items() if k in types})
        try:
            cfg.validate(d_in)
        except ValueError as err:
            raise UsageError(f"{source}: {err}") from None
        return cfg, d_in


_REQUIRED_WHY = {
    "architecture": "relu, topk, batchtopk or jumprelu",
    "d_in": "the SAE's input width",
    "num_latents": "the dictionary size",
    "k": "active latents per token",
    "expansion_factor": "latents per input dimension, as num_latents is 0",
}


def _has_type(value: Any, kind: str) -> bool:
    """Whether a JSON value fits a field annotated ``kind`` (bool is not a number here; a float
    field takes an int, and must be finite)."""
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str)
    raise TypeError(f"no JSON type check for a field annotated {kind!r}")  # a new field type: add it here


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
    def from_dict(cls, data: dict[str, Any], source: str = "cfg.json") -> "Placement":
        """The placement saved in ``data`` (fields it lacks: unknown, None); a field of the wrong
        type, an unknown stage or a bad window is a UsageError naming ``source``."""
        from activations.timesteps import parse_when

        placed = cls(**{k: data[k] for k in cls.KEYS if k in data})
        for name in ("site", "branch", "model", "model_revision"):
            value = getattr(placed, name)
            if value is not None and not isinstance(value, str):
                raise UsageError(f"{source}: field {name!r} is {value!r}, not a string (or null)")
        if placed.stage not in ("block", "heads"):
            raise UsageError(f"{source}: field 'stage' is {placed.stage!r}; valid: block, heads")
        if not _has_type(placed.normalizer_folded, "float") or placed.normalizer_folded <= 0:
            raise UsageError(f"{source}: field 'normalizer_folded' is {placed.normalizer_folded!r}, not a positive number")
        try:
            parse_when(placed.window)
        except ValueError as err:
            raise UsageError(f"{source}: field 'window': {err}") from None
        return placed

    @property
    def folder_name(self) -> str:
        """``<site>[__<window>][__<branch>]``: the SAE's folder under a run's save_dir and its W&B
        namespace when a run trains several (a name for people: loading finds an SAE by the
        placement in its cfg.json, see ``SAE.from_pretrained``)."""
        name = self.site or "sae"
        if self.window is not None:
            name += f"__{self.window_label}"
        return name if self.branch is None else f"{name}__{self.branch}"

    @property
    def window_label(self) -> str:
        """The window as a short name (``early``, ``tau0.6-1``, ``all``)."""
        from activations.timesteps import Window, parse_when

        gate = parse_when(self.window)
        return gate.label if isinstance(gate, Window) else str(gate)
