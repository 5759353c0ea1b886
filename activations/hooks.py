"""The one mechanism that reads and edits a denoiser (a U-Net, or an SD3 / FLUX transformer): a Tap.

A Tap installs our head processor on every head site (a U-Net's cross-attention: HeadProcessor; an
MMDiT's joint attention: JointHeadProcessor, as ``activations.families`` declares) and, on demand,
forward hooks on the block sites (a U-Net's Transformer2DModels; an MMDiT's transformer blocks,
image stream and ``.context`` text stream); it tracks the denoising step (step, t, tau), the guidance
layout of the batch, the image index of each row and the latent size, so that every intervention
(``activations.intervention``) gets the same call context at block and head sites. Harvesting,
tracing, HRVs, feature analysis, steering and the explorer are all clients.

    with intervene(pipe, HeadEdit(site=s, heads=[3], tokens=[2], scale=-2.0, when="early")):
        pipe(prompt)

    with attach(pipe, pipe) as tap, tap.add(Observe(site="mid_block.attentions.0", fn=print)):
        pipe(prompt)

Taps nest: attaching twice to the same U-Net returns the same Tap (reference counted) and the
original processors come back when the outermost ``attach`` exits, also after an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from einops import rearrange

from activations.edits import Apply, Observe, Observer, index_mask
from activations.intervention import BLOCK_STAGES, Call, Intervention, resolve_all, run_stage
from activations.families import architecture_of, denoiser_of
from activations.joint_processor import install_joint_processors
from activations.processor import HeadProcessor, token_grid
from activations.sites import Site, list_sites, resolve_sites
from activations.timesteps import branch_codes, check_branch
from common.errors import UnknownNameError, UsageError

_TAP_ATTR = "_diffatlas_tap"


@dataclasses.dataclass
class RunState:
    """Where the current U-Net call is in a generation.

    step: index of the U-Net call in the current generation (None before the first); t: the
    scheduler timestep; cfg: whether the batch holds [uncond; cond] halves (classifier-free
    guidance) — then rows [0, b/2) are uncond and [b/2, b) cond, as diffusers' pipelines stack them;
    images: the image index of each prompt of the current pipeline call (set by the client that
    knows them, e.g. the harvester; default 0..n-1); latent: the (h, w) of the latent being denoised.
    """

    step: int | None = None
    t: int | None = None
    num_train_timesteps: int = 1000
    cfg: bool = False
    new_generation: bool = True
    generation: int = -1
    images: list[int] | None = None
    latent: tuple[int, int] | None = None
    forced: tuple[int, bool] | None = None
    """(step, cfg) of the next denoiser call, set by a client that calls the denoiser itself at
    chosen steps (``Tap.next_call``: the harvest of real images) instead of through a pipeline"""
    inputs: tuple[tuple, dict] | None = None
    """the current U-Net call's (args, kwargs), by reference: what a client needs to run one step
    again (``analysis.feature_heads.total_head_attribution`` reruns it with gradients)"""

    @property
    def tau(self) -> float | None:
        return None if self.t is None else self.t / self.num_train_timesteps

    def branch_codes(self, batch: int, device=None) -> torch.Tensor:
        return branch_codes(batch, self.cfg, device)

    def image_indices(self, batch: int, device=None) -> torch.Tensor:
        """Image index of each batch row; both guidance halves of an image share it."""
        n = batch // 2 if (self.cfg and batch % 2 == 0) else batch
        ids = torch.as_tensor(self.images if self.images is not None and len(self.images) == n else range(n), device=device)
        return torch.cat([ids, ids]) if n != batch else ids

    def grid(self, level: int) -> tuple[int, int] | None:
        """The (H, W) of a site ``level`` halvings below the latent (stride-2 convolutions with
        padding 1 round up), or None before the first U-Net call."""
        if self.latent is None:
            return None
        h, w = self.latent
        for _ in range(level):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w


def _level(site: Site, sample_size) -> int:
    """How many halvings of the latent give this site's map (from the default latent size)."""
    h = sample_size[0] if isinstance(sample_size, (tuple, list)) else int(sample_size)
    level = 0
    while h > site.resolution[0]:
        h, level = (h + 1) // 2, level + 1
    return level


