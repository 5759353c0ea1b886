"""``diffatlas train``: a LightningCLI over ``LitSAE`` and ``ActivationDataModule``.

    diffatlas train --config configs/sae/topk.yaml --data.store runs/harvest --data.site mid_block.attentions.0
    diffatlas train --config configs/sae/topk.yaml --ckpt_path <checkpoint>.ckpt    # resume
    diffatlas train --help                                                          # every option, documented

Options come from the init arguments of LitSAE (``--model.*``), ActivationDataModule
(``--data.*``) and Lightning's Trainer (``--trainer.*``); their docstrings are the help text. One
run trains one SAE per combination of ``--data.site``, ``--data.window`` and ``--data.branch``
(each one value or a list), or per entry of ``--data.saes``; each site is read once for all of its
SAEs. Each SAE is written at the end to ``<model.save_dir>/<site>[__<window>][__<branch>]/``
(default save_dir: <trainer.default_root_dir>/sae).

    diffatlas train --config configs/sae/tinaz-grid.yaml      # 3 sites x 3 windows x 2 branches: 18 SAEs

W&B: the default logger is a WandbLogger in offline mode unless the environment sets WANDB_MODE
(then that mode applies, e.g. ``online`` or ``disabled``). The run goes to
``<trainer.default_root_dir>/wandb/`` and the resolved config to
``<trainer.default_root_dir>/config.yaml`` (default root: runs/sae); give each run its own root to
keep its config. Rows skipped as NaN or inf are logged as ``data/nonfinite_rows`` and, when any
were, printed at the end. Multi-GPU / multi-node: the usual ``--trainer.devices`` /
``--trainer.num_nodes`` / ``--trainer.strategy ddp``.
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
            # null: the run goes under --trainer.default_root_dir (SAECLI.before_instantiate_classes)
            "save_dir": None,
            # Offline unless the user chose a mode: tests and laptops never reach the network.
            "offline": "WANDB_MODE" not in os.environ,
        },
    }
    return {
        "default_root_dir": DEFAULT_ROOT,
        "max_epochs": 1,
        "logger": logger,
        "enable_model_summary": False,  # a one-module table; --trainer.enable_model_summary true shows it
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

        def parse_arguments(self, parser, args) -> None:
            # ``args`` is the whole command line already: LightningCLI's own version would also
            # look at sys.argv (``diffatlas train ...``) and warn that it got both.
            self.config = parser.parse_args(args)

        def before_instantiate_classes(self) -> None:
            # A W&B run without its own save_dir lives under default_root_dir, and so does the
            # saved config.yaml (Lightning writes it to the first logger's save_dir).
            logger = self.config.trainer.logger
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "save_dir" in init_args and init_args.save_dir is None:
                init_args.save_dir = self.config.trainer.default_root_dir or DEFAULT_ROOT

    return SAECLI(
        LitSAE,
        ActivationDataModule,
        run=run,
        args=argv,
        seed_everything_default=0,
        trainer_defaults=_trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        # Parse errors raise (one line from the dispatcher) instead of printing the whole usage.
        parser_kwargs={"prog": "diffatlas train", "description": "Train a sparse autoencoder on harvested activations.",
                       "exit_on_error": False},
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = build_cli(argv)
    trainer, model = cli.trainer, cli.model
    if any(type(logger).__name__ == "WandbLogger" for logger in trainer.loggers):
        from common.quiet import quiet_libraries

        quiet_libraries(wandb=True)
    trainer.fit(model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    if trainer.global_rank == 0:
        for k, path in enumerate(model.saved):
            print(f"SAE saved to {path}")
            pre = model.prefix(k)
            for key in ("metrics/fvu", "metrics/l0", "sparsity/dead_fraction_val", "metrics/fraction_recovered"):
                if pre + key in model.last_val_metrics:
                    print(f"  {key} = {model.last_val_metrics[pre + key]:.4f}")
        skipped = int(trainer.callback_metrics.get("data/nonfinite_rows", cli.datamodule.nonfinite_rows))
        if skipped:
            print(f"skipped {skipped} rows holding NaN or inf (--data.nonfinite skip; use --data.nonfinite error "
                  f"to stop at the first one)")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                run_dir = getattr(logger.experiment, "dir", None)
                if run_dir:
                    print(f"W&B run files: {Path(run_dir).parent}")
                import wandb

                wandb.finish()  # complete on disk when train returns; a next run in this process is its own
    return 0


if __name__ == "__main__":
    sys.exit(main())
