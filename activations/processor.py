"""The one attention processor installed on every cross-attention module (``attn2``).

It computes cross-attention head by head where someone asks for it and exactly like diffusers'
default scaled-dot-product processor where nobody does:

* idle (no observer, no active edit): the same operations as diffusers' ``AttnProcessor2_0``
  (fused SDPA), so the output is identical and the cost is one Python branch;
* observers that want only q, k, v or per-head outputs: still the fused SDPA path, the per-head
  output ``[b, heads, N, d]`` exists before the heads are merged anyway;
* observers or edits that need the attention probabilities: the explicit path
  softmax(q kᵀ · scale) @ v, within float rounding (≤ 1e-5 in float32) of the fused one.

Shapes seen by observers and edits (b = batch incl. both CFG halves, N = H*W patches, T = tokens):
``q [b, heads, N, d]``, ``k, v [b, heads, T, d]``, ``probs [b, heads, N, T]``, head output
``out [b, heads, N, d]`` (AttnCall.head_out gives the DESIGN's ``[b, N, heads, d]`` view).

Edits (applied in this order): SwapKV (keys/values of another prompt on chosen heads and patches),
HeadEdit on "probs" (multiply / replace / function on heads × patches × tokens; probabilities are
not renormalised, as in the HRV paper's weakening by −2), HeadEdit on "out" (heads × patches),
AddVector (on per-head outputs, or on the module output after ``to_out``).
Every edit has a ``branch`` ("cond", "uncond", "both") and ``steps`` gate (see ``gate_active``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from activations.timesteps import branch_code, check_branch, in_window

Index = Sequence[int] | torch.Tensor | None


# --------------------------------------------------------------------------------------------
# gating by step and branch


def gate_active(steps, state) -> bool:
    """Is a step gate open for the current call?

    ``steps``: None (always), a window name ("early"/"middle"/"late") or (lo, hi) pair on tau,
    a collection of step indices, or a callable ``state -> bool``. Without step information
    (the U-Net called outside a pipeline) only None and callables can be open.
    """
    if steps is None:
        return True
    if callable(steps):
        return bool(steps(state))
    if state is None or state.step is None:
        return False
    if isinstance(steps, str) or (isinstance(steps, tuple) and len(steps) == 2 and any(isinstance(x, float) for x in steps)):
        return bool(in_window(state.t, state.num_train_timesteps, steps))
    return state.step in steps


def batch_rows(branch: str, codes: torch.Tensor) -> torch.Tensor | None:
    """Batch indices of ``branch`` given per-row branch codes; None means all rows."""
    check_branch(branch)
    if branch == "both":
        return None
    return torch.nonzero(codes == branch_code(branch)).flatten()


def _as_index(sel: Index, n: int, device) -> torch.Tensor | slice:
    """A selection (None, list of ints, bool mask of any shape with n elements) -> index."""
    if sel is None:
        return slice(None)
    sel = torch.as_tensor(sel, device=device)
    if sel.dtype == torch.bool:
        sel = sel.reshape(-1)
        if sel.numel() != n:
            raise ValueError(f"boolean mask has {sel.numel()} elements, expected {n}")
        return torch.nonzero(sel).flatten()
    sel = sel.reshape(-1).long()
    if len(sel) and (sel.min() < -n or sel.max() >= n):
        raise IndexError(f"index {sel.tolist()} out of range for size {n}")
    return sel


# --------------------------------------------------------------------------------------------
# edits


@dataclasses.dataclass
class HeadEdit:
    """Multiply (``scale``), replace (``value``) or transform (``fn``) part of the attention
    probabilities (``target="probs"``: heads × patches × tokens) or of the per-head outputs
    (``target="out"``: heads × patches; ``tokens`` must be None).

    heads: module-local head indices (None = all); patches: flat indices into H*W or a bool mask
    [H, W]; tokens: token indices. ``fn(tensor, call) -> tensor`` receives the full
    ``[b, heads, N, T]`` / ``[b, heads, N, d]`` tensor of the gated batch rows and returns it edited.
    """

    target: str = "probs"
    heads: Index = None
    patches: Index = None
    tokens: Index = None
    scale: float | torch.Tensor | None = None
    value: float | torch.Tensor | None = None
    fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    branch: str = "both"
    steps: Any = None

    def __post_init__(self):
        if self.target not in ("probs", "out"):
            raise ValueError(f"unknown HeadEdit target {self.target!r}; valid targets: 'probs', 'out'")
        if sum(x is not None for x in (self.scale, self.value, self.fn)) != 1:
            raise ValueError("HeadEdit needs exactly one of scale, value or fn")
        if self.target == "out" and self.tokens is not None:
            raise ValueError("HeadEdit(target='out') acts on heads x patches; tokens must be None")
        check_branch(self.branch)

    def apply(self, x: torch.Tensor, call: "AttnCall") -> torch.Tensor:
        rows = batch_rows(self.branch, call.branch)
        sub = x if rows is None else x[rows]
        if self.fn is not None:
            sub = self.fn(sub, call)
        else:
            h = _as_index(self.heads, x.shape[1], x.device)
            p = _as_index(self.patches, x.shape[2], x.device)
            last = _as_index(self.tokens, x.shape[3], x.device) if self.target == "probs" else slice(None)
            sub = sub.clone()
            # index one axis at a time: advanced indices on several axes would pair up instead of
            # forming the heads x patches x tokens block
            view = sub[:, h][:, :, p][..., last]
            new = view * self.scale if self.scale is not None else torch.as_tensor(self.value, dtype=x.dtype, device=x.device).expand_as(view)
            _assign(sub, (h, p, last), new)
        if rows is None:
            return sub
        x = x.clone()
        x[rows] = sub
        return x


def _assign(x: torch.Tensor, index: tuple, value: torch.Tensor) -> None:
    """x[:, h][:, :, p][..., t] = value, written back through the three advanced indices."""
    h, p, t = index
    xh = x[:, h]
    xp = xh[:, :, p]
    xp[..., t] = value
    xh[:, :, p] = xp
    x[:, h] = xh


@dataclasses.dataclass
class SwapKV:
    """Attend to another prompt on chosen heads and patches ("unicorn" into a horse's head).

    ``encoder_hidden_states``: the other prompt's text embeddings ``[T', C]`` or ``[1|b, T', C]``.
    The chosen heads' outputs on the chosen patches become softmax(q k'ᵀ) v' with k', v' projected
    from those embeddings by this module's own key/value projections.
    """

    encoder_hidden_states: torch.Tensor
    heads: Index = None
    patches: Index = None
    branch: str = "both"
    steps: Any = None

    def __post_init__(self):
        check_branch(self.branch)


@dataclasses.dataclass
class AddVector:
    """Add ``scale * vector`` on chosen patches: to per-head outputs (``heads`` given; vector [d]
    or [len(heads), d]) or to the module output after ``to_out`` (``heads=None``; vector [C])."""

    vector: torch.Tensor
    heads: Index = None
    patches: Index = None
    scale: float = 1.0
    branch: str = "both"
    steps: Any = None

    def __post_init__(self):
        check_branch(self.branch)


Edit = HeadEdit | SwapKV | AddVector


# --------------------------------------------------------------------------------------------
# what observers see


@dataclasses.dataclass
class AttnCall:
    """One call of one cross-attention module, as observers see it (tensors are not copies)."""

    site: str
    attn: Any  # the diffusers Attention module (its to_k / to_v project other prompts)
    state: Any  # RunState of the tap: step, t, tau, cfg
    branch: torch.Tensor  # [b] branch code per batch row (0 uncond, 1 cond)
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor | None = None  # [b, heads, N, d]
    probs: torch.Tensor | None = None  # [b, heads, N, T]

    @property
    def head_out(self) -> torch.Tensor:
        """Per-head outputs as ``[b, N, heads, d]``."""
        return rearrange(self.out, "b h n d -> b n h d")

    def rows(self, branch: str) -> torch.Tensor | None:
        return batch_rows(branch, self.branch)

    def project(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[b', heads, T', d]`` of other text embeddings through this module."""
        return _project_kv(self.attn, encoder_hidden_states)


