"""``LitSAE``: trains one ``SparseCoder`` with Lightning (CPU, one GPU, DDP over GPUs and nodes).

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
and the calibration, the SAE exactly as saved (read back from its folder, on the CPU) encodes every
row of its site once more, without gradients, and the statistics of ``diffatlas analyze features``
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

W&B keys: ``losses/*`` (each named loss of the architecture and ``losses/total``), ``train/l0``,
``train/fvu``, ``metrics/fvu``, ``metrics/fvu/{early,middle,late}``, ``metrics/mse``, ``metrics/l0``,
``sparsity/dead_fraction``, ``sparsity/dense_fraction``, ``sparsity/dead_fraction_val``,
histograms ``sparsity/log10_feature_density`` and ``sparsity/decoder_norm``, and
``metrics/fraction_recovered`` (against zero ablation), ``metrics/fraction_recovered_mean_ablation``
and ``metrics/denoising_loss/{clean,sae,zero,mean}``.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

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


class LitSAE(pl.LightningModule):
    """A sparse autoencoder trained on one site's activations."""

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
    ):
        """
        Args:
            sae: The SAE: architecture, size and sparsity settings (saved as cfg.json).
            d_in: Input width. 0 takes the site's width; a different non-zero value is an error.
            lr: Adam learning rate; null uses Gao et al. 2024's 2e-4 / sqrt(num_latents / 2^14).
            adam_betas: Adam betas (Gao et al. 2024 use 0.9, 0.999).
            adam_eps: Adam epsilon (Gao et al. 2024: 6.25e-10).
            lr_warmup_steps: Linear learning-rate warm-up, capped at 10% of the run.
            lr_decay_fraction: Final fraction of the run over which the learning rate decays linearly to 0.
            grad_clip_norm: Clip the gradient norm to this value (Gao et al. 2024: 1); 0 disables.
                The Trainer's gradient_clip_val, when set, takes precedence.
            normalize_activations: Scale inputs by one scalar so that E||x|| = sqrt(d_in); folded into
                the saved weights.
            b_dec_init: Initial decoder bias: geometric median or mean of a data sample, or zeros.
            init_samples: Training rows read to estimate the scale and b_dec.
            dense_threshold: A latent firing on more than this fraction of tokens counts as dense.
            histogram_every_n_steps: Steps between feature-density / decoder-norm histograms (the
                density window).
            save_dir: Where the trained SAE is written at the end of fit (one folder per site,
                sparsify / SAELens layout); null means <trainer.default_root_dir>/sae.
            recovered: The loss-recovered metric.
            feature_stats: After training, encode every row of the site once with the saved SAE and
                save its feature statistics in <sae folder>/feature_stats (what diffatlas analyze
                features computes; it reuses them when they match).
            feature_stats_top_k: Top tokens kept per feature in those statistics (analyze features'
                --top_k must equal it for them to be reused).
            feature_stats_cooc_top: Most co-firing features kept per feature in those statistics.
        """
        super().__init__()
        for name, value in (("feature_stats_top_k", feature_stats_top_k), ("feature_stats_cooc_top", feature_stats_cooc_top)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be an int >= 1, got {value!r}")
        self.sae_cfg = copy.deepcopy(sae) if sae is not None else SparseCoderConfig()
        self.recovered_cfg = copy.deepcopy(recovered) if recovered is not None else RecoveredConfig()
        self.save_hyperparameters()
        self.d_in_arg = d_in
        self.coder: SparseCoder | None = None
        self._fvu: FVUAccumulator | None = None
        self._val_fire: Tensor | None = None
        self._pipe = None
        if d_in > 0:
            self._build(d_in)

    # ------------------------------------------------------------------------------- building
    def _build(self, d_in: int) -> None:
        arch = get_architecture(self.sae_cfg.architecture)
        self.coder = arch(self.sae_cfg, d_in)
        m = self.coder.num_latents
        self.register_buffer("act_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("act_mean", torch.zeros(d_in))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("window_fire", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("window_tokens", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("total_tokens", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("last_log10_density", torch.full((m,), -10.0))

    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def configure_model(self) -> None:
        dm = self._datamodule()
        width = dm.width if dm is not None and hasattr(dm, "width") else None
        if self.coder is not None:
            if width is not None and width != self.coder.d_in:
                raise UsageError(
                    f"SAE input width d_in={self.coder.d_in} does not match site {dm.site_name!r} "
                    f"of width {width}; set --model.d_in 0 (use the site's width) or {width}"
                )
            return
        if width is None:
            raise ValueError("LitSAE needs d_in > 0 when it is not trained with an ActivationDataModule")
        self._build(width)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.coder is None:
            self._build(int(checkpoint["state_dict"]["coder.W_dec"].shape[1]))

    # ---------------------------------------------------------------------------------- init
    @torch.no_grad()
    def _initialize_from_data(self) -> None:
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "sample"):
            log.warning("no ActivationDataModule: skipping data-based initialisation (scale 1, b_dec 0)")
            self.initialized.fill_(True)
            return
        x = dm.sample(self.hparams.init_samples).to(self.device)
        d = x.shape[1]
        self.act_mean.copy_(x.mean(0))
        scale = math.sqrt(d) / float(x.norm(dim=-1).mean()) if self.hparams.normalize_activations else 1.0
        self.act_scale.fill_(scale)
        xs = x * scale
        if self.hparams.b_dec_init == "geometric_median":
            self.coder.b_dec.copy_(geometric_median(xs))
        elif self.hparams.b_dec_init == "mean":
            self.coder.b_dec.copy_(xs.mean(0))
        elif self.hparams.b_dec_init == "zeros":
            self.coder.b_dec.zero_()
        else:
            raise UsageError(f"b_dec_init must be geometric_median, mean or zeros, got {self.hparams.b_dec_init!r}")
        self.initialized.fill_(True)

    def on_fit_start(self) -> None:
        if not bool(self.initialized):
            self._initialize_from_data()

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

    def base_lr(self) -> float:
        if self.hparams.lr is not None:
            return float(self.hparams.lr)
        return 2e-4 / math.sqrt(self.coder.num_latents / 2**14)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.coder.parameters(), lr=self.base_lr(), betas=tuple(self.hparams.adam_betas),
                               eps=self.hparams.adam_eps)
        total = self._total_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.lr_factor(step, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif self.hparams.grad_clip_norm > 0:
            self.clip_gradients(optimizer, self.hparams.grad_clip_norm, "norm")

    def on_after_backward(self) -> None:
        self.coder.before_optimizer_step()

    def optimizer_step(self, *args, **kwargs):
        out = super().optimizer_step(*args, **kwargs)
        self.coder.after_optimizer_step()
        return out

    # ------------------------------------------------------------------------------ training
    def _world(self) -> int:
        return int(self.trainer.world_size) if self._trainer is not None else 1

    def normalise(self, x: Tensor) -> Tensor:
        return x.to(self.coder.dtype) * self.act_scale.to(self.coder.dtype)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Raw activations [..., d] -> raw-space reconstruction with the inference-time encoder."""
        shape = x.shape
        flat = self.normalise(x.reshape(-1, shape[-1]).to(self.device))
        return (self.coder(flat) / self.act_scale.to(self.coder.dtype)).reshape(shape).to(x.dtype)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = self.normalise(batch["acts"])
        world = self._world()
        total = self._total_steps()
        ctx = TrainContext(
            dead_mask=self.tokens_since_fired >= self.sae_cfg.dead_tokens_threshold,
            progress=self.global_step / total if total else 1.0,
            process_group=dist.group.WORLD if world > 1 and dist.is_initialized() else None,
        )
        out = self.coder.train_step(x, ctx)
        with torch.no_grad():
            fire = out.latents.fire_counts().double()
            n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
            if ctx.process_group is not None:
                dist.all_reduce(fire)
                dist.all_reduce(n)
            self.tokens_since_fired += n
            self.tokens_since_fired[fire > 0] = 0
            self.window_fire += fire
            self.window_tokens += n
            self.total_tokens += n
            # Scalars are computed and handed to Lightning on logging steps only: the logger writes
            # no others, and per-step metric work is a measurable share of a fast TopK step.
            if self._is_log_step():
                logs = {f"losses/{k}": v.detach() for k, v in out.losses.items()}
                logs["losses/total"] = out.loss.detach()
                logs["train/l0"] = out.latents.l0().mean()
                self.log_dict(logs, prog_bar=False, sync_dist=False)
                self.log("train/fvu", batch_fvu(x, out.recon.detach()), prog_bar=True)
                if self.global_step > 0:  # dead/dense fractions need more than one batch
                    self._log_sparsity()
            if self.hparams.histogram_every_n_steps > 0 and (self.global_step + 1) % self.hparams.histogram_every_n_steps == 0:
                self._log_histograms()
        return out.loss

    def _is_log_step(self) -> bool:
        every = getattr(self.trainer, "log_every_n_steps", 50) or 50
        return self.global_step == 0 or (self.global_step + 1) % every == 0

    def _dead_after(self) -> float:
        return min(float(self.sae_cfg.dead_tokens_threshold), float(self.total_tokens))

    def _log_sparsity(self) -> None:
        stats = sparsity_stats(self.window_fire, float(self.window_tokens), self.tokens_since_fired,
                               self._dead_after(), self.hparams.dense_threshold)
        self.log_dict({f"sparsity/{k}": v for k, v in stats.items()})

    def _log_histograms(self) -> None:
        density = log10_density(self.window_fire, float(self.window_tokens))
        self.last_log10_density.copy_(density)
        self.window_fire.zero_()
        self.window_tokens.zero_()
        norms = self.coder.W_dec.detach().norm(dim=-1).float().cpu()
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger" and self.global_rank == 0:
                import wandb

                logger.experiment.log({
                    "sparsity/log10_feature_density": wandb.Histogram(np_histogram=_histogram(density)),
                    "sparsity/decoder_norm": wandb.Histogram(np_histogram=_histogram(norms)),
                    "trainer/global_step": self.global_step,
                })

    @torch.no_grad()
    def _calibrate(self) -> None:
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "sample"):
            return
        batch = int(dm.batch_size) * self._world()
        x = self.normalise(dm.sample(max(self.hparams.init_samples, batch), seed=dm.seed + 1).to(self.device))
        self.coder.calibrate(x, min(batch, x.shape[0]))

    def on_train_epoch_end(self) -> None:
        # Rows skipped as NaN / inf so far (summed over ranks): visible in W&B, not only in the checkpoint.
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "nonfinite_rows"):
            self.log("data/nonfinite_rows", float(dm.nonfinite_rows), reduce_fx="sum", sync_dist=True)

    def on_train_end(self) -> None:
        # Every rank computes the same calibration (same sample), so weights stay identical.
        self._calibrate()
        if self.window_tokens > 0:
            self._log_histograms()
        if self.global_rank == 0:
            path = self.save_trained()
            log.info("saved SAE to %s", path)
            if self.hparams.feature_stats:
                self.save_feature_stats(path)

    def save_feature_stats(self, path: str | Path, *, progress: bool = False) -> Path | None:
        """Encode every row of the site once with the SAE saved in ``path`` (read back, CPU, no
        gradients) and save its feature statistics in ``path/feature_stats`` (see the module doc);
        None without an ActivationDataModule."""
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "reader"):
            return None
        from sae.stats import SAE_STATS_DIR, compute_feature_stats

        sae = SparseCoder.from_pretrained(path)
        stats = compute_feature_stats(sae, dm.reader, top_k=self.hparams.feature_stats_top_k,
                                      cooc_top=self.hparams.feature_stats_cooc_top, progress=progress,
                                      store_root=str(Path(dm.store_path).resolve()))
        stats.info["from"] = "training"
        out = stats.save(Path(path) / SAE_STATS_DIR)
        log.info("saved feature statistics to %s", out)
        return out

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._fvu = FVUAccumulator(self.coder.d_in, device=self.device)
        self._val_fire = torch.zeros(self.coder.num_latents, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self.normalise(batch["acts"])
        latents = self.coder.encode(x)
        recon = self.coder.decode(latents)
        self._fvu.update(x, recon, batch["tau"].to(x.device), latents.l0())
        self._val_fire += latents.fire_counts().double()

    def on_validation_epoch_end(self) -> None:
        self._fvu.reduce()
        if self._world() > 1 and dist.is_initialized():
            dist.all_reduce(self._val_fire)
        metrics = {f"metrics/{k}": v for k, v in self._fvu.compute().items()}
        metrics["sparsity/dead_fraction_val"] = float((self._val_fire == 0).double().mean())
        self.log_dict(metrics, sync_dist=False)
        self.last_val_metrics = dict(metrics)
        if self.recovered_cfg.images > 0 and not self.trainer.sanity_checking:
            rec = self._loss_recovered() if self.global_rank == 0 else None
            if rec:
                self.log_dict(rec, rank_zero_only=True)
                self.last_val_metrics.update(rec)

    # -------------------------------------------------------------------------- loss recovered
    def _loss_recovered(self) -> dict[str, float] | None:
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "reader"):
            return None
        root = Path(dm.store_path)
        if not (root / "images").is_dir() or not (root / "prompts.jsonl").exists():
            log.info("store %s has no images/ or prompts.jsonl: skipping metrics/fraction_recovered", root)
            return None
        cfg = self.recovered_cfg
        reader = dm.reader
        val_images = sorted({int(i) for i in reader.meta_column("image")[dm.val_ids]})[: cfg.images]
        if not val_images:
            return None
        manifest = reader.manifest
        timesteps = [int(t) for t in manifest.get("timesteps", [])]
        if dm.window is not None:
            n_train = int(manifest.get("num_train_timesteps", 1000))
            steps = manifest.get("steps", list(range(len(timesteps))))
            keep = dm.window.mask(np.asarray(steps), np.asarray(timesteps), n_train)
            timesteps = [t for t, ok in zip(timesteps, keep) if ok]
        timesteps = spread_timesteps(timesteps, cfg.timesteps)
        if not timesteps:
            return None
        pipe = self._pipeline(cfg.model or manifest.get("model"))
        from activations.edits import Ablate
        from activations.evaluate import evaluate

        sae = self.export_sae()
        sae.placement = self.placement()
        site, stage = sae.placement.site, sae.placement.stage
        sets = {
            "clean": [],
            "sae": [sae.splice(error_term=False)],
            "zero": [Ablate(site=site, stage=stage)],
            "mean": [Ablate(site=site, stage=stage, value=_as_stage_value(self.act_mean.detach().cpu(), stage, manifest))],
        }
        losses = evaluate(pipe, sets, store=root, images=val_images, timesteps=timesteps, seed=cfg.seed)
        out = {f"metrics/denoising_loss/{k}": v for k, v in losses.items()}
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
    def export_sae(self) -> SparseCoder:
        """A copy of the SAE that takes raw activations (normaliser folded in), on the CPU."""
        sae = copy.deepcopy(self.coder).cpu()
        sae.fold_input_scale(float(self.act_scale))
        return sae

    def placement(self):
        """Where this SAE belongs (site, stage, window, branch, model), from its data module."""
        from sae.config import Placement

        dm = self._datamodule()
        if dm is None or not hasattr(dm, "reader"):
            return Placement(normalizer_folded=float(self.act_scale))
        manifest = dm.manifest
        return Placement(
            site=dm.site_name, stage="block" if manifest.get("kind", "block") in ("block", "synthetic") else "heads",
            window=dm.window_spec, branch=dm.branch, model=manifest.get("model"),
            model_revision=manifest.get("model_revision"), normalizer_folded=float(self.act_scale),
        )

    def save_folder_name(self) -> str:
        """``<site>`` or ``<site>__<window>`` (the folder is a name for people: loading finds an SAE
        by the site and window in its cfg.json, see ``SAE.from_pretrained``)."""
        placed = self.placement()
        site = placed.site or "sae"
        return site if placed.window is None else f"{site}__{placed.window_label}"

    def save_trained(self, path: str | Path | None = None) -> Path:
        """Write the raw-space SAE (sae.safetensors, cfg.json, sparsity.safetensors); returns its folder."""
        if path is None:
            root = self.hparams.save_dir or str(Path(self.trainer.default_root_dir) / "sae")
            path = Path(root) / self.save_folder_name()
        dm = self._datamodule()
        extra: dict[str, Any] = {"trained_tokens": int(self.total_tokens)}
        if dm is not None and hasattr(dm, "store_path"):
            extra["store"] = str(dm.store_path)
        sae = self.export_sae()
        sae.placement = self.placement()
        return sae.save_pretrained(path, sparsity=self.last_log10_density.cpu(), extra=extra)


def _as_stage_value(mean: Tensor, stage: str, manifest: dict) -> Tensor:
    """A site's mean row [width] in the layout of its stage: [h, 1, d] for per-head outputs."""
    if stage == "heads":
        heads = int(manifest.get("heads", 1))
        return mean.reshape(heads, 1, -1)
    return mean
