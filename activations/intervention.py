"""The Intervention protocol: every read and every write of the U-Net is one object.

An intervention says

* **where**: ``site``, a block site (``mid_block.attentions.0``) or a head site (``...attn2``);
* **at which stage**: one of ``STAGES`` below, each with a fixed tensor layout;
* **when**: ``when``, a timestep gate (``activations.timesteps``: ``early``, ``{tau: [..]}``,
  ``{steps: [..]}``, ...) and ``branch`` (``cond``, ``uncond``, ``both``);
* **on which patches**: ``mask``, an optional spatial mask (``activations.masks``), resolved
  against the grid of each call;
* **what**: ``apply(x, call) -> x``. An observer (``observes = True``) returns nothing and sees the
  value ``before`` or ``after`` the edits of its stage (``sees``).

The attention processor and the block hooks (``activations.hooks``) run, at every stage of every
call: the observers that see ``before``, then the edits in the order they were attached, then the
observers that see ``after``. An edit's result is kept only on its branch's batch rows and its
mask's patches, so ``apply`` may compute on the whole tensor; the dispatch has no per-kind code.

A new kind is one class in one file::

    @register_intervention("clamp")
    @dataclasses.dataclass(kw_only=True)
    class Clamp(Intervention):
        stage: str = "block"
        max: float = 1.0

        def apply(self, x, call):
            return x.clamp(max=self.max)

Attaching goes through one step, ``resolve(model, prompts) -> [interventions]`` (``resolve_all``
for many, run by ``activations.hooks`` whatever the caller: ``intervene``, ``steering.steer``, the
analyses): a plain kind checks itself against the model (``check``) and stands for itself; a kind
that spans sites expands into plain ones (``steering.base.Composite``). A bad intervention is
refused there, before any image is drawn.

Kinds serialise to and from plain dicts (``to_dict`` / ``from_dict``) and so to YAML recipes
(``save_interventions`` / ``load_interventions``). Kinds defined in other packages (an SAE splice,
steering edits) register themselves on import or through the entry-point group
``diffatlas.interventions``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from einops import rearrange

from activations.masks import mask_spec, parse_mask
from activations.timesteps import All, Branch, gate_spec, parse_branch, parse_when
from common.errors import UsageError

# stage -> einops layout of the value an intervention sees there ("n" = H*W patches, "t" = tokens)
STAGES: dict[str, str] = {
    "q": "b h n d",  # queries of each head
    "k": "b h t d",  # keys of each head (of the text tokens)
    "v": "b h t d",  # values of each head
    "probs": "b h n t",  # attention probabilities softmax(q kᵀ · scale)
    "heads": "b h n d",  # per-head outputs probs @ v, before the heads are merged and to_out
    "attn_out": "b n c",  # the attention module's output after to_out
    "block": "b n c",  # a block site's residual update Δ = output − input
}
HEAD_STAGES = ("q", "k", "v", "probs", "heads", "attn_out")
# the attribute of Call that holds each stage's value
STAGE_ATTR = {"q": "q", "k": "k", "v": "v", "probs": "probs", "heads": "out", "attn_out": "attn_out", "block": "delta"}
BLOCK_STAGES = ("block",)
SEES = ("before", "after")


# --------------------------------------------------------------------------------------------
# the call context


@dataclasses.dataclass
class Call:
    """What an intervention sees of one call of one site at one stage (tensors are not copies).

    The same context serves block and head sites: the step, t and tau of the denoising step, the
    batch rows of each guidance branch (``rows``), the site's grid (H, W) and the image index of
    each batch row. At head sites the values computed so far are attached (q, k, v, probs, out),
    and ``module`` is the diffusers ``Attention`` (whose ``to_k`` / ``to_v`` project other
    prompts, see ``project``); at block sites ``module`` is the ``Transformer2DModel``.
    """

    site: str
    stage: str
    state: Any  # activations.hooks.RunState
    codes: torch.Tensor  # [b] branch code per batch row (0 uncond, 1 cond)
    grid: tuple[int, int]
    module: Any = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    out: torch.Tensor | None = None  # per-head outputs [b, heads, N, d]
    delta: torch.Tensor | None = None  # a block's Δ [b, N, C]
    attn_out: torch.Tensor | None = None  # the attention module's output [b, N, C]

    @property
    def value(self) -> torch.Tensor:
        """The value of the current stage (what ``apply`` receives as x)."""
        return getattr(self, STAGE_ATTR[self.stage])

    @property
    def step(self) -> int | None:
        return self.state.step

    @property
    def t(self) -> int | None:
        return self.state.t

    @property
    def tau(self) -> float | None:
        return self.state.tau

    @property
    def images(self) -> torch.Tensor:
        """The image index of each batch row [b] (both branches of an image share its index)."""
        return self.state.image_indices(len(self.codes), self.codes.device)

    def rows(self, branch: str | Branch = "both") -> torch.Tensor | None:
        """Batch rows of ``branch``; None means every row."""
        return parse_branch(branch).rows(self.codes)

    @property
    def attn(self):
        return self.module

    def project(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[b', heads, T', d]`` of other text embeddings through this module."""
        return project_kv(self.module, encoder_hidden_states)


