"""The built-in intervention kinds (the protocol is in ``activations.intervention``).

Edits of head sites:
  ``HeadEdit``  multiply / replace / transform attention probabilities (``stage="probs"``: heads ×
                tokens, patches through the mask) or per-head outputs (``stage="heads"``); the
                probabilities are not renormalised, as in the HRV paper's weakening by −2
                (Park et al., ICLR 2025, Section 4);
  ``SwapKV``    the chosen heads attend to another prompt's keys and values on the masked patches
                ("unicorn" into a horse's head; Patch Explorer, Grabe et al. 2025);
  ``AddVector`` add a vector to per-head outputs (``heads`` given) or to the module output.
Edits of any stage:
  ``Scale``     multiply the value (optionally only some heads at head stages);
  ``Ablate``    replace the value by zeros or by a given mean;
  ``Apply``     any Python function ``fn(x, call) -> x`` (not writable to a recipe).
Observers:
  ``Observe``   call ``fn(call)`` (or ``fn(x, call)``) with the value before or after the edits.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from activations.intervention import HEAD_STAGES, STAGES, Call, Intervention, register_intervention
from common.errors import UsageError


def index_mask(sel, n: int, device, what: str) -> torch.Tensor:
    """bool [n] from None (all), a list of indices or a bool mask; an index outside 0..n-1 (or
    -n..-1) or a mask of another length is a UsageError naming the valid range. The one check of
    head and token selections: ``activations.hooks`` calls it when attaching, ``apply`` when running."""
    if sel is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    t = torch.as_tensor(sel, device=device)
    if t.dtype == torch.bool:
        t = t.reshape(-1)
        if t.numel() != n:
            raise UsageError(f"{what} mask has {t.numel()} elements, expected {n}")
        return t
    if t.is_floating_point() or t.is_complex():
        raise UsageError(f"{what} indices must be integers, got {sel!r}")
    t = t.reshape(-1).long()
    if len(t) and (t.min() < -n or t.max() >= n):
        bad = [int(i) for i in t.tolist() if not -n <= i < n]
        raise UsageError(f"{what} index {bad[0]} out of range for {n} {what}s (valid: 0..{n - 1})")
    m = torch.zeros(n, dtype=torch.bool, device=device)
    m[t] = True
    return m


def _head_token_mask(x: torch.Tensor, stage: str, heads, tokens) -> torch.Tensor | None:
    """Broadcastable bool mask over the heads (and, for probs, tokens) axes; None = everything."""
    if heads is None and tokens is None:
        return None
    layout = STAGES[stage].split()
    shape = [1] * x.ndim
    m = torch.ones(1, dtype=torch.bool, device=x.device)
    if heads is not None:
        if "h" not in layout:
            raise ValueError(f"stage {stage!r} has no heads axis; drop heads")
        s = list(shape)
        s[layout.index("h")] = x.shape[layout.index("h")]
        m = m & index_mask(heads, x.shape[layout.index("h")], x.device, "head").reshape(s)
    if tokens is not None:
        if "t" not in layout:
            raise ValueError(f"stage {stage!r} has no token axis; drop tokens")
        s = list(shape)
        s[layout.index("t")] = x.shape[layout.index("t")]
        m = m & index_mask(tokens, x.shape[layout.index("t")], x.device, "token").reshape(s)
    return m


@register_intervention("head_edit")
@dataclasses.dataclass(kw_only=True, eq=False)
class HeadEdit(Intervention):
    """Multiply (``scale``), replace (``value``) or transform (``fn``) the attention probabilities
    (``stage="probs"``: heads × patches × tokens) or per-head outputs (``stage="heads"``).

    heads: module-local head indices (None = all); tokens: token indices (probs only); scale may be
    a number or a tensor broadcastable to the value (e.g. one factor per head as [1, h, 1, 1]).
    """

    stages = ("probs", "heads")
    stage: str = "probs"
    heads: Any = None
    tokens: Any = None
    scale: Any = None
    value: Any = None
    fn: Callable | None = None

    def __post_init__(self):
        if self.stage == "out":  # the old name of per-head outputs
            self.stage = "heads"
        super().__post_init__()
        if sum(x is not None for x in (self.scale, self.value, self.fn)) != 1:
            raise ValueError("HeadEdit needs exactly one of scale, value or fn")
        if self.stage == "heads" and self.tokens is not None:
            raise ValueError("HeadEdit(stage='heads') acts on heads x patches; tokens must be None")

    def check(self, model) -> None:
        # the probs' token axis is the pipeline's text (activations.text.text_length: a U-Net's
        # padded prompt, an MMDiT's joint text); a bare denoiser has no tokenizer, and then the first
        # call checks the tokens (the heads are checked on attaching)
        from activations.text import text_length

        length = text_length(model) if self.tokens is not None and getattr(model, "tokenizer", None) is not None else None
        if length is not None:
            try:
                index_mask(self.tokens, length, "cpu", "token")
            except UsageError as err:
                raise UsageError(f"HeadEdit at {self.site}: {err}") from None

    def apply(self, x, call):
        if self.fn is not None:
            y = self.fn(x, call)
        elif self.scale is not None:
            y = x * torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
        else:
            y = torch.as_tensor(self.value, dtype=x.dtype, device=x.device).expand_as(x)
        sel = _head_token_mask(x, self.stage, self.heads, self.tokens)
        return y if sel is None else torch.where(sel, y, x)


def check_swap(model, what: str, recorded: bool = False) -> None:
    """Refuse a swap of keys and values (``SwapKV``) that the model's head processor cannot run:
    text embeddings to project on a family with joint attention (its text keys come from a stream
    that every block changes: give the other prompt's recorded ``text_kv``), or recorded text
    keys and values on a family with cross-attention (give ``encoder_hidden_states``)."""
    from activations.families import ARCHITECTURES, architecture_of

    arch = architecture_of(model)
    wanted = "joint" if recorded else "cross"
    if arch.processor != wanted:
        valid = ", ".join(f for a in ARCHITECTURES.values() if a.processor == wanted for f in a.families)
        given = "recorded text keys and values (text_kv)" if recorded else "text embeddings to project (encoder_hidden_states)"
        raise UsageError(f"{what}: {given} cannot be read on {arch.name} models ({arch.attention}); valid families: {valid} "
                         "(steering.EncodePrompt gives each family what it reads)")


@register_intervention("swap_kv")
@dataclasses.dataclass(kw_only=True, eq=False)
class SwapKV(Intervention):
    """Chosen heads attend to another prompt, on the masked patches.

    Cross-attention (U-Nets): the other prompt's text embeddings (``encoder_hidden_states`` [T', C]
    or [1|b, T', C]) through this module's own key/value projections. Joint attention (MMDiTs):
    the other prompt's text keys and values as this module computed them at each step
    (``text_kv``, recorded by ``steering.EncodePrompt``), in place of this prompt's; the image
    queries still attend to the image tokens too, as the joint softmax does.
    """

    stages = ("heads",)
    stage: str = "heads"
    encoder_hidden_states: Any = None
    text_kv: Any = None
    """joint attention: (keys, values) of the other prompt's text at this site, each
    [steps, len(heads), T', d] (all heads when ``heads`` is None)"""
    taus: Any = None
    """joint attention: τ of each recorded step; a generation at another τ is refused"""
    heads: Any = None

    def __post_init__(self):
        super().__post_init__()
        if (self.encoder_hidden_states is None) == (self.text_kv is None):
            raise ValueError("SwapKV needs one of encoder_hidden_states (text embeddings to project) "
                             "or text_kv (recorded text keys and values, with taus)")
        if self.encoder_hidden_states is not None:
            self.encoder_hidden_states = torch.as_tensor(self.encoder_hidden_states)
        else:
            self.text_kv = tuple(torch.as_tensor(t) for t in self.text_kv)
            if len(self.text_kv) != 2 or self.taus is None or len(self.taus) != self.text_kv[0].shape[0]:
                raise ValueError("SwapKV's text_kv is (keys, values), each [steps, heads, T', d], with one tau per step")
            self.taus = [float(t) for t in self.taus]

    def check(self, model) -> None:
        check_swap(model, f"{type(self).__name__} at {self.site}", recorded=self.text_kv is not None)

    def apply(self, x, call):
        if self.text_kv is not None:
            return self._apply_recorded(x, call)
        k2, v2 = call.project(self.encoder_hidden_states.to(device=x.device, dtype=call.q.dtype))
        if k2.shape[0] == 1 and x.shape[0] > 1:
            k2, v2 = k2.expand(x.shape[0], -1, -1, -1), v2.expand(x.shape[0], -1, -1, -1)
        alt = F.scaled_dot_product_attention(call.q, k2, v2).to(x.dtype)
        sel = _head_token_mask(x, "heads", self.heads, None)
        return alt if sel is None else torch.where(sel, alt, x)

    def _apply_recorded(self, x_bhNd, call):
        step = call.step
        if step is None or step >= len(self.taus) or abs(float(call.tau) - self.taus[step]) > 1e-4:
            at = "no step" if step is None else f"step {step} (tau {float(call.tau):.4f})"
            raise UsageError(f"SwapKV at {call.site}: the other prompt was recorded at {len(self.taus)} steps "
                             f"(tau {self.taus[0]:.3f}..{self.taus[-1]:.3f}); this generation is at {at}: "
                             "draw with the steps (and the image size) the edit was recorded at")
        heads = list(range(x_bhNd.shape[1])) if self.heads is None else [int(h) for h in self.heads]
        b = x_bhNd.shape[0]
        k_bhTd, v_bhTd = (t[step].to(device=x_bhNd.device, dtype=call.q.dtype).expand(b, -1, -1, -1) for t in self.text_kv)
        # the joint softmax over the other prompt's text keys and this image's own keys (order is irrelevant)
        k = torch.cat([k_bhTd, call.k_image[:, heads]], dim=2)
        v = torch.cat([v_bhTd, call.v_image[:, heads]], dim=2)
        out = x_bhNd.clone()
        out[:, heads] = F.scaled_dot_product_attention(call.q[:, heads], k, v).to(x_bhNd.dtype)
        return out


@register_intervention("add_vector")
@dataclasses.dataclass(kw_only=True, eq=False)
class AddVector(Intervention):
    """Add ``scale * vector``: to per-head outputs (``stage="heads"``, vector [d] or
    [len(heads), d]) or to a [b, N, C] value (``attn_out`` or ``block``, vector [C])."""

    stages = ("heads", "attn_out", "block")
    stage: str = "attn_out"
    vector: Any = None
    heads: Any = None
    scale: float = 1.0

    def __post_init__(self):
        if self.heads is not None and self.stage == "attn_out":
            self.stage = "heads"
        super().__post_init__()
        if self.vector is None:
            raise ValueError("AddVector needs a vector")
        self.vector = torch.as_tensor(self.vector)

    def apply(self, x, call):
        vec = self.vector.to(device=x.device, dtype=x.dtype)
        if self.stage != "heads":
            return x + self.scale * vec.reshape(1, 1, -1)
        _, nh, _, d = x.shape
        hm = index_mask(self.heads, nh, x.device, "head")
        full = torch.zeros(nh, d, dtype=x.dtype, device=x.device)
        full[hm] = vec.reshape(-1, d).expand(int(hm.sum()), d) if vec.numel() == d else vec.reshape(-1, d)
        return x + self.scale * full[None, :, None, :]


@register_intervention("scale")
@dataclasses.dataclass(kw_only=True, eq=False)
class Scale(Intervention):
    """Multiply the value by ``factor`` (at head stages optionally only ``heads``)."""

    factor: float = 1.0
    heads: Any = None

    def apply(self, x, call):
        y = x * self.factor
        sel = _head_token_mask(x, self.stage, self.heads, None) if self.stage in HEAD_STAGES and self.heads is not None else None
        return y if sel is None else torch.where(sel, y, x)


@register_intervention("ablate")
@dataclasses.dataclass(kw_only=True, eq=False)
class Ablate(Intervention):
    """Replace the value by zeros (``value=None``) or by ``value`` (e.g. its mean over the data,
    broadcast over the batch and patches: mean ablation)."""

    value: Any = None

    def __post_init__(self):
        super().__post_init__()
        if self.value is not None:
            self.value = torch.as_tensor(self.value)

    def apply(self, x, call):
        if self.value is None:
            return torch.zeros_like(x)
        return self.value.to(device=x.device, dtype=x.dtype).expand_as(x)


@register_intervention("apply")
@dataclasses.dataclass(kw_only=True, eq=False)
class Apply(Intervention):
    """Any function ``fn(x, call) -> x`` (or ``fn(x) -> x``) at any stage (Python only)."""

    fn: Callable | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.fn is None:
            raise ValueError("Apply needs fn(x, call) -> x")
        self._two = _takes_call(self.fn)

    def apply(self, x, call):
        return self.fn(x, call) if self._two else self.fn(x)


@register_intervention("observe")
@dataclasses.dataclass(kw_only=True, eq=False)
class Observe(Intervention):
    """Call ``fn(call)`` (the value is ``call.delta`` / ``call.out`` / ``call.probs`` ...) or
    ``fn(x, call)``; ``needs`` lists head values it reads besides its stage's (e.g. ``probs``)."""

    observes = True
    fn: Callable | None = None
    extra_needs: frozenset = frozenset()

    def __post_init__(self):
        super().__post_init__()
        if self.fn is None:
            raise ValueError("Observe needs fn(call) or fn(x, call)")
        bad = set(self.extra_needs) - set(STAGES)
        if bad:
            raise ValueError(f"unknown needs {sorted(bad)}; valid: {', '.join(STAGES)}")
        self._two = _takes_call(self.fn)

    @property
    def needs(self):
        return frozenset({self.stage}) | frozenset(self.extra_needs)

    def apply(self, x, call: Call):
        if self._two:
            self.fn(x, call)
        else:
            self.fn(call)


def _takes_call(fn) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return True
    return len(params) >= 2


__all__ = ["Ablate", "AddVector", "Apply", "HeadEdit", "Observe", "Observer", "Scale", "SwapKV"]


def Observer(fn, needs=frozenset({"out"}), steps=None, sees: str = "after") -> Observe:
    """An observer of a head site's per-head values ``fn(call)`` with ``call.q/k/v/out/probs``."""
    bad = set(needs) - {"q", "k", "v", "out", "probs"}
    if bad:
        raise ValueError(f"unknown observer needs {sorted(bad)}; valid: q, k, v, out, probs")
    extra = frozenset("heads" if n == "out" else n for n in needs)
    return Observe(stage="heads", fn=fn, extra_needs=extra, when=steps, sees=sees)