class Tap:
    """Our processors and hooks on one denoiser (a U-Net or an MMDiT transformer), and the
    interventions attached to them. Create with ``attach``; attach interventions with
    ``tap.add(...)`` (a context manager).

    How it drives the denoiser comes from its ``activations.families.Architecture``: which head
    processor (``processor``), what a block's inputs and outputs are (``blocks_io``), the units of
    its timestep argument (``timestep_scale``) and whether guidance shares one batch
    (``batched_cfg``). MMDiTs: ``state.t`` is in the scheduler's units (FLUX's pipeline passes
    t / 1000: the Tap multiplies it back), rounded down to an integer as U-Net timesteps are, so
    ``tau = t / num_train_timesteps`` is the flow-matching sigma to within 0.001."""

    def __init__(self, denoiser, pipe=None):
        self.denoiser = denoiser_of(denoiser)
        self.arch = architecture_of(self.denoiser)
        self.pipe = pipe
        self.sites: list[Site] = list_sites(self.denoiser)
        self.site_by_name = {s.name: s for s in self.sites}
        sched = getattr(pipe, "scheduler", None)
        self.state = RunState(num_train_timesteps=int(getattr(getattr(sched, "config", None), "num_train_timesteps", 1000) or 1000))
        self.processors: dict[str, HeadProcessor] = {}
        self._originals: dict[str, Any] = {}
        self._handles: list = []
        self._block_handles: dict[str, Any] = {}
        self.block_interventions: dict[str, list[Intervention]] = {}
        self.refcount = 0
        self._sched = None
        self._joint = None
        self._signature = inspect.signature(self.denoiser.forward)

    # -- install / remove --------------------------------------------------------------------
    def install(self) -> None:
        sample_size = self.arch.default_latent(self.denoiser)
        if self.arch.processor == "joint":
            # the joint processors' installer also tells FLUX's single-stream modules their text length
            self._joint = install_joint_processors(self.denoiser, self.state)
            for s in self.sites:
                if s.kind == "head":
                    self.processors[s.name] = self._joint.processors[s.name]
                    self.processors[s.name].level = _level(s, sample_size)
        elif self.arch.processor != "cross":
            raise UsageError(f"{self.arch.name}: unknown processor {self.arch.processor!r} in its Architecture; valid: cross, joint")
        for s in self.sites if self.arch.processor == "cross" else ():
            if s.kind != "head":
                continue
            attn = self.denoiser.get_submodule(s.name)
            self._originals[s.name] = attn.processor
            proc = HeadProcessor(s.name, self.state, level=_level(s, sample_size))
            self.processors[s.name] = proc
            attn.set_processor(proc)
        self._handles.append(self.denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True))
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
        if self._joint is not None:
            try:
                self._joint.remove()
            except Exception as e:
                errors.append(e)
            self._joint = None
        for name, proc in self._originals.items():
            try:
                self.denoiser.get_submodule(name).set_processor(proc)
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
        """Mark the next denoiser call as step 0 of a new generation."""
        self.state.new_generation = True

    def next_call(self, step: int, cfg: bool = False) -> None:
        """Mark the next denoiser call as step ``step`` of the current generation, its batch guided
        ([uncond; cond]) or not: for a client that calls the denoiser itself, at chosen steps of a
        schedule, rather than through a pipeline (whose calls the Tap counts)."""
        self.state.forced = (int(step), bool(cfg))

    def _on_denoiser_call(self, module, args, kwargs) -> None:
        st = self.state
        schedule = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        n_steps = len(schedule) if schedule is not None else 0
        forced, st.forced = st.forced, None
        if forced is not None:
            if st.new_generation:
                st.generation, st.new_generation = st.generation + 1, False
            st.step = forced[0]
        elif st.new_generation or st.step is None or (n_steps and st.step + 1 >= n_steps):
            st.step, st.new_generation = 0, False
            st.generation += 1
        else:
            st.step += 1
        arguments = self._signature.bind_partial(*args, **kwargs).arguments
        t = arguments.get("timestep")
        scale = self.arch.timestep_scale
        if t is None:
            t_new = None
        elif scale == 1:
            t_new = int(torch.as_tensor(t).flatten()[0].item())
        else:  # e.g. FLUX: the pipeline passes t / 1000; undo it in float64, rounding off float32 noise
            t_new = int(round(float(torch.as_tensor(t).flatten()[0].double().item()) * scale, 3))
        if forced is None and not self.arch.batched_cfg and self.pipe is not None and st.step and t_new is not None and t_new == st.t:
            # FluxPipeline's true CFG calls the transformer twice per step (cond, then uncond)
            raise UsageError(f"{self.arch.name}: two denoiser calls at one timestep (t={t_new}: FluxPipeline's true CFG, "
                             "true_cfg_scale > 1 with a negative prompt) are not supported yet; valid: true_cfg_scale=1")
        st.t = t_new
        if forced is not None:
            st.cfg = forced[1] and self.arch.batched_cfg
        elif self.arch.batched_cfg:
            st.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) if self.pipe is not None else False
        else:
            st.cfg = False
        latent = self.arch.latent_of(arguments) if self.arch.latent_of is not None else None
        if latent is not None:
            st.latent = tuple(latent)
        st.inputs = (args, kwargs)

    # -- attaching interventions -------------------------------------------------------------
    def check_branch(self, branch) -> str:
        """``branch``'s name if this denoiser's batches can have it. ``cond`` is the prompt's rows,
        ``uncond`` the empty prompt's rows of a guided batch, ``both`` every row. A
        guidance-distilled family (FLUX.1: ``Architecture.batched_cfg`` False) has only cond rows,
        so ``uncond`` is refused and ``both`` equals ``cond``."""
        name = check_branch(branch)
        if name == "uncond" and not self.arch.batched_cfg:
            raise UsageError(f"branch 'uncond' does not exist for {self.arch.name} models ({self.arch.denoiser_class} is "
                             "guidance-distilled: no uncond rows in its batches); valid branches: cond, both")
        return name

    def _check_site(self, iv: Intervention) -> Site:
        if iv.site is None:
            raise UsageError(f"{type(iv).__name__} has no site; set site= to one of: {', '.join(self.site_by_name)}")
        s = resolve_sites(self.sites, [iv.site])[0]  # raises the helpful error for unknown names
        try:
            self.check_branch(iv.branch)
        except UsageError as err:
            raise UsageError(f"{type(iv).__name__} at {iv.site}: {err}") from None
        if iv.stage in BLOCK_STAGES and s.kind != "block":
            raise UnknownNameError(f"site {iv.site!r} is a head site; stage {iv.stage!r} needs a block site such as {s.block!r}")
        if iv.stage not in BLOCK_STAGES and s.kind != "head":
            heads = [x.name for x in self.sites if x.kind == "head" and x.block == s.name]
            raise UnknownNameError(f"site {iv.site!r} is a block site; stage {iv.stage!r} needs a head site such as {heads[0] if heads else '...attn'!r}")
        if s.kind == "head" and getattr(iv, "heads", None) is not None:  # module-local heads of this site
            try:
                index_mask(iv.heads, s.heads, "cpu", "head")
            except UsageError as err:
                raise UsageError(f"{type(iv).__name__} at {iv.site}: {err}") from None
        return s

    @contextlib.contextmanager
    def add(self, *interventions: Intervention, prompts: Sequence[str] | None = None) -> Iterator["Tap"]:
        """Attach interventions for the duration of the block (in the given order), each resolved
        against the model first (``Intervention.resolve``: checked, and expanded when it spans
        sites), so that a bad one fails here and not in the middle of a generation."""
        interventions = resolve_all(self.pipe if self.pipe is not None else self.denoiser, interventions, prompts)
        for iv in interventions:
            self._check_site(iv)
        added: list[Intervention] = []
        try:
            for iv in interventions:
                if iv.stage in BLOCK_STAGES:
                    self.block_interventions.setdefault(iv.site, []).append(iv)
                    self._ensure_block_hook(iv.site)
                else:
                    self.processors[iv.site].interventions.append(iv)
                added.append(iv)
            yield self
        finally:
            for iv in reversed(added):
                if iv.stage in BLOCK_STAGES:
                    self.block_interventions[iv.site].remove(iv)
                    self._maybe_drop_block_hook(iv.site)
                else:
                    self.processors[iv.site].interventions.remove(iv)

    def set_images(self, images) -> None:
        """The image index of each prompt of the next pipeline call (call.images reports them)."""
        self.state.images = [int(i) for i in images]

    # -- the first API: observers and edits by function ---------------------------------------
    def observe_heads(self, site: str, fn: Callable[[Call], None], needs=("out",), steps=None):
        obs = Observer(fn, frozenset(needs), steps)
        obs.site = site
        return self.add(obs)

    def edit_heads(self, site: str, *edits: Intervention):
        for e in edits:
            if e.site is None:
                e.site = site
            elif e.site != site:
                raise ValueError(f"edit for site {e.site!r} given to edit_heads({site!r})")
        return self.add(*edits)

    def observe_block(self, site: str, fn: Callable[[Call], None], steps=None):
        return self.add(Observe(site=site, stage="block", fn=fn, when=steps))

    def edit_block(self, site: str, fn: Callable[[torch.Tensor], torch.Tensor], branch: str = "both", steps=None):
        return self.add(Apply(site=site, stage="block", fn=fn, branch=check_branch(branch), when=steps))

    # -- block sites -------------------------------------------------------------------------
    def _ensure_block_hook(self, site: str) -> None:
        if site not in self._block_handles:
            if self.arch.blocks_io == "streams":
                # an MMDiT block: its image site and its text-stream site (<block>.context) hook the same module
                text = site.endswith(_CONTEXT)
                module = self.denoiser.get_submodule(site[: -len(_CONTEXT)] if text else site)
                level = _level(self.site_by_name[site], self.arch.default_latent(self.denoiser))  # once, not per call
                on_block = functools.partial(self._on_stream_block, site, text, level)
            else:
                module = self.denoiser.get_submodule(site)
                on_block = functools.partial(self._on_block, site)
            self._block_handles[site] = module.register_forward_hook(
                lambda m, args, kwargs, output, _f=on_block: _f(m, args, kwargs, output), with_kwargs=True
            )

    def _maybe_drop_block_hook(self, site: str) -> None:
        if not self.block_interventions.get(site) and site in self._block_handles:
            self._block_handles.pop(site).remove()

    def _on_block(self, site: str, module, args, kwargs, output):
        active = [iv for iv in self.block_interventions.get(site, []) if iv.active(self.state)]
        if not active:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output.sample
        h, w = x.shape[-2:]
        delta = rearrange(y - x, "b c h w -> b (h w) c")
        call = Call(site, "block", self.state, self.state.branch_codes(delta.shape[0], delta.device), (h, w), module, delta=delta)
        new = run_stage(active, delta, call)
        if new is delta:
            return None
        y_new = x + rearrange(new, "b (h w) c -> b c h w", h=h, w=w).to(x.dtype)
        if isinstance(output, tuple):
            return (y_new, *output[1:])
        output.sample = y_new
        return output


    def _on_stream_block(self, site: str, text: bool, level: int, module, args, kwargs, output):
        """An MMDiT block's hook: Δ of the image tokens (output − input, ``[b, N, C]`` on the token
        grid) or, at ``<block>.context``, of the text tokens (``[b, T, C]``, grid ``(1, T)``). The
        block takes ``hidden_states`` (image) and ``encoder_hidden_states`` (text), as keywords from
        the diffusers models, positionally under gradient checkpointing, and returns (text, image)."""
        active = [iv for iv in self.block_interventions.get(site, []) if iv.active(self.state)]
        if not active:
            return None
        if text:
            x = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        else:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        index = 0 if text else 1
        y = output[index]
        delta = y - x
        n = delta.shape[1]
        grid = (1, n) if text else token_grid(self.state.grid(level), n)
        call = Call(site, "block", self.state, self.state.branch_codes(delta.shape[0], delta.device), grid, module, delta=delta)
        new = run_stage(active, delta, call)
        if new is delta:
            return None
        out = list(output)
        out[index] = x + new.to(x.dtype)
        return tuple(out)


