"""``LitSAE``: trains ``SparseCoder``s with Lightning (CPU, one GPU, DDP over GPUs and nodes).

One run trains one SAE per part of its ``ActivationDataModule`` (a site x window x branch; one
part is the usual single SAE). Each SAE is an ``SAEMember``: its coder, input scale and counters,
its own Adam parameter group (Adam's moments are per parameter), learning-rate schedule (on its
own step count), gradient clipping, W&B namespace ``<folder name>/`` (none for a run of one) and
folder. A batch holds one site's rows and trains the SAEs whose rows it holds, so each site is
read once for all of its SAEs (Tinaz et al. 2025 train 18 per model; sparsify trains many hook
points in one run). A run's SAE starts from the same weights, sees the same batches and ends with
the same weights as the same SAE trained alone (tests/test_sae_many.py). DDP over a run of
several SAEs needs ``--trainer.strategy ddp_find_unused_parameters_true``: a batch leaves the
other sites' SAEs without gradients.

Training recipe (each a documented init argument, hence a ``diffatlas train`` option):
- activations are multiplied by one scalar so that E||x|| = sqrt(d_in) (SAELens; Anthropic's April
  2024 update), estimated on ``init_samples`` training rows; the scalar is folded into the saved
  weights (``SparseCoder.fold_input_scale``), so saved SAEs take raw activations;
- b_dec starts at the geometric median of that sample (Bricken et al. 2023; Gao et al. 2024 use
  it too), or its mean;
- W_enc = W_dec^T at init, unit-norm decoder rows, gradient parallel to the rows removed before
  each step (``SparseCoder``);
- Adam with Gao et al.'s learning-rate scaling lr = 2e-4 / sqrt(num_latents / 2^14) when ``lr`` is
  not given, linear warm-up, linear decay to 0 over the last ``lr_decay_fraction`` of the run
  (Anthropic, April 2024), gradient-norm clipping at 1 (Gao et al. 2024);
- latents that have not fired for ``dead_tokens_threshold`` tokens feed AuxK.

Feature statistics from the training run (``feature_stats``, on by default): after the last epoch
and the calibration, the SAEs exactly as saved (read back from their folders, on the CPU) encode
every row of their site once more (one read of a site for all of its SAEs), without gradients, and the statistics of ``diffatlas analyze features``
(``sae.stats.compute_feature_stats``: density, profiles, top tokens, co-firing counts) are
accumulated while it encodes; they are saved next to the SAE in ``<sae folder>/feature_stats/``
(``FeatureStats.save``'s files), where ``diffatlas analyze features`` picks them up instead of its
own pass when they match (same weights, store, site, rows, top_k, cooc_top). Why this pass and
not the last training epoch or the validation pass: the weights change at every step of an epoch,
so codes accumulated there are of many SAEs, none the saved one; the validation pass runs in the
normalised space, before the calibration (BatchTopK's threshold) and before the input scale is
folded into the saved weights, so its codes are not bit-equal to the saved SAE's either, and it
covers only the held-out images (capped at ``max_val_rows``). Why every row of the site (not the
training window's or branch's rows): that is what ``diffatlas analyze features`` describes, so
the statistics can stand in for its pass exactly; the pass reads each row once, in the same
contiguous chunks, and replaces the separate pass rather than adding to it.

W&B keys (each under ``<folder name>/`` when the run trains several SAEs): ``losses/*`` (each named loss of the architecture and ``losses/total``), ``train/l0``,
``train/fvu``, ``metrics/fvu``, ``metrics/fvu/{early,middle,late}``, ``metrics/mse``, ``metrics/l0``,
``sparsity/dead_fraction``, ``sparsity/dense_fraction``, ``sparsity/dead_fraction_val``,
histograms ``sparsity/log10_feature_density`` and ``sparsity/decoder_norm``, and
``metrics/fraction_recovered`` (against zero ablation), ``metrics/fraction_recovered_mean_ablation``
and ``metrics/denoising_loss/{clean,sae,zero,mean}``.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.errors import UsageError
from sae.config import SparseCoderConfig
from sae.metrics import (
    FVUAccumulator,
    batch_fvu,
    fraction_recovered,
    log10_density,
    sparsity_stats,
    spread_timesteps,
)
from sae.registry import get_architecture
from sae.sparse_coder import SparseCoder, TrainContext

log = logging.getLogger(__name__)


@dataclass
class RecoveredConfig:
    """Settings of the loss-recovered metric (needs a harvest with images/ and prompts.jsonl)."""

    images: int = 4
    """Validation images noised and denoised per evaluation; 0 disables the metric."""

    timesteps: int = 4
    """Timesteps per image, spread over the harvested ones that fall in the SAE's window."""

    model: str | None = None
    """Pipeline to load with activations.load_pipeline; null means the model named in the store's manifest."""

    seed: int = 0
    """Seed of the noise added to the images."""


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: argmin_y sum_i ||x_i - y|| for x [n, d]."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * max(float(y.norm()), 1.0):
            return y_new
        y = y_new
    return y


