"""Library notices silenced at their source, in one place: commands print our own lines only.

Every line named here is about the libraries' set-up, never about the user's input: transformers'
note that torchvision is missing (diffatlas uses no image processor), Lightning's set-up lines
(accelerators found, its cloud-logger advert, why fit stopped) and a deprecation inside Lightning
itself, wandb's banner, summary and its "anonymous setting" / git-root messages, and the "Loading
weights" / "Loading pipeline components" bars shown while a model loads. Real warnings (a prompt
truncated to the text encoder's length, too few batches for the logging interval, a NaN) still
come through.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# logger name -> substrings of the records it drops
_LIGHTNING_SETUP = ("GPU available:", "TPU available:", "HPU available:", "litlogger", "litmodels",
                    "to estimate number of stepping batches", "`Trainer.fit` stopped", "Seed set to")
_DROPPED: dict[str, tuple[str, ...]] = {
    "transformers.utils.import_utils": ("requires torchvision",),
    **{f"{package}.utilities.{module}": _LIGHTNING_SETUP
       for package in ("lightning.pytorch", "lightning.fabric") for module in ("rank_zero", "seed")},
}
# warnings raised inside a library about its own use of another (message regex)
_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropMessages(logging.Filter):
    def __init__(self, needles: tuple[str, ...]):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.needles)


def quiet_libraries(*, wandb: bool = False) -> None:
    """Silence the notices above; cheap, idempotent, and safe to call before or after the imports.

    The dispatcher calls it before any command; ``load_pipeline`` calls it once diffusers and
    transformers are imported, which is when their loading bars can be switched off; code about
    to start a W&B run passes ``wandb=True``."""
    # wandb reads these when it is set up: no banner or summary, no git probe of the run folder.
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    for name, needles in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(needles))
    for pattern in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if wandb or "wandb" in sys.modules:
        import wandb as wandb_module

        # W&B runs offline unless the user chose a mode. Said here, in the environment, because a
        # wandb set up before the run (below) asks for an API key whatever mode the run passes.
        os.environ.setdefault("WANDB_MODE", "offline")
        # Set up now, so that WANDB_SILENT already applies when a run checks its settings:
        # Lightning's WandbLogger passes anonymous=None, which wandb warns about otherwise.
        wandb_module.setup()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    if "transformers" in sys.modules:
        import huggingface_hub.utils as hub
        from transformers.utils import logging as transformers_logging

        # transformers switches the hub's download bars off with its own: keep those (a real
        # model's download takes minutes), unless the user had disabled them already.
        hub_bars = not hub.are_progress_bars_disabled()
        transformers_logging.disable_progress_bar()
        if hub_bars:
            hub.enable_progress_bars()
