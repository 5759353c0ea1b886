"""The one attention processor installed on every cross-attention module (``attn2``).

It runs the interventions attached to its module (``activations.intervention``) at each stage:

    q, k, v  ->  probs = softmax(q kᵀ · scale)  ->  heads = probs @ v  ->  attn_out = to_out(heads)

and computes exactly what diffusers' default processor computes when nothing is attached:

* idle (nothing attached, or every gate closed): the same operations as diffusers'
  ``AttnProcessor2_0`` (fused SDPA), so the output is identical and the cost is one Python branch;
* interventions that do not need the attention probabilities: still the fused SDPA path (the
  per-head output ``[b, heads, N, d]`` exists before the heads are merged anyway);
* interventions that read ``probs``: softmax(q kᵀ · scale) computed for them beside the fused
  path, whose output is left as it is (a map-capturing run draws the plain run's image bit for bit);
* interventions that edit ``probs``: the explicit path softmax(q kᵀ · scale) @ v, within float
  rounding (≤ 1e-5 in float32) of the fused one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from activations.intervention import Call, Intervention, run_stage
from activations.timesteps import branch_codes

# names kept for callers of the first API
from activations.edits import AddVector, HeadEdit, Observer, SwapKV  # noqa: E402,F401  (re-exported)


def _explicit_attention(attn, q, k, mask):
    """softmax(q kᵀ · scale + mask); scores in float32 (as diffusers' upcast options do) so that
    half-precision models stay stable."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
    if mask is not None:
        scores = scores + mask.float()
    return scores.softmax(dim=-1)


def token_grid(known: tuple[int, int] | None, n: int) -> tuple[int, int]:
    """The (H, W) grid of ``n`` patches: ``known`` (the run's grid at this site) when it holds n,
    else the squarest exact factorisation (a call made outside a tracked run), else (n, 1)."""
    if known is not None and known[0] * known[1] == n:
        return known
    side = int(round(n**0.5))
    return (side, n // side) if side * (n // side) == n else (n, 1)


class HeadProcessor:
    """Attention processor of one cross-attention module; holds its interventions.

    ``state`` is shared with the Tap that installed it (step, t, guidance layout, image ids, the
    latent size that gives this module's grid).
    """

    def __init__(self, site: str, state=None, level: int = 0):
        self.site = site
        self.state = state
        self.level = level  # how many times the latent was halved before this module
        self.interventions: list[Intervention] = []

    @property
    def idle(self) -> bool:
        return not self.interventions

    def _codes(self, b: int, device) -> torch.Tensor:
        cfg = bool(self.state.cfg) if self.state is not None else False
        return branch_codes(b, cfg, device)

    def _active(self) -> tuple[list[Intervention], dict[str, list[Intervention]]]:
        """The interventions whose gate is open at this call, and the same grouped by stage."""
        active = [iv for iv in self.interventions if self.state is None or iv.active(self.state)]
        by_stage: dict[str, list[Intervention]] = {}
        for iv in active:
            by_stage.setdefault(iv.stage, []).append(iv)
        return active, by_stage

    def _grid(self, n: int) -> tuple[int, int]:
        return token_grid(self.state.grid(self.level) if self.state is not None else None, n)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        active, by_stage = self._active()

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            _, _, h4, w4 = hidden_states.shape
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

        call = None
        if active:
            call = Call(self.site, "q", self.state, self._codes(batch_size, q.device), self._grid(q.shape[2]), attn, q, k, v)
            for stage in ("q", "k", "v"):
                if stage in by_stage:
                    call.stage = stage
                    run_stage(by_stage[stage], getattr(call, stage), call)
            q, k, v = call.q, call.k, call.v

        if any("probs" in iv.needs for iv in active):
            call.probs = _explicit_attention(attn, q, k, attention_mask)
        if "probs" in by_stage:
            call.stage = "probs"
            probs = run_stage(by_stage["probs"], call.probs, call)
        if any(not iv.observes for iv in by_stage.get("probs", ())):
            out = torch.matmul(probs.to(v.dtype), v)
        else:
            # fused kernel, as diffusers' default processor does; observers that only read probs
            # leave the output bit for bit a plain run's, whatever the kernels' float order
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)

        if call is not None:
            call.out = out
            if "heads" in by_stage:
                call.stage = "heads"
                out = run_stage(by_stage["heads"], out, call)

        hidden_states = rearrange(out, "b h n d -> b n (h d)").to(q.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if call is not None and "attn_out" in by_stage:
            call.stage = "attn_out"
            hidden_states = run_stage(by_stage["attn_out"], hidden_states, call)
        if input_ndim == 4:
            hidden_states = rearrange(hidden_states, "b (h w) c -> b c h w", h=h4, w=w4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


__all__ = ["AddVector", "HeadEdit", "HeadProcessor", "Observer", "SwapKV"]