def project_kv(attn, ehs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ehs.ndim == 2:
        ehs = ehs[None]
    if attn.norm_cross:
        ehs = attn.norm_encoder_hidden_states(ehs)
    k = rearrange(attn.to_k(ehs), "b t (h d) -> b h t d", h=attn.heads)
    v = rearrange(attn.to_v(ehs), "b t (h d) -> b h t d", h=attn.heads)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k, v


# --------------------------------------------------------------------------------------------
# the protocol


_REGISTRY: dict[str, type["Intervention"]] = {}
ENTRY_POINT_GROUP = "diffatlas.interventions"


def register_intervention(kind: str):
    """Class decorator: make ``cls`` loadable from recipes as ``kind``."""

    def decorate(cls):
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"intervention kind {kind!r} is already registered by {_REGISTRY[kind].__qualname__}")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorate


def intervention_kinds() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def _load_entry_points() -> None:
    # the built-in kinds (activations.edits) register through the same entry points as others'
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            ep.load()


def intervention_class(kind: str) -> type["Intervention"]:
    if kind not in _REGISTRY:
        _load_entry_points()
    if kind not in _REGISTRY:
        close = difflib.get_close_matches(str(kind), list(_REGISTRY), n=2)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UsageError(f"unknown intervention kind {kind!r}{hint}; valid kinds: {', '.join(sorted(_REGISTRY))} "
                         f"(kinds register on import or through the entry-point group {ENTRY_POINT_GROUP!r})")
    return _REGISTRY[kind]


@dataclasses.dataclass(kw_only=True, eq=False)
class Intervention:
    """Base of every intervention; see the module doc. Subclasses set ``stage`` (a field, so that
    generic kinds can act at any stage) and implement ``apply``."""

    kind: ClassVar[str] = ""
    observes: ClassVar[bool] = False
    stages: ClassVar[tuple[str, ...]] = tuple(STAGES)  # the stages this kind can act at

    site: str | None = None
    """where: a block or head site name (see ``diffatlas sites <model>``)"""
    stage: str = "block"
    """at which stage: q, k, v, probs, heads, attn_out (head sites) or block (block sites)"""
    when: Any = None
    """timestep gate: all, early / middle / late, {tau: [lo, hi]}, {steps: [..]}, {every: N}, {t: [..]}"""
    branch: Any = "both"
    """guidance branch: cond, uncond or both"""
    mask: Any = None
    """patches: {patches: [..]}, {box: [top, left, bottom, right]}, {quadrant: ..}, {image: path}, or none"""
    sees: str = "after"
    """observers only: the value before or after the edits of its stage"""

    def __post_init__(self):
        if self.stage not in STAGES:
            raise UsageError(f"unknown stage {self.stage!r}; valid stages: {', '.join(STAGES)}")
        if self.stage not in self.stages:
            raise UsageError(f"{type(self).__name__} cannot act at stage {self.stage!r}; valid: {', '.join(self.stages)}")
        self.when = parse_when(self.when)
        self.branch = parse_branch(self.branch)
        if isinstance(self.mask, (list, tuple, np.ndarray, torch.Tensor)):
            from activations.masks import Patches

            self.mask = Patches(self.mask)
        self.mask = parse_mask(self.mask)
        if self.mask is not None and self.stage in ("k", "v"):
            raise UsageError(f"stage {self.stage!r} has no patches (its axis is the text tokens); drop the mask")
        if self.sees not in SEES:
            raise UsageError(f"sees must be 'before' or 'after', got {self.sees!r}")

    # -- what subclasses implement -------------------------------------------------------------
    def apply(self, x: torch.Tensor, call: Call) -> torch.Tensor | None:
        raise NotImplementedError

    @property
    def needs(self) -> frozenset[str]:
        """Values the processor must compute for this intervention (``probs`` forces the explicit
        attention path; everything else exists on diffusers' fused path anyway)."""
        return frozenset({self.stage})

    # -- attaching ----------------------------------------------------------------------------
    def check(self, model) -> None:
        """Refuse a model this intervention cannot act on (a ValueError naming what differs, e.g. an
        SAE of another width), before anything runs. ``model``: the pipeline, or a bare U-Net."""

    def resolve(self, model, prompts: Sequence[str] | None = None) -> list["Intervention"]:
        """The plain per-site interventions that stand for this one on ``model``, checked against
        it: the one step between creating an intervention and attaching it (``resolve_all``, which
        every attaching path calls). A plain kind checks itself and stands for itself; a kind that
        spans sites expands (``steering.base.Composite``). ``prompts``: the prompts of the coming
        generations, one per image, for kinds that find a word in them."""
        self.check(model)
        return [self]

    # -- gating -------------------------------------------------------------------------------
    def active(self, state) -> bool:
        if isinstance(self.when, All):
            return True
        return self.when.contains(state.step, state.t, state.num_train_timesteps)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if not self.kind:
            raise ValueError(f"{type(self).__name__} is not registered (@register_intervention) and cannot be written to a recipe")
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "when":
                value = gate_spec(value)
            elif f.name == "branch":
                value = value.name
            elif f.name == "mask":
                value = mask_spec(value)
            elif f.name == "sees" and not self.observes:
                continue
            out[f.name] = _plain(value, f"{self.kind}.{f.name}")
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Intervention":
        data = dict(data)
        if "kind" not in data:
            raise UsageError(f"an intervention needs a 'kind'; got fields {sorted(data)}; valid kinds: {', '.join(intervention_kinds())}")
        cls = intervention_class(data.pop("kind"))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UsageError(f"unknown field(s) {sorted(unknown)} for intervention kind {cls.kind!r}; valid fields: {', '.join(sorted(names))}")
        return cls(**data)


