"""``trace``: capture sites into memory for a few images, for scripts and notebooks.

    with trace(pipe, sites=["mid_block.attentions.0", "mid_block.attentions.0.transformer_blocks.0.attn2"],
               timesteps="every:5", branch="cond") as tr:
        pipe(["a red cat", "a blue dog"], num_inference_steps=20)
    tr["mid_block.attentions.0"]                 # Δ       [image, step, i, j, channel]
    tr.probs("...attn2")                         # maps    [image, step, head, i, j, token]
    tr.heads("...attn2")                         # outputs [image, step, i, j, head, d]
    tr.steps, tr.timesteps                       # which steps were kept, and their t

Several pipeline calls inside one trace add images in call order. With ``branch="both"`` pass
``branch=`` to the accessors (default "cond"). Everything is kept on the CPU in the model's dtype;
this is for a handful of images — use the Harvester for data sets.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from einops import rearrange

from activations.families import denoiser_of
from activations.hooks import attach
from activations.intervention import Call
from activations.sites import resolve_sites
from activations.timesteps import BRANCHES, Branch, check_branch, parse_when, select_steps


class Trace:
    """Captured values; filled while the ``trace`` block runs."""

    def __init__(self, pipe, sites, timesteps, branch: str, attention: bool, head_outputs: bool):
        self.pipe = pipe
        self.sites = sites
        self.spec = timesteps
        parse_when(timesteps)  # refuse a bad spelling before the pipeline runs
        self.branch = branch
        self.attention = attention
        self.head_outputs = head_outputs
        # (kind, site, branch) -> generation -> list over kept steps of [b, ...] tensors
        self._data: dict[tuple, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        self._steps: dict[int, list[int]] = {}
        self.timesteps_by_step: dict[int, int] = {}
        self._generation_steps: dict[int, set[int]] = {}
        self._grids: dict[str, set[tuple[int, int]]] = defaultdict(set)  # site -> grids of its traced calls

    # -- gating ------------------------------------------------------------------------------
    def wanted(self, state) -> bool:
        g = state.generation
        if g not in self._generation_steps:
            sched = self.pipe.scheduler
            self._generation_steps[g] = set(
                select_steps(self.spec, [int(t) for t in sched.timesteps], sched.config.num_train_timesteps)
            )
        return state.step in self._generation_steps[g]

    def _branches(self) -> Sequence[str]:
        return BRANCHES if self.branch == "both" else (self.branch,)

    def _record(self, kind: str, site: str, state, codes: torch.Tensor, value: torch.Tensor) -> None:
        self.timesteps_by_step[state.step] = state.t
        steps = self._steps.setdefault(state.generation, [])
        if state.step not in steps:
            steps.append(state.step)
        for br in self._branches():
            rows = Branch(br).rows(codes)
            self._data[(kind, site, br)][state.generation].append(value[rows].detach().cpu())

    def on_block(self, call: Call) -> None:
        if self.wanted(call.state):
            self._grids[call.site].add(call.grid)
            self._record("delta", call.site, call.state, call.codes, call.delta)

    def on_heads(self, call: Call) -> None:
        if not self.wanted(call.state):
            return
        self._grids[call.site].add(call.grid)
        if self.attention:
            self._record("probs", call.site, call.state, call.codes, call.probs)
        if self.head_outputs:
            self._record("out", call.site, call.state, call.codes, call.out)

    # -- results -----------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        return next(iter(self._steps.values()), [])

    @property
    def timesteps(self) -> list[int]:
        return [self.timesteps_by_step[s] for s in self.steps]

    def _stacked(self, kind: str, site: str, branch: str | None) -> torch.Tensor:
        branch = branch or ("cond" if self.branch == "both" else self.branch)
        key = (kind, site, branch)
        if key not in self._data:
            known = sorted({k[1] for k in self._data if k[0] == kind})
            raise KeyError(f"nothing traced for {kind} of site {site!r} branch {branch!r}; traced sites: {', '.join(known) or 'none'}")
        gens = self._data[key]
        # [step][b, ...] per generation -> [b, step, ...], then images of all generations
        return torch.cat([torch.stack(values, dim=1) for _, values in sorted(gens.items())])

    def _grid(self, site: str) -> tuple[int, int]:
        """The site's (H, W) in the traced calls (the run's size, not the model's default)."""
        grids = self._grids.get(site, set())
        if len(grids) > 1:
            raise ValueError(f"the traced calls of {site} ran at different grids {sorted(grids)}; trace one image size per block")
        return next(iter(grids), None) or next(s.resolution for s in self.sites if s.name == site)

    def _kind(self, site: str) -> str | None:
        return next((s.kind for s in self.sites if s.name == site), None)

    def _check_kind(self, site: str, kind: str, accessor: str) -> None:
        actual = self._kind(site)
        if actual is not None and actual != kind:
            use = "tr.block(site) or tr[site]" if actual == "block" else "tr.probs(site) or tr.heads(site)"
            example = f" (its heads are sites like {site}.transformer_blocks.0.attn2)" if actual == "block" else ""
            raise ValueError(f"tr.{accessor}({site!r}): {site!r} is a {actual} site; use {use}{example}")

    def __getitem__(self, site: str) -> torch.Tensor:
        if self._kind(site) == "head":
            return self.probs(site) if self.attention else self.heads(site)
        return self.block(site)

    def block(self, site: str, branch: str | None = None) -> torch.Tensor:
        """Δ of a block site as [image, step, i, j, channel]."""
        self._check_kind(site, "block", "block")
        h, w = self._grid(site)
        return rearrange(self._stacked("delta", site, branch), "b s (i j) c -> b s i j c", i=h, j=w)

    def probs(self, site: str, branch: str | None = None) -> torch.Tensor:
        """Attention maps of a head site as [image, step, head, i, j, token]."""
        self._check_kind(site, "head", "probs")
        h, w = self._grid(site)
        return rearrange(self._stacked("probs", site, branch), "b s h (i j) t -> b s h i j t", i=h, j=w)

    def heads(self, site: str, branch: str | None = None) -> torch.Tensor:
        """Per-head outputs (before to_out) of a head site as [image, step, i, j, head, d]."""
        self._check_kind(site, "head", "heads")
        h, w = self._grid(site)
        return rearrange(self._stacked("out", site, branch), "b s h (i j) d -> b s i j h d", i=h, j=w)