def _histogram(values: Tensor, bins: int = 64):
    """np.histogram with a widened range when every value is equal (unit-norm decoder rows are)."""
    import numpy as np

    v = values.detach().double().cpu().numpy()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-6 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5, hi + 0.5
    return np.histogram(v, bins=bins, range=(lo, hi))


# Checkpoints store the hyperparameters, dataclasses included; allow them under torch.load's
# weights_only default so that resuming needs no unsafe unpickling.
torch.serialization.add_safe_globals([SparseCoderConfig, RecoveredConfig])


class SAEMember(nn.Module):
    """One SAE of a run: its coder, its input scale and its running counters (buffers, so a
    checkpoint holds them)."""

    def __init__(self, cfg: SparseCoderConfig, d_in: int):
        super().__init__()
        self.coder = get_architecture(cfg.architecture)(cfg, d_in)
        m = self.coder.num_latents
        self.register_buffer("act_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("act_mean", torch.zeros(d_in))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("window_fire", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("window_tokens", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("total_tokens", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("last_log10_density", torch.full((m,), -10.0))
        # optimiser steps this SAE has taken: its own schedule's clock (a run's global step counts
        # the batches of every site)
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    def normalise(self, x: Tensor) -> Tensor:
        return x.to(self.coder.dtype) * self.act_scale.to(self.coder.dtype)


class LitSAE(pl.LightningModule):
    """Sparse autoencoders trained on a store's activations: one, or one per site x window x
    branch of its ``ActivationDataModule`` (each with its own optimiser state, schedule, metrics
    namespace and folder; the batches of a site are read once for all of its SAEs)."""

    def __init__(
        self,
        sae: SparseCoderConfig = SparseCoderConfig(),  # noqa: B008 - read-only default, shown by --help
        d_in: int = 0,
        lr: float | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 6.25e-10,
        lr_warmup_steps: int = 1000,
        lr_decay_fraction: float = 0.2,
        grad_clip_norm: float = 1.0,
        normalize_activations: bool = True,
        b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median",
        init_samples: int = 16384,
        dense_threshold: float = 0.1,
        histogram_every_n_steps: int = 500,
        save_dir: str | None = None,
        recovered: RecoveredConfig = RecoveredConfig(),  # noqa: B008
        feature_stats: bool = True,
        feature_stats_top_k: int = 16,
        feature_stats_cooc_top: int = 8,
        feature_stats_rows: Literal["site", "trained"] = "site",
    ):
        """
        Args:
            sae: The SAE: architecture, size and sparsity settings (saved as cfg.json); every SAE
                of a run has them (num_latents 0: each its own site's width x expansion_factor).
            d_in: Input width. 0 takes the site's width; a different non-zero value is an error.
            lr: Adam learning rate; null uses Gao et al. 2024's 2e-4 / sqrt(num_latents / 2^14).
            adam_betas: Adam betas (Gao et al. 2024 use 0.9, 0.999).
            adam_eps: Adam epsilon (Gao et al. 2024: 6.25e-10).
            lr_warmup_steps: Linear learning-rate warm-up, capped at 10% of the run.
            lr_decay_fraction: Final fraction of the run over which the learning rate decays linearly to 0.
            grad_clip_norm: Clip the gradient norm to this value (Gao et al. 2024: 1), each SAE's
                own; 0 disables. The Trainer's gradient_clip_val, when set, takes precedence.
            normalize_activations: Scale inputs by one scalar so that E||x|| = sqrt(d_in); folded into
                the saved weights.
            b_dec_init: Initial decoder bias: geometric median or mean of a data sample, or zeros.
            init_samples: Training rows read to estimate the scale and b_dec.
            dense_threshold: A latent firing on more than this fraction of tokens counts as dense.
            histogram_every_n_steps: Steps between feature-density / decoder-norm histograms (the
                density window).
            save_dir: Where the trained SAEs are written at the end of fit (one folder per SAE,
                <site>[__<window>][__<branch>], sparsify / SAELens layout); null means
                <trainer.default_root_dir>/sae.
            recovered: The loss-recovered metric.
            feature_stats: After training, encode every row of each site once with its saved SAEs
                and save their feature statistics in <sae folder>/feature_stats (what diffatlas
                analyze features computes; it reuses them when they match).
            feature_stats_top_k: Top tokens kept per feature in those statistics (analyze features'
                --top_k must equal it for them to be reused).
            feature_stats_cooc_top: Most co-firing features kept per feature in those statistics.
            feature_stats_rows: The rows those statistics describe: site (every row of the site, what
                diffatlas analyze features describes by default) or trained (each SAE's own window
                and branch; analyze features reuses them with --rows trained). trained is cheaper
                for SAEs of part of a site.
        """
        super().__init__()
        for name, value in (("feature_stats_top_k", feature_stats_top_k), ("feature_stats_cooc_top", feature_stats_cooc_top)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be an int >= 1, got {value!r}")
        if feature_stats_rows not in ("site", "trained"):
            raise UsageError(f"feature_stats_rows must be site or trained, got {feature_stats_rows!r}")
        self.sae_cfg = copy.deepcopy(sae) if sae is not None else SparseCoderConfig()
        self.recovered_cfg = copy.deepcopy(recovered) if recovered is not None else RecoveredConfig()
        self.save_hyperparameters()
        self.d_in_arg = d_in
        self.members = nn.ModuleDict()
        self._fvu: dict[int, FVUAccumulator] = {}
        self._val_fire: dict[int, Tensor] = {}
        self._stepped: list[int] = []
        self._pipe = None
        self.last_val_metrics: dict[str, float] = {}
        self.saved: list[Path] = []
        if d_in > 0:
            self._build([d_in])

    # ------------------------------------------------------------------------------- building
    def _build(self, widths: list[int], names: list[str] | None = None) -> None:
        members = {}
        for k, width in enumerate(widths):
            # Each SAE's initial weights come from the run's seed and its own name, not from its
            # place in the run: an SAE of a grid starts where the same SAE trained alone starts.
            name = names[k] if names else "sae"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((torch.initial_seed() + zlib.crc32(name.encode())) % 2**63)
                members[str(k)] = SAEMember(self.sae_cfg, width)
        self.members = nn.ModuleDict(members)

    def member(self, k: int) -> SAEMember:
        return self.members[str(k)]

    @property
    def coder(self) -> SparseCoder | None:
        """The run's SAE, when it trains one (None before it is built)."""
        if len(self.members) == 0:
            return None
        if len(self.members) > 1:
            raise UsageError(f"this run trains {len(self.members)} SAEs; take one with .member(k).coder")
        return self.member(0).coder

    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _parts(self) -> list | None:
        dm = self._datamodule()
        return dm.parts if dm is not None and hasattr(dm, "parts") else None

    def prefix(self, k: int) -> str:
        """The W&B namespace of SAE ``k``: none for a run of one SAE, ``<folder name>/`` otherwise."""
        parts = self._parts()
        return "" if len(self.members) == 1 else f"{parts[k].name if parts else k}/"

    def configure_model(self) -> None:
        dm = self._datamodule()
        parts = self._parts()
        if parts is None:
            if len(self.members) == 0:
                raise ValueError("LitSAE needs d_in > 0 when it is not trained with an ActivationDataModule")
            return
        widths = [dm.width_of(p) for p in parts]
        for part, width in zip(parts, widths):
            if self.d_in_arg and width != self.d_in_arg:
                raise UsageError(
                    f"SAE input width d_in={self.d_in_arg} does not match site {part.site!r} "
                    f"of width {width}; set --model.d_in 0 (use the site's width) or {width}"
                )
        built = [self.member(k).coder.d_in for k in range(len(self.members))]
        if built != widths:
            if built and len(built) == len(widths):  # restored from a checkpoint of another run
                raise UsageError(f"the SAEs' widths {built} do not match the sites' widths {widths}")
            self._build(widths, [p.name for p in parts])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parts = self._parts()
        if parts is not None:
            checkpoint["sae_names"] = [p.name for p in parts]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if "coder.W_dec" in state:  # a one-SAE checkpoint written before runs held several SAEs
            checkpoint["state_dict"] = state = {f"members.0.{k}": v for k, v in state.items()}
        saved, parts = checkpoint.get("sae_names"), self._parts()
        if saved is not None and parts is not None and saved != [p.name for p in parts]:
            raise UsageError(f"the checkpoint trains the SAEs {', '.join(saved)}; this command trains "
                             f"{', '.join(p.name for p in parts)}: resume with the same sites, windows and branches")
        widths = []
        while f"members.{len(widths)}.coder.W_dec" in state:
            widths.append(int(state[f"members.{len(widths)}.coder.W_dec"].shape[1]))
        if len(self.members) == 0:
            self._build(widths)
        elif len(widths) != len(self.members):
            raise UsageError(f"the checkpoint holds {len(widths)} SAE(s); this run trains {len(self.members)}: resume "
                             f"with the same sites, windows and branches")

    # ---------------------------------------------------------------------------------- init
    @torch.no_grad()
    def _initialize_from_data(self, k: int) -> None:
        member = self.member(k)
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "sample"):
            log.warning("no ActivationDataModule: skipping data-based initialisation (scale 1, b_dec 0)")
            member.initialized.fill_(True)
            return
        x = dm.sample(self.hparams.init_samples, part=k).to(self.device)
        d = x.shape[1]
        member.act_mean.copy_(x.mean(0))
        scale = math.sqrt(d) / float(x.norm(dim=-1).mean()) if self.hparams.normalize_activations else 1.0
        member.act_scale.fill_(scale)
        xs = x * scale
        if self.hparams.b_dec_init == "geometric_median":
            member.coder.b_dec.copy_(geometric_median(xs))
        elif self.hparams.b_dec_init == "mean":
            member.coder.b_dec.copy_(xs.mean(0))
        elif self.hparams.b_dec_init == "zeros":
            member.coder.b_dec.zero_()
        else:
            raise UsageError(f"b_dec_init must be geometric_median, mean or zeros, got {self.hparams.b_dec_init!r}")
        member.initialized.fill_(True)

    def on_fit_start(self) -> None:
        if self._world() > 1 and len(self.members) > 1:
            kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
            if kwargs is not None and not kwargs.get("find_unused_parameters"):
                raise UsageError(f"DDP over a run of {len(self.members)} SAEs needs --trainer.strategy "
                                 "ddp_find_unused_parameters_true (each batch trains the SAEs of one site only)")
        for k in range(len(self.members)):
            if not bool(self.member(k).initialized):
                self._initialize_from_data(k)

    # ----------------------------------------------------------------------------- optimiser
    def _total_steps(self) -> int:
        # Computing estimated_stepping_batches may rebuild the dataloader: do it once per fit.
        cached = getattr(self, "_total_steps_cache", None)
        if cached is not None and cached[0] is self._trainer:
            return cached[1]
        try:
            est = self.trainer.estimated_stepping_batches
            total = int(est) if est != float("inf") and est > 0 else 0
        except Exception:  # noqa: BLE001 - an unsized loader: no schedule length known
            total = 0
        self._total_steps_cache = (self._trainer, total)
        return total

    def member_total_steps(self, k: int) -> int:
        """The steps SAE ``k`` is expected to take: the run's, times its site's share of the batches."""
        total = self._total_steps()
        dm = self._datamodule()
        if not total or dm is None or not hasattr(dm, "site_batches") or len(dm.sites) == 1:
            return total
        counts = dm.site_batches(self._world())
        return max(1, round(total * counts[dm.parts[k].site] / max(1, sum(counts.values()))))

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the base learning rate at optimiser step ``step`` of ``total``."""
        warm = min(self.hparams.lr_warmup_steps, int(0.1 * total)) if total else self.hparams.lr_warmup_steps
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if total and self.hparams.lr_decay_fraction > 0:
            decay_start = int(total * (1 - self.hparams.lr_decay_fraction))
            if step >= decay_start:
                return max(0.0, (total - step) / max(1, total - decay_start))
        return 1.0

    def _member_lr_factor(self, k: int, _scheduler_step: int) -> float:
        return self.lr_factor(int(self.member(k).steps), self.member_total_steps(k))

    def base_lr(self, k: int = 0) -> float:
        if self.hparams.lr is not None:
            return float(self.hparams.lr)
        return 2e-4 / math.sqrt(self.member(k).coder.num_latents / 2**14)

    def configure_optimizers(self):
        # One Adam, one parameter group per SAE: Adam's state is per parameter, so each SAE has its
        # own moments, learning rate and schedule; an SAE without rows in a batch has no gradient
        # and is not stepped.
        groups = [{"params": list(self.member(k).coder.parameters()), "lr": self.base_lr(k)}
                  for k in range(len(self.members))]
        opt = torch.optim.Adam(groups, lr=groups[0]["lr"], betas=tuple(self.hparams.adam_betas),
                               eps=self.hparams.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [functools.partial(self._member_lr_factor, k) for k in range(len(self.members))])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        value, algorithm = (gradient_clip_val, gradient_clip_algorithm or "norm") if gradient_clip_val else \
            (self.hparams.grad_clip_norm, "norm")
        if not value or value <= 0:
            return
        for k in self._stepped:  # each SAE clipped on its own gradient
            params = [p for p in self.member(k).coder.parameters() if p.grad is not None]
            if algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, value)
            else:
                torch.nn.utils.clip_grad_norm_(params, value)

    def on_after_backward(self) -> None:
        for k in self._stepped:
            self.member(k).coder.before_optimizer_step()

    def optimizer_step(self, *args, **kwargs):
        out = super().optimizer_step(*args, **kwargs)
        for k in self._stepped:
            self.member(k).coder.after_optimizer_step()
        return out

    # ------------------------------------------------------------------------------ training
    def _world(self) -> int:
        return int(self.trainer.world_size) if self._trainer is not None else 1

    def _group(self):
        return dist.group.WORLD if self._world() > 1 and dist.is_initialized() else None

    @staticmethod
    def _rows(batch: dict[str, Any], idx: Tensor | None, key: str = "acts") -> Tensor:
        """``batch[key]`` at one SAE's rows (``idx``; None: all of them)."""
        return batch[key] if idx is None else batch[key][idx]

    @torch.no_grad()
    def reconstruct(self, x: Tensor, k: int = 0) -> Tensor:
        """Raw activations [..., d] -> raw-space reconstruction of SAE ``k`` with the inference-time encoder."""
        member = self.member(k)
        shape = x.shape
        flat = member.normalise(x.reshape(-1, shape[-1]).to(self.device))
        return (member.coder(flat) / member.act_scale.to(member.coder.dtype)).reshape(shape).to(x.dtype)

    def _parts_of(self, batch: dict[str, Any]) -> dict[int, Tensor | None]:
        return batch["parts"] if "parts" in batch else {0: None}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        group = self._group()
        log_step = self._is_log_step()
        self._stepped = []
        loss = None
        for k, idx in self._parts_of(batch).items():
            member = self.member(k)
            x = member.normalise(self._rows(batch, idx))
            total = self.member_total_steps(k)
            ctx = TrainContext(
                dead_mask=member.tokens_since_fired >= self.sae_cfg.dead_tokens_threshold,
                progress=int(member.steps) / total if total else 1.0,
                process_group=group,
            )
            out = member.coder.train_step(x, ctx)
            self._stepped.append(k)
            loss = out.loss if loss is None else loss + out.loss
            with torch.no_grad():
                self._count(member, out, x.shape[0], group)
                # Scalars are computed and handed to Lightning on logging steps only: the logger
                # writes no others, and per-step metric work is a measurable share of a fast TopK step.
                if log_step:
                    pre = self.prefix(k)
                    logs = {f"{pre}losses/{name}": v.detach() for name, v in out.losses.items()}
                    logs[f"{pre}losses/total"] = out.loss.detach()
                    logs[f"{pre}train/l0"] = out.latents.l0().mean()
                    self.log_dict(logs, prog_bar=False, sync_dist=False)
                    self.log(f"{pre}train/fvu", batch_fvu(x, out.recon.detach()), prog_bar=len(self.members) == 1)
                    if self.global_step > 0:  # dead/dense fractions need more than one batch
                        self._log_sparsity(k)
        if self.hparams.histogram_every_n_steps > 0 and (self.global_step + 1) % self.hparams.histogram_every_n_steps == 0:
            for k in range(len(self.members)):
                self._log_histograms(k)
        return loss

    @torch.no_grad()
    def _count(self, member: SAEMember, out, n_rows: int, group) -> None:
        fire = out.latents.fire_counts().double()
        n = torch.tensor(float(n_rows), dtype=torch.float64, device=fire.device)
        if group is not None:
            dist.all_reduce(fire)
            dist.all_reduce(n)
        member.tokens_since_fired += n
        member.tokens_since_fired[fire > 0] = 0
        member.window_fire += fire
        member.window_tokens += n
        member.total_tokens += n
        member.steps += 1

    def _is_log_step(self) -> bool:
        every = getattr(self.trainer, "log_every_n_steps", 50) or 50
        return self.global_step == 0 or (self.global_step + 1) % every == 0

    def _log_sparsity(self, k: int) -> None:
        member = self.member(k)
        dead_after = min(float(self.sae_cfg.dead_tokens_threshold), float(member.total_tokens))
        stats = sparsity_stats(member.window_fire, float(member.window_tokens), member.tokens_since_fired,
                               dead_after, self.hparams.dense_threshold)
        self.log_dict({f"{self.prefix(k)}sparsity/{name}": v for name, v in stats.items()})

    def _log_histograms(self, k: int) -> None:
        member = self.member(k)
        if member.window_tokens <= 0:
            return
        density = log10_density(member.window_fire, float(member.window_tokens))
        member.last_log10_density.copy_(density)
        member.window_fire.zero_()
        member.window_tokens.zero_()
        norms = member.coder.W_dec.detach().norm(dim=-1).float().cpu()
        pre = self.prefix(k)
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger" and self.global_rank == 0:
                import wandb

                logger.experiment.log({
                    f"{pre}sparsity/log10_feature_density": wandb.Histogram(np_histogram=_histogram(density)),
                    f"{pre}sparsity/decoder_norm": wandb.Histogram(np_histogram=_histogram(norms)),
                    "trainer/global_step": self.global_step,
                })

    @torch.no_grad()
    def _calibrate(self, k: int) -> None:
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "sample"):
            return
        member = self.member(k)
        batch = int(dm.batch_size) * self._world()
        x = member.normalise(dm.sample(max(self.hparams.init_samples, batch), seed=dm.seed + 1, part=k).to(self.device))
        member.coder.calibrate(x, min(batch, x.shape[0]))

    def on_train_epoch_end(self) -> None:
        # Rows skipped as NaN / inf so far (summed over ranks): visible in W&B, not only in the checkpoint.
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "nonfinite_rows"):
            self.log("data/nonfinite_rows", float(dm.nonfinite_rows), reduce_fx="sum", sync_dist=True)

    def on_train_end(self) -> None:
        # Every rank computes the same calibration (same sample), so weights stay identical.
        for k in range(len(self.members)):
            self._calibrate(k)
            self._log_histograms(k)
        if self.global_rank == 0:
            self.saved = [self.save_trained(k=k) for k in range(len(self.members))]
            for path in self.saved:
                log.info("saved SAE to %s", path)
            if self.hparams.feature_stats:
                self.save_feature_stats(self.saved)

    def save_feature_stats(self, paths: list[str | Path] | str | Path, *, progress: bool = False) -> list[Path]:
        """Encode every row of each site once with the SAEs saved in ``paths`` (one per SAE of the
        run, in order; read back, CPU, no gradients) and save each one's feature statistics in
        ``<path>/feature_stats`` (see the module doc). Each site is read once for all of its SAEs;
        nothing without an ActivationDataModule."""
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "parts"):
            return []
        from sae.stats import ROWS_SITE, SAE_STATS_DIR, compute_feature_stats, trained_rows

        paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        out = []
        for site in dm.sites:
            ks = dm.parts_of(site)
            reader = dm.site_reader(site)
            saes = [SparseCoder.from_pretrained(paths[k]) for k in ks]
            if self.hparams.feature_stats_rows == "trained":
                rows, rows_of = map(list, zip(*(trained_rows(reader, sae.placement) for sae in saes)))
            else:
                rows, rows_of = None, ROWS_SITE
            stats = compute_feature_stats(saes, reader, rows=rows, rows_of=rows_of,
                                          top_k=self.hparams.feature_stats_top_k,
                                          cooc_top=self.hparams.feature_stats_cooc_top, progress=progress,
                                          store_root=str(Path(dm.store_path).resolve()))
            for k, one in zip(ks, stats):
                one.info["from"] = "training"
                out.append(one.save(paths[k] / SAE_STATS_DIR))
                log.info("saved feature statistics to %s", out[-1])
        return out

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._fvu = {k: FVUAccumulator(self.member(k).coder.d_in, device=self.device) for k in range(len(self.members))}
        self._val_fire = {k: torch.zeros(self.member(k).coder.num_latents, dtype=torch.float64, device=self.device)
                          for k in range(len(self.members))}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for k, idx in self._parts_of(batch).items():
            member = self.member(k)
            x = member.normalise(self._rows(batch, idx))
            latents = member.coder.encode(x)
            recon = member.coder.decode(latents)
            self._fvu[k].update(x, recon, self._rows(batch, idx, "tau").to(x.device), latents.l0())
            self._val_fire[k] += latents.fire_counts().double()

    def on_validation_epoch_end(self) -> None:
        for k in range(len(self.members)):
            self._fvu[k].reduce()
            if self._world() > 1 and dist.is_initialized():
                dist.all_reduce(self._val_fire[k])
            pre = self.prefix(k)
            metrics = {f"{pre}metrics/{name}": v for name, v in self._fvu[k].compute().items()}
            metrics[f"{pre}sparsity/dead_fraction_val"] = float((self._val_fire[k] == 0).double().mean())
            self.log_dict(metrics, sync_dist=False)
            self.last_val_metrics.update(metrics)
            if self.recovered_cfg.images > 0 and not self.trainer.sanity_checking:
                rec = self._loss_recovered(k) if self.global_rank == 0 else None
                if rec:
                    rec = {f"{pre}{name}": v for name, v in rec.items()}
                    self.log_dict(rec, rank_zero_only=True)
                    self.last_val_metrics.update(rec)

    # -------------------------------------------------------------------------- loss recovered
    def _loss_recovered(self, k: int) -> dict[str, float] | None:
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "parts"):
            return None
        root = Path(dm.store_path)
        if not (root / "images").is_dir() or not (root / "prompts.jsonl").exists():
            log.info("store %s has no images/ or prompts.jsonl: skipping metrics/fraction_recovered", root)
            return None
        cfg = self.recovered_cfg
        part = dm.parts[k]
        reader = dm.site_reader(part.site)
        val_images = sorted({int(i) for i in reader.meta_column("image")[dm.part_rows(k, "val")]})[: cfg.images]
        if not val_images:
            return None
        manifest = reader.manifest
        timesteps = [int(t) for t in manifest.get("timesteps", [])]
        if part.window is not None:
            n_train = int(manifest.get("num_train_timesteps", 1000))
            steps = manifest.get("steps", list(range(len(timesteps))))
            keep = part.window.mask(np.asarray(steps), np.asarray(timesteps), n_train)
            timesteps = [t for t, ok in zip(timesteps, keep) if ok]
        timesteps = spread_timesteps(timesteps, cfg.timesteps)
        if not timesteps:
            return None
        pipe = self._pipeline(cfg.model or manifest.get("model"))
        from activations.edits import Ablate
        from activations.evaluate import evaluate

        sae = self.export_sae(k)
        sae.placement = self.placement(k)
        site, stage = sae.placement.site, sae.placement.stage
        mean = _as_stage_value(self.member(k).act_mean.detach().cpu(), stage, manifest)
        sets = {
            "clean": [],
            "sae": [sae.splice(error_term=False)],
            "zero": [Ablate(site=site, stage=stage)],
            "mean": [Ablate(site=site, stage=stage, value=mean)],
        }
        losses = evaluate(pipe, sets, store=root, images=val_images, timesteps=timesteps, seed=cfg.seed)
        out = {f"metrics/denoising_loss/{name}": v for name, v in losses.items()}
        out["metrics/fraction_recovered"] = fraction_recovered(losses["clean"], losses["sae"], losses["zero"])
        out["metrics/fraction_recovered_mean_ablation"] = fraction_recovered(losses["clean"], losses["sae"], losses["mean"])
        return out

    @property
    def pipeline(self):
        """The diffusers pipeline used by the loss-recovered metric (loaded on first use from
        ``recovered.model`` or the store's manifest); assign one to use it instead."""
        return self._pipe

    @pipeline.setter
    def pipeline(self, pipe) -> None:
        self._pipe = pipe

    def _pipeline(self, model: str):
        if self._pipe is None:
            from activations import load_pipeline
            from activations.families import denoiser_of

            self._pipe = load_pipeline(model)
            denoiser_of(self._pipe).requires_grad_(False)
        return self._pipe

    # ----------------------------------------------------------------------------- export
    def export_sae(self, k: int = 0) -> SparseCoder:
        """A copy of SAE ``k`` that takes raw activations (normaliser folded in), on the CPU."""
        member = self.member(k)
        sae = copy.deepcopy(member.coder).cpu()
        sae.fold_input_scale(float(member.act_scale))
        return sae

    def placement(self, k: int = 0):
        """Where SAE ``k`` belongs (site, stage, window, branch, model), from its data module."""
        from sae.config import Placement

        scale = float(self.member(k).act_scale)
        parts = self._parts()
        if parts is None:
            return Placement(normalizer_folded=scale)
        dm, part = self._datamodule(), parts[k]
        manifest = dm.site_reader(part.site).manifest
        return Placement(
            site=part.site, stage="block" if manifest.get("kind", "block") in ("block", "synthetic") else "heads",
            window=part.window_spec, branch=part.branch, model=manifest.get("model"),
            model_revision=manifest.get("model_revision"), normalizer_folded=scale,
        )

    def save_folder_name(self, k: int = 0) -> str:
        """``<site>[__<window>][__<branch>]`` (``Placement.folder_name``)."""
        return self.placement(k).folder_name

    def save_trained(self, path: str | Path | None = None, k: int = 0) -> Path:
        """Write SAE ``k`` in raw space (sae.safetensors, cfg.json, sparsity.safetensors); returns its folder."""
        if path is None:
            root = self.hparams.save_dir or str(Path(self.trainer.default_root_dir) / "sae")
            path = Path(root) / self.save_folder_name(k)
        dm = self._datamodule()
        member = self.member(k)
        extra: dict[str, Any] = {"trained_tokens": int(member.total_tokens)}
        if dm is not None and hasattr(dm, "store_path"):
            extra["store"] = str(dm.store_path)
        if self._trainer is not None:
            # provenance: how this SAE was trained (the run's whole config is <default_root_dir>/config.yaml)
            extra["training"] = {"lr": self.base_lr(k), "steps": int(member.steps),
                                 "batch_size": int(getattr(dm, "batch_size", 0) or 0),
                                 "seed": int(getattr(dm, "seed", 0) or 0), "run": str(self.trainer.default_root_dir),
                                 "saes_in_run": len(self.members)}
        sae = self.export_sae(k)
        sae.placement = self.placement(k)
        return sae.save_pretrained(path, sparsity=member.last_log10_density.cpu(), extra=extra)


def _as_stage_value(mean: Tensor, stage: str, manifest: dict) -> Tensor:
    """A site's mean row [width] in the layout of its stage: [h, 1, d] for per-head outputs."""
    if stage == "heads":
        heads = int(manifest.get("heads", 1))
        return mean.reshape(heads, 1, -1)
    return mean