def resolve_all(model, interventions: Iterable[Intervention], prompts: Sequence[str] | None = None) -> list[Intervention]:
    """Every intervention resolved against ``model`` (``Intervention.resolve``), in order: what
    ``activations.hooks`` attaches, so ``intervene`` and ``steering.steer`` accept and refuse the
    same things, before any image is drawn."""
    prompts = list(prompts) if prompts is not None else None
    out: list[Intervention] = []
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"interventions are Intervention objects (activations.intervention), got {type(iv).__name__}")
        out.extend(iv.resolve(model, prompts))
    return out


def _plain(value: Any, where: str) -> Any:
    """A YAML-safe copy of a field value (tensors and arrays become lists)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, where) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if callable(value):
        raise ValueError(f"{where} is a Python function and cannot be written to a recipe")
    return value


def save_interventions(path: str | Path, interventions: list[Intervention]) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"interventions": [iv.to_dict() for iv in interventions]}, sort_keys=False))
    return path


def load_interventions(source: str | Path | list | dict) -> list[Intervention]:
    """Interventions from a YAML file, a list of dicts, or a dict with an ``interventions`` list."""
    if isinstance(source, (str, Path)):
        import yaml

        source = yaml.safe_load(Path(source).read_text()) or {}
    if isinstance(source, dict):
        source = source.get("interventions", [])
    return [iv if isinstance(iv, Intervention) else Intervention.from_dict(iv) for iv in source]


# --------------------------------------------------------------------------------------------
# dispatch: one function for every stage of every site


def _selection(iv: Intervention, call: Call, x: torch.Tensor) -> torch.Tensor | None:
    """Bool mask broadcastable to ``x`` of the rows (branch) and patches (mask) ``iv`` edits;
    None when it edits everything."""
    rows = None if iv.branch.name == "both" else iv.branch.row_mask(call.codes)
    patches = None
    if iv.mask is not None:
        patches = iv.mask.on_grid(*call.grid).to(x.device)
        if patches.numel() != _patch_count(call.stage, x):
            raise UsageError(f"mask of {patches.numel()} patches does not fit site {call.site} with {_patch_count(call.stage, x)}")
    if rows is None and patches is None:
        return None
    layout = STAGES[call.stage].split()
    shape = [1] * x.ndim
    sel = torch.ones(1, dtype=torch.bool, device=x.device)
    if rows is not None:
        shape_r = list(shape)
        shape_r[0] = x.shape[0]
        sel = sel & rows.reshape(shape_r)
    if patches is not None:
        shape_p = list(shape)
        shape_p[layout.index("n")] = patches.numel()
        sel = sel & patches.reshape(shape_p)
    return sel


def _patch_count(stage: str, x: torch.Tensor) -> int:
    return x.shape[STAGES[stage].split().index("n")]


def run_stage(interventions: list[Intervention], x: torch.Tensor, call: Call) -> torch.Tensor:
    """Observers that see ``before``, the edits in order, observers that see ``after``; the call's
    attribute of this stage (``call.value``) holds the value each of them sees."""
    attr = STAGE_ATTR[call.stage]
    setattr(call, attr, x)
    for iv in interventions:
        if iv.observes and iv.sees == "before":
            iv.apply(x, call)
    for iv in interventions:
        if iv.observes:
            continue
        y = iv.apply(x, call)
        if y is None or y is x:
            continue
        if y.shape != x.shape:
            raise ValueError(f"{type(iv).__name__} at {call.site} ({call.stage}) returned shape {list(y.shape)}, expected {list(x.shape)}")
        sel = _selection(iv, call, x)
        x = y.to(x.dtype) if sel is None else torch.where(sel, y.to(x.dtype), x)
    setattr(call, attr, x)
    for iv in interventions:
        if iv.observes and iv.sees == "after":
            iv.apply(x, call)
    return x
