"""Where the HRV half of ``analysis`` touches the denoiser, through the Intervention protocol.

Three small functions, so that a change of mechanism for HRVs and weakening is a change here only:

* ``observe_queries(pipe, on_call)``: at every cross-attention call, hand the conditional-branch
  queries and this module's key projection to ``on_call`` (HRV voting, Section 3 of Park et al.);
* ``weaken_heads(pipe, heads, token_scale)``: multiply chosen heads' attention probabilities by a
  per-prompt, per-token factor at every step (ordered weakening, Section 4);
* ``stream_text(pipe, prompts, rows, ...)``: an MMDiT's text keys (and values) of chosen tokens at
  every site and step, read by drawing the prompts (its concept words' keys: ``analysis.words``;
  another prompt's keys and values for ``steering.EncodePrompt``).

The feature half's head attribution (``feature_heads.py``) is the one other module that runs the
U-Net under interventions (``Observe`` and ``Apply`` reruns of a feature's top examples); the rest
of ``analysis`` generates images whole, reads the list of sites, and works on plain tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch

from activations.edits import HeadEdit, Observe
from activations.hooks import intervene
from activations.sites import head_sites, heads_by_site  # noqa: F401  (head_sites: re-exported)


@dataclasses.dataclass
class QueryCall:
    """What HRV voting needs from one cross-attention call."""

    site: str
    q_cond: torch.Tensor  # [b_cond, heads, N, d]: queries of the conditional branch
    project_keys: Callable[[torch.Tensor], torch.Tensor]  # text embeddings [T, C] -> keys [heads, T, d]
    scale: float  # the module's softmax scale (1/sqrt(d) in SD)
    step: int | None  # denoising step index
    t: int | None  # scheduler timestep


@contextlib.contextmanager
def observe_queries(pipe, on_call: Callable[[QueryCall], None]) -> Iterator[None]:
    """Call ``on_call(QueryCall)`` at every cross-attention call of every generation in the block.

    The observers sit at the ``q`` stage, so the processor keeps diffusers' fused attention for
    the generation itself.
    """

    def observer(call) -> None:
        rows = call.rows("cond")
        q = call.q if rows is None else call.q[rows]
        on_call(QueryCall(
            site=call.site,
            q_cond=q,
            project_keys=lambda ehs_TC, _call=call: _call.project(ehs_TC)[0][0],
            scale=float(getattr(call.attn, "scale", None) or call.q.shape[-1] ** -0.5),  # FLUX's attention keeps no scale
            step=call.state.step,
            t=call.state.t,
        ))

    with intervene(pipe, *(Observe(site=site.name, stage="q", fn=observer) for site in head_sites(pipe))):
        yield


@dataclasses.dataclass
class StreamText:
    """What ``stream_text`` read: per stage ("k", "v") and site, [steps, heads, rows, d]; ``taus``
    the τ of each step (the same for every prompt: one schedule)."""

    values: dict[str, dict[str, torch.Tensor]]
    taus: list[float]


def stream_text(pipe, prompts: Sequence[str], rows: Sequence[Sequence[int]], steps: int, guidance: float,
                stages: Sequence[str] = ("k",), heads: dict[str, list[int]] | None = None,
                batch_size: int = 16) -> StreamText:
    """The text keys (and values) an MMDiT's heads compute for chosen tokens of ``prompts``, at
    every step.

    Each prompt is drawn once (seed = its index, ``steps`` and ``guidance`` as the caller's
    generations) and, at every joint-attention site (or the sites of ``heads``, {site: local
    heads}, keeping those heads only) and step, the ``stages`` of its conditional text tokens
    ``rows[p]`` (indices into the text, ``activations.text.text_layout``) are kept:
    ``values[stage][site]`` is [steps, heads, sum(len(r) for r in rows), d], prompt after prompt.
    In an MMDiT the text is a stream that every block changes, reading the image, so a token's key
    at a block is only defined by running the tokens through the model; this runs them through
    with the image they draw themselves. Used for HRV word keys (``analysis.words``) and for
    ``steering.EncodePrompt`` at joint attention.
    """
    from activations.generate import sample

    sites = list(heads) if heads is not None else [s.name for s in head_sites(pipe)]
    kept = {stage: {site: [[] for _ in range(steps)] for site in sites} for stage in stages}
    taus: list[float | None] = [None] * steps
    chunk_rows: list[Sequence[int]] = []

    def observer(call) -> None:
        cond = call.rows("cond")
        x_bhTd = getattr(call, call.stage) if cond is None else getattr(call, call.stage)[cond]
        if heads is not None:
            x_bhTd = x_bhTd[:, heads[call.site]]
        step = min(int(call.state.step or 0), steps - 1)
        taus[step] = float(call.state.tau)
        kept[call.stage][call.site][step] += [x_bhTd[b][:, list(r)].float().cpu() for b, r in enumerate(chunk_rows)]

    observers = [Observe(site=site, stage=stage, fn=observer) for stage in stages for site in sites]
    for lo in range(0, len(prompts), batch_size):
        chunk_rows[:] = list(rows[lo: lo + batch_size])
        with torch.no_grad(), intervene(pipe, *observers):
            sample(pipe, list(prompts[lo: lo + batch_size]), list(range(lo, lo + len(chunk_rows))), steps=steps,
                   guidance=guidance, output_type="latent")
    values = {stage: {site: torch.stack([torch.cat(per_step, 1) for per_step in by_step]) for site, by_step in by_site.items()}
              for stage, by_site in kept.items()}
    return StreamText(values, [float(t) for t in taus])


def stream_keys(pipe, prompts: Sequence[str], rows: Sequence[Sequence[int]], steps: int, guidance: float,
                batch_size: int = 16) -> dict[str, torch.Tensor]:
    """``stream_text``'s keys at every joint-attention site: ``{site: [steps, heads, rows, d]}``."""
    return stream_text(pipe, prompts, rows, steps, guidance, batch_size=batch_size).values["k"]


@contextlib.contextmanager
def weaken_heads(pipe, heads: Sequence[int], token_scale_bT: torch.Tensor) -> Iterator[None]:
    """Multiply the attention probabilities of global ``heads`` by ``token_scale_bT`` at every step.

    ``token_scale_bT``: [b_cond, T] factors per conditional-branch prompt and text token (−2 on a
    prompt's semantic tokens, 1 on start/end/padding, for Section 4's weakening). Probabilities are
    not renormalised, as in the paper. The unconditional branch (the empty prompt: no semantic
    tokens) is untouched.
    """
    local = heads_by_site(pipe, heads)

    def scaled(probs_bhnt: torch.Tensor, call) -> torch.Tensor:
        # one factor per batch row and token: the conditional rows get the prompts' factors
        factor = torch.ones(probs_bhnt.shape[0], 1, 1, probs_bhnt.shape[-1], dtype=probs_bhnt.dtype, device=probs_bhnt.device)
        rows = call.rows("cond")
        factor[slice(None) if rows is None else rows] = token_scale_bT[:, None, None, :].to(factor)
        return probs_bhnt * factor

    edits = [HeadEdit(site=name, stage="probs", heads=hs, fn=scaled, branch="cond") for name, hs in local.items()]
    with intervene(pipe, *edits):
        yield
