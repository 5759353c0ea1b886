"""Killing training and resuming from a Lightning checkpoint reaches the uninterrupted weights."""

from __future__ import annotations

import os

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from sae.config import SparseCoderConfig  # noqa: E402
from sae.data import ActivationDataModule  # noqa: E402
from sae.lit import LitSAE, RecoveredConfig  # noqa: E402
from sae.synthetic import write_sparse_store  # noqa: E402


class _Kill(pl.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at_step:
            raise RuntimeError("killed")


def _fit(store, root, *, kill_at=None, ckpt_path=None, architecture="topk"):
    pl.seed_everything(0)
    dm = ActivationDataModule(str(store), batch_size=64, seed=0)
    model = LitSAE(SparseCoderConfig(architecture=architecture, num_latents=32, k=4, dead_tokens_threshold=256),
                   lr=1e-2, lr_warmup_steps=3, init_samples=512, histogram_every_n_steps=4,
                   recovered=RecoveredConfig(images=0), save_dir=str(root / "sae"))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=5, save_top_k=-1,
                                        filename="{step}")
    callbacks = [ckpt] + ([_Kill(kill_at)] if kill_at else [])
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=2, default_root_dir=root)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_resume__mid_epoch_checkpoint_reaches_uninterrupted_weights(tmp_path, architecture):
    torch.set_num_threads(1)
    store = tmp_path / "store"
    write_sparse_store(store, n=1024, d=8, images=8)  # ~14 training batches per epoch, 2 epochs
    full = _fit(store, tmp_path / "full", architecture=architecture)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(store, tmp_path / "part", kill_at=17, architecture=architecture)
    ckpt = tmp_path / "part" / "ckpt" / "step=15.ckpt"  # the last checkpoint before the kill, in epoch 1
    assert ckpt.exists(), sorted(os.listdir(tmp_path / "part" / "ckpt"))
    resumed = _fit(store, tmp_path / "resumed", ckpt_path=str(ckpt), architecture=architecture)
    assert resumed.global_step == full.global_step
    for (name, a), (_, b) in zip(full.coder.state_dict().items(), resumed.coder.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs after resume")
    torch.testing.assert_close(full.member(0).tokens_since_fired, resumed.member(0).tokens_since_fired)