@dataclasses.dataclass
class Observer:
    fn: Callable[[AttnCall], None]
    needs: frozenset[str] = frozenset({"out"})
    steps: Any = None

    def __post_init__(self):
        bad = set(self.needs) - {"q", "k", "v", "out", "probs"}
        if bad:
            raise ValueError(f"unknown observer needs {sorted(bad)}; valid: q, k, v, out, probs")
        self.needs = frozenset(self.needs)


def _project_kv(attn, ehs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ehs.ndim == 2:
        ehs = ehs[None]
    if attn.norm_cross:
        ehs = attn.norm_encoder_hidden_states(ehs)
    k = rearrange(attn.to_k(ehs), "b t (h d) -> b h t d", h=attn.heads)
    v = rearrange(attn.to_v(ehs), "b t (h d) -> b h t d", h=attn.heads)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k, v


def _explicit_attention(attn, q, k, v, mask):
    """softmax(q kᵀ · scale + mask) and its product with v; scores in float32 (as diffusers'
    upcast options do) so that half-precision models stay stable."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
    if mask is not None:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1).to(v.dtype)
    return probs


# --------------------------------------------------------------------------------------------
# the processor


class HeadProcessor:
    """Attention processor of one cross-attention module; holds its observers and edits.

    ``state`` is shared with the Tap that installed it (step, t, branch layout of the batch).
    """

    def __init__(self, site: str, state=None):
        self.site = site
        self.state = state
        self.observers: list[Observer] = []
        self.edits: list[Edit] = []

    @property
    def idle(self) -> bool:
        return not self.observers and not self.edits

    def _branch_codes(self, b: int, device) -> torch.Tensor:
        if self.state is not None:
            return self.state.branch_codes(b, device)
        return torch.ones(b, dtype=torch.long, device=device)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        observers = [o for o in self.observers if gate_active(o.steps, self.state)]
        edits = [e for e in self.edits if gate_active(e.steps, self.state)]

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b4, c4, h4, w4 = hidden_states.shape
            hidden_states = rearrange(hidden_states, "b c h w -> b (h w) c")
        batch_size = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        q = rearrange(query, "b n (h d) -> b h n d", h=attn.heads)
        k = rearrange(key, "b t (h d) -> b h t d", h=attn.heads)
        v = rearrange(value, "b t (h d) -> b h t d", h=attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        need_probs = any("probs" in o.needs for o in observers) or any(
            isinstance(e, HeadEdit) and e.target == "probs" for e in edits
        )
        probs = None
        if need_probs:
            probs = _explicit_attention(attn, q, k, v, attention_mask)
            call = AttnCall(self.site, attn, self.state, self._branch_codes(batch_size, q.device), q, k, v, None, probs)
            for e in edits:
                if isinstance(e, HeadEdit) and e.target == "probs":
                    probs = e.apply(probs, call)
            out = torch.matmul(probs, v)
        else:
            # fused kernel, as diffusers' default processor does
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)

        after_to_out: list[AddVector] = []
        if edits or observers:
            call = AttnCall(self.site, attn, self.state, self._branch_codes(batch_size, q.device), q, k, v, out, probs)
            for e in edits:
                if isinstance(e, SwapKV):
                    out = self._swap_kv(e, call, out)
                elif isinstance(e, HeadEdit) and e.target == "out":
                    out = e.apply(out, call)
                elif isinstance(e, AddVector):
                    if e.heads is None:
                        after_to_out.append(e)
                    else:
                        out = self._add_to_heads(e, call, out)
                call.out = out
            call.probs = probs
            for o in observers:
                o.fn(call)

        hidden_states = rearrange(out, "b h n d -> b n (h d)").to(q.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        for e in after_to_out:
            hidden_states = self._add_to_output(e, batch_size, hidden_states)
        if input_ndim == 4:
            hidden_states = rearrange(hidden_states, "b (h w) c -> b c h w", h=h4, w=w4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    # -- edit helpers ------------------------------------------------------------------------
    def _swap_kv(self, e: SwapKV, call: AttnCall, out: torch.Tensor) -> torch.Tensor:
        b = out.shape[0]
        k2, v2 = _project_kv(call.attn, e.encoder_hidden_states.to(device=out.device, dtype=call.q.dtype))
        if k2.shape[0] == 1 and b > 1:
            k2, v2 = k2.expand(b, -1, -1, -1), v2.expand(b, -1, -1, -1)
        alt = F.scaled_dot_product_attention(call.q, k2, v2)
        mask = self._region(e.heads, e.patches, e.branch, call, out)
        return torch.where(mask, alt.to(out.dtype), out)

    def _region(self, heads, patches, branch, call, out) -> torch.Tensor:
        """Bool mask [b, heads, N, 1] of the selected batch rows × heads × patches."""
        b, nh, n, _ = out.shape
        m = torch.zeros(b, nh, n, 1, dtype=torch.bool, device=out.device)
        rows = batch_rows(branch, call.branch)
        rows = slice(None) if rows is None else rows
        h = _as_index(heads, nh, out.device)
        p = _as_index(patches, n, out.device)
        sel_h = torch.zeros(nh, dtype=torch.bool, device=out.device)
        sel_h[h] = True
        sel_p = torch.zeros(n, dtype=torch.bool, device=out.device)
        sel_p[p] = True
        sel = sel_h[:, None] & sel_p[None, :]
        m[rows] = sel[None, :, :, None]
        return m

    def _add_to_heads(self, e: AddVector, call: AttnCall, out: torch.Tensor) -> torch.Tensor:
        b, nh, n, d = out.shape
        h = _as_index(e.heads, nh, out.device)
        vec = torch.as_tensor(e.vector, dtype=out.dtype, device=out.device)
        full = torch.zeros(nh, d, dtype=out.dtype, device=out.device)
        full[h] = vec.reshape(-1, d).expand(len(full[h]), d) if vec.numel() == d else vec.reshape(-1, d)
        mask = self._region(e.heads, e.patches, e.branch, call, out)
        return out + mask * (e.scale * full[None, :, None, :])

    def _add_to_output(self, e: AddVector, b: int, hidden: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[1]
        vec = torch.as_tensor(e.vector, dtype=hidden.dtype, device=hidden.device).reshape(1, 1, -1)
        sel_p = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        sel_p[_as_index(e.patches, n, hidden.device)] = True
        rows_sel = torch.zeros(b, dtype=torch.bool, device=hidden.device)
        rows = batch_rows(e.branch, self._branch_codes(b, hidden.device))
        rows_sel[slice(None) if rows is None else rows] = True
        mask = (rows_sel[:, None] & sel_p[None, :])[..., None]
        return hidden + mask * (e.scale * vec)


def default_processor():
    """diffusers' own default for cross-attention, for comparisons in tests and benchmarks."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def head_dim(attn) -> int:
    return attn.to_q.out_features // attn.heads


__all__ = [
    "AddVector",
    "AttnCall",
    "HeadEdit",
    "HeadProcessor",
    "Observer",
    "SwapKV",
    "batch_rows",
    "gate_active",
]
