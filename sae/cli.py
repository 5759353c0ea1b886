"""``diffatlas train``: a LightningCLI over ``LitSAE`` and ``ActivationDataModule``.

    diffatlas train --config configs/sae/topk.yaml --data.store runs/harvest --data.site mid_block.attentions.0
    diffatlas train --config configs/sae/topk.yaml --ckpt_path <checkpoint>.ckpt    # resume
    diffatlas train --help                                                          # every option, documented

Options come from the init arguments of LitSAE (``--model.*``), ActivationDataModule
(``--data.*``) and Lightning's Trainer (``--trainer.*``); their docstrings are the help text. One
run trains one SAE (one site, one timestep window or all timesteps pooled); train one per window
by running once per ``--data.window``. The SAE is written at the end to
``<model.save_dir>/<site>[__<window>]/`` (default save_dir: <trainer.default_root_dir>/sae).

W&B: the default logger is a WandbLogger in offline mode unless the environment sets WANDB_MODE
(then that mode applies, e.g. ``online`` or ``disabled``). Multi-GPU / multi-node: the usual
``--trainer.devices`` / ``--trainer.num_nodes`` / ``--trainer.strategy ddp``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_ROOT = "runs/sae"


def _trainer_defaults() -> dict:
    logger = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {
            "project": "diffatlas",
            "save_dir": DEFAULT_ROOT,
            # Offline unless the user chose a mode: tests and laptops never reach the network.
            "offline": "WANDB_MODE" not in os.environ,
        },
    }
    return {
        "default_root_dir": DEFAULT_ROOT,
        "max_epochs": 1,
        "logger": logger,
    }


def build_cli(argv: list[str] | None, run: bool = False):
    """Parse ``argv`` and instantiate model, data and trainer (not fitted)."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from sae.data import ActivationDataModule
    from sae.lit import LitSAE

    # Dataclass field docstrings (SparseCoderConfig, RecoveredConfig) become --help text.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class SAECLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--ckpt_path", type=str | None, default=None,
                                help="Lightning checkpoint to resume training from (model, optimiser, data position).")

    return SAECLI(
        LitSAE,
        ActivationDataModule,
        run=run,
        args=argv,
        seed_everything_default=0,
        trainer_defaults=_trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "diffatlas train", "description": "Train a sparse autoencoder on harvested activations."},
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = build_cli(argv)
    trainer, model = cli.trainer, cli.model
    trainer.fit(model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    if trainer.global_rank == 0:
        root = model.hparams.save_dir or str(Path(trainer.default_root_dir) / "sae")
        print(f"SAE saved to {Path(root) / model.save_folder_name()}")
        metrics = getattr(model, "last_val_metrics", {})
        for key in ("metrics/fvu", "metrics/l0", "sparsity/dead_fraction_val", "metrics/fraction_recovered"):
            if key in metrics:
                print(f"{key} = {metrics[key]:.4f}")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                run_dir = getattr(logger.experiment, "dir", None)
                if run_dir:
                    print(f"W&B run files: {Path(run_dir).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
