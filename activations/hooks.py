"""The one mechanism that reads and edits a U-Net: a Tap (DESIGN.md §1).

A Tap installs our HeadProcessor on every cross-attention module and, on demand, forward hooks on
the Transformer2DModel block sites; it tracks the denoising step so that every observer and edit
can be gated by step and guidance branch. Harvesting, tracing, HRVs and steering are all clients.

    with attach(pipe.unet, pipe) as tap:                   # or attach(unet) without a pipeline
        with tap.observe_block("mid_block.attentions.0", fn):   # fn(delta [b, H*W, C], tap.state)
            pipe(prompt)

    with edit_block(unet, "mid_block.attentions.0", lambda d: sae_reconstruct(d)):
        unet(sample, t, encoder_hidden_states)          # output = input + fn(Δ)

Taps nest: attaching twice to the same U-Net returns the same Tap (reference counted) and the
original processors come back when the outermost ``attach`` exits, also after an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from einops import rearrange

from activations.processor import AttnCall, Edit, HeadProcessor, Observer, batch_rows, gate_active
from activations.sites import Site, list_sites, resolve_sites
from activations.timesteps import check_branch

_TAP_ATTR = "_diffatlas_tap"


@dataclasses.dataclass
class RunState:
    """Where the current U-Net call is in a generation.

    step: index of the U-Net call in the current generation (None before the first); t: the
    scheduler timestep; cfg: whether the batch holds [uncond; cond] halves (classifier-free
    guidance) — then rows [0, b/2) are uncond and [b/2, b) cond, as diffusers' pipelines stack them.
    """

    step: int | None = None
    t: int | None = None
    num_train_timesteps: int = 1000
    cfg: bool = False
    new_generation: bool = True
    generation: int = -1

    @property
    def tau(self) -> float | None:
        return None if self.t is None else self.t / self.num_train_timesteps

    def branch_codes(self, batch: int, device=None) -> torch.Tensor:
        codes = torch.ones(batch, dtype=torch.long, device=device)
        if self.cfg and batch % 2 == 0:
            codes[: batch // 2] = 0
        return codes


@dataclasses.dataclass
class BlockCall:
    """What a block observer sees: Δ = output − input as [b, H*W, C], and the state."""

    site: str
    delta: torch.Tensor
    state: RunState
    branch: torch.Tensor  # [b] branch codes
    resolution: tuple[int, int]

    def rows(self, branch: str) -> torch.Tensor | None:
        return batch_rows(branch, self.branch)


@dataclasses.dataclass
class BlockEdit:
    fn: Callable[[torch.Tensor], torch.Tensor]  # Δ [b', H*W, C] -> new Δ
    branch: str = "both"
    steps: Any = None


class Tap:
    """Our processors and hooks on one U-Net. Create with ``attach``."""

    def __init__(self, unet, pipe=None):
        self.unet = unet
        self.pipe = pipe
        self.sites: list[Site] = list_sites(unet)
        self.site_by_name = {s.name: s for s in self.sites}
        sched = getattr(pipe, "scheduler", None)
        self.state = RunState(num_train_timesteps=int(getattr(getattr(sched, "config", None), "num_train_timesteps", 1000) or 1000))
        self.processors: dict[str, HeadProcessor] = {}
        self._originals: dict[str, Any] = {}
        self._handles: list = []
        self._block_handles: dict[str, Any] = {}
        self.block_observers: dict[str, list[tuple[Callable[[BlockCall], None], Any]]] = {}
        self.block_edits: dict[str, list[BlockEdit]] = {}
        self.refcount = 0
        self._sched = None

    # -- install / remove --------------------------------------------------------------------
    def install(self) -> None:
        for s in self.sites:
            if s.kind != "head":
                continue
            attn = self.unet.get_submodule(s.name)
            self._originals[s.name] = attn.processor
            proc = HeadProcessor(s.name, self.state)
            self.processors[s.name] = proc
            attn.set_processor(proc)
        self._handles.append(self.unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True))
        self._hook_scheduler()

    def _hook_scheduler(self) -> None:
        # a pipeline sets its scheduler's timesteps once per generation, right before denoising:
        # that marks step 0 (hooking the text encoder instead would misfire when an observer
        # encodes words mid-generation, as HRV construction does)
        sched = getattr(self.pipe, "scheduler", None)
        if sched is not None and hasattr(sched, "set_timesteps") and self._sched is None:
            original = sched.set_timesteps

            @functools.wraps(original)
            def set_timesteps(*a, **kw):
                self.state.new_generation = True
                return original(*a, **kw)

            sched.set_timesteps = set_timesteps
            self._sched = sched
            self.state.num_train_timesteps = int(getattr(sched.config, "num_train_timesteps", 1000) or 1000)

    def remove(self) -> None:
        errors = []
        for name, proc in self._originals.items():
            try:
                self.unet.get_submodule(name).set_processor(proc)
            except Exception as e:  # keep restoring the others
                errors.append(e)
        if self._sched is not None:
            with contextlib.suppress(AttributeError):
                del self._sched.set_timesteps  # drop our instance attribute: the class method shows again
            self._sched = None
        for h in self._handles + list(self._block_handles.values()):
            h.remove()
        self._handles, self._block_handles, self._originals, self.processors = [], {}, {}, {}
        if errors:
            raise errors[0]

    # -- step tracking -----------------------------------------------------------------------
    def reset(self) -> None:
        """Mark the next U-Net call as step 0 of a new generation."""
        self.state.new_generation = True

    def _on_unet_call(self, module, args, kwargs) -> None:
        st = self.state
        schedule = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        n_steps = len(schedule) if schedule is not None else 0
        if st.new_generation or st.step is None or (n_steps and st.step + 1 >= n_steps):
            st.step, st.new_generation = 0, False
            st.generation += 1
        else:
            st.step += 1
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        st.t = int(torch.as_tensor(t).flatten()[0].item()) if t is not None else None
        st.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) if self.pipe is not None else False

    # -- head sites --------------------------------------------------------------------------
    def _processor(self, site: str) -> HeadProcessor:
        if site not in self.processors:
            resolve_sites(self.sites, [site])  # raises the helpful error for unknown names
            raise KeyError(f"site {site!r} is a block site; head observers and edits need an attn2 site")
        return self.processors[site]

    @contextlib.contextmanager
    def observe_heads(self, site: str, fn: Callable[[AttnCall], None], needs=("out",), steps=None) -> Iterator[Observer]:
        obs = Observer(fn, frozenset(needs), steps)
        proc = self._processor(site)
        proc.observers.append(obs)
        try:
            yield obs
        finally:
            proc.observers.remove(obs)

    @contextlib.contextmanager
    def edit_heads(self, site: str, *edits: Edit) -> Iterator[None]:
        proc = self._processor(site)
        proc.edits.extend(edits)
        try:
            yield
        finally:
            for e in edits:
                proc.edits.remove(e)

    # -- block sites -------------------------------------------------------------------------
    def _block_site(self, site: str) -> Site:
        s = resolve_sites(self.sites, [site])[0]
        if s.kind != "block":
            raise KeyError(f"site {site!r} is a head site; block observers and edits need a Transformer2DModel site such as {s.block!r}")
        return s

    def _ensure_block_hook(self, site: str) -> None:
        if site not in self._block_handles:
            module = self.unet.get_submodule(site)
            self._block_handles[site] = module.register_forward_hook(
                lambda m, args, kwargs, output, _s=site: self._on_block(_s, args, kwargs, output), with_kwargs=True
            )

    def _maybe_drop_block_hook(self, site: str) -> None:
        if not self.block_observers.get(site) and not self.block_edits.get(site) and site in self._block_handles:
            self._block_handles.pop(site).remove()

    @contextlib.contextmanager
    def observe_block(self, site: str, fn: Callable[[BlockCall], None], steps=None) -> Iterator[None]:
        self._block_site(site)
        entry = (fn, steps)
        self.block_observers.setdefault(site, []).append(entry)
        self._ensure_block_hook(site)
        try:
            yield
        finally:
            self.block_observers[site].remove(entry)
            self._maybe_drop_block_hook(site)

    @contextlib.contextmanager
    def edit_block(self, site: str, fn: Callable[[torch.Tensor], torch.Tensor], branch: str = "both", steps=None) -> Iterator[None]:
        self._block_site(site)
        edit = BlockEdit(fn, check_branch(branch), steps)
        self.block_edits.setdefault(site, []).append(edit)
        self._ensure_block_hook(site)
        try:
            yield
        finally:
            self.block_edits[site].remove(edit)
            self._maybe_drop_block_hook(site)

    def _on_block(self, site: str, args, kwargs, output):
        edits = [e for e in self.block_edits.get(site, []) if gate_active(e.steps, self.state)]
        observers = [fn for fn, steps in self.block_observers.get(site, []) if gate_active(steps, self.state)]
        if not edits and not observers:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output.sample
        h, w = x.shape[-2:]
        delta = rearrange(y - x, "b c h w -> b (h w) c")
        codes = self.state.branch_codes(delta.shape[0], delta.device)
        if edits:
            for e in edits:
                rows = batch_rows(e.branch, codes)
                if rows is None:
                    delta = e.fn(delta)
                else:
                    delta = delta.clone()
                    delta[rows] = e.fn(delta[rows])
        call = BlockCall(site, delta, self.state, codes, (h, w))
        for fn in observers:
            fn(call)
        if not edits:
            return None
        y_new = x + rearrange(delta, "b (h w) c -> b c h w", h=h, w=w).to(x.dtype)
        if isinstance(output, tuple):
            return (y_new, *output[1:])
        output.sample = y_new
        return output


# --------------------------------------------------------------------------------------------
# entry points


@contextlib.contextmanager
def attach(unet, pipe=None) -> Iterator[Tap]:
    """Install (or reuse) the Tap of ``unet``; restores the original processors on the last exit."""
    tap = getattr(unet, _TAP_ATTR, None)
    if tap is None:
        tap = Tap(unet, pipe)
        tap.install()
        object.__setattr__(unet, _TAP_ATTR, tap)
    elif pipe is not None and tap.pipe is None:
        tap.pipe = pipe
        tap._hook_scheduler()
    tap.refcount += 1
    try:
        yield tap
    finally:
        tap.refcount -= 1
        if tap.refcount == 0:
            object.__delattr__(unet, _TAP_ATTR)
            tap.remove()


def _unet_of(model):
    return getattr(model, "unet", model)


@contextlib.contextmanager
def edit_block(model, site: str, fn: Callable[[torch.Tensor], torch.Tensor], branch: str = "both", steps=None) -> Iterator[Tap]:
    """Within the block, ``site``'s output becomes input + fn(Δ), Δ as [b, H*W, C].

    ``model``: a U-Net or a pipeline. ``branch`` / ``steps`` restrict the edit (see gate_active).
    """
    unet = _unet_of(model)
    with attach(unet, model if model is not unet else None) as tap, tap.edit_block(site, fn, branch, steps):
        yield tap


class Capture:
    """Values collected by ``capture_block``: ``records`` of (step, t, Δ on CPU [b, H*W, C])."""

    def __init__(self):
        self.records: list[tuple[int | None, int | None, torch.Tensor]] = []

    @property
    def deltas(self) -> list[torch.Tensor]:
        return [r[2] for r in self.records]


@contextlib.contextmanager
def capture_block(model, site: str, branch: str = "both", steps=None) -> Iterator[Capture]:
    """Record Δ of ``site`` at every (gated) call into memory; yields a Capture."""
    unet = _unet_of(model)
    cap = Capture()
    check_branch(branch)

    def fn(call: BlockCall):
        rows = call.rows(branch)
        d = call.delta if rows is None else call.delta[rows]
        cap.records.append((call.state.step, call.state.t, d.detach().cpu()))

    with attach(unet, model if model is not unet else None) as tap, tap.observe_block(site, fn, steps):
        yield cap


@contextlib.contextmanager
def observe_heads(model, site: str, fn: Callable[[AttnCall], None], needs=("out",), steps=None) -> Iterator[Tap]:
    unet = _unet_of(model)
    with attach(unet, model if model is not unet else None) as tap, tap.observe_heads(site, fn, needs, steps):
        yield tap


@contextlib.contextmanager
def edit_heads(model, site: str, *edits: Edit) -> Iterator[Tap]:
    """Apply HeadEdit / SwapKV / AddVector edits to one cross-attention module."""
    unet = _unet_of(model)
    with attach(unet, model if model is not unet else None) as tap, tap.edit_heads(site, *edits):
        yield tap