_CONTEXT = ".context"  # the suffix of a text-stream site (activations.sites)


# --------------------------------------------------------------------------------------------
# entry points


def current_tap(model) -> Tap | None:
    """The Tap attached to ``model``'s denoiser, if any (``attach``)."""
    return getattr(denoiser_of(model), _TAP_ATTR, None)


@contextlib.contextmanager
def attach(model, pipe=None) -> Iterator[Tap]:
    """Install (or reuse) the Tap of a denoiser (``model``: a U-Net or an MMDiT transformer, or a
    pipeline holding one); restores the original processors on the last exit."""
    denoiser = denoiser_of(model)
    tap = getattr(denoiser, _TAP_ATTR, None)
    if tap is None:
        tap = Tap(denoiser, pipe)
        tap.install()
        object.__setattr__(denoiser, _TAP_ATTR, tap)
    elif pipe is not None and tap.pipe is None:
        tap.pipe = pipe
        tap._hook_scheduler()
    tap.refcount += 1
    try:
        yield tap
    finally:
        tap.refcount -= 1
        if tap.refcount == 0:
            object.__delattr__(denoiser, _TAP_ATTR)
            tap.remove()


@contextlib.contextmanager
def intervene(model, *interventions: Intervention, prompts: Sequence[str] | None = None) -> Iterator[Tap]:
    """Apply ``interventions`` to ``model`` (a pipeline, a U-Net or an MMDiT transformer) inside the block::

        with intervene(pipe, HeadEdit(site=s, heads=[3], tokens=[2], scale=-2.0, when="early")):
            pipe(prompt)

    Each intervention is resolved against the model before anything is attached (checked, and
    expanded when it spans sites, like an HRV edit); ``prompts``: the coming generations' prompts,
    one per image, for edits that name a token by its word. The original processors and hooks come
    back when the block exits, also after an exception.
    """
    denoiser = denoiser_of(model)
    with attach(denoiser, model if model is not denoiser else None) as tap, tap.add(*interventions, prompts=prompts):
        yield tap
