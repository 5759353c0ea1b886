"""``train_quick``: train one SAE on a store from Python, e.g. for ``diffatlas demo``.

    from sae import train_quick
    path, metrics = train_quick("runs/demo/harvest", site="mid_block.attentions.0", out="runs/demo/sae")

Same recipe as ``diffatlas train`` (LitSAE + ActivationDataModule) with small-run settings; W&B
offline unless WANDB_MODE is set. Returns the SAE folder and the last validation metrics (plus
``wandb_dir`` when a W&B run was written).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def train_quick(store: str, site: str | None = None, *, out: str = "runs/sae", architecture: str = "topk",
                expansion_factor: int = 8, k: int = 16, batch_size: int = 1024, epochs: int = 2,
                window: str | None = None, wandb: bool = True, pipeline=None, recovered_images: int = 4,
                seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Train one SAE on ``site`` of ``store`` and save it under ``out``; returns (folder, metrics)."""
    import lightning.pytorch as pl

    from sae.config import SparseCoderConfig
    from sae.data import ActivationDataModule
    from sae.lit import LitSAE, RecoveredConfig

    pl.seed_everything(seed, verbose=False)
    dm = ActivationDataModule(store, site=site, window=window, batch_size=batch_size, seed=seed)
    dm.setup()
    model = LitSAE(
        SparseCoderConfig(architecture=architecture, expansion_factor=expansion_factor, k=k,
                          dead_tokens_threshold=max(10 * batch_size, len(dm.train_ids) // 4)),
        lr_warmup_steps=50, init_samples=8192, histogram_every_n_steps=100,
        recovered=RecoveredConfig(images=recovered_images, timesteps=4), save_dir=out,
    )
    if pipeline is not None:
        model.pipeline = pipeline
    logger = False
    if wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project="diffatlas", save_dir=out, offline="WANDB_MODE" not in os.environ)
        from common.quiet import quiet_libraries

        quiet_libraries(wandb=True)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu" if not _cuda() else "auto", logger=logger,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=out, log_every_n_steps=max(1, min(50, len(dm.train_ids) // batch_size)))
    trainer.fit(model, datamodule=dm)
    metrics = dict(getattr(model, "last_val_metrics", {}))
    if logger:
        metrics["wandb_dir"] = str(Path(logger.experiment.dir).parent)
        import wandb as wb

        wb.finish()
    return Path(out) / model.save_folder_name(), metrics


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