@contextlib.contextmanager
def trace(
    pipe,
    sites: str | Sequence[str] = "blocks",
    timesteps="all",
    branch: str = "cond",
    attention: bool = True,
    head_outputs: bool = True,
) -> Iterator[Trace]:
    """Capture ``sites`` of ``pipe`` during the pipeline calls made inside the block.

    sites: names or the groups "all" / "blocks" / "heads"; timesteps: a gate spelling of
    ``activations.timesteps`` (all, early, {tau: [..]}, {steps: [..]}, {every: N}, {t: [..]},
    checked against each generation's schedule); branch: "cond", "uncond" or
    "both"; attention / head_outputs: what to keep for head sites.
    """
    check_branch(branch)
    with attach(denoiser_of(pipe), pipe) as tap:
        tap.check_branch(branch)
        chosen = resolve_sites(tap.sites, sites)
        tr = Trace(pipe, chosen, timesteps, branch, attention, head_outputs)
        needs = {"probs"} if attention else set()
        if head_outputs:
            needs.add("out")
        with contextlib.ExitStack() as stack:
            for s in chosen:
                if s.kind == "block":
                    stack.enter_context(tap.observe_block(s.name, tr.on_block))
                elif needs:
                    stack.enter_context(tap.observe_heads(s.name, tr.on_heads, needs=needs))
            yield tr
