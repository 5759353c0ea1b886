"""ActivationDataModule and LitSAE on bad input: width mismatch, empty stores, NaN / inf rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from activations.store import SiteWriter, write_synthetic_store  # noqa: E402
from sae.config import SparseCoderConfig  # noqa: E402
from sae.data import ActivationDataModule  # noqa: E402
from sae.lit import LitSAE, RecoveredConfig  # noqa: E402
from sae.synthetic import write_sparse_store  # noqa: E402


def _trainer(tmp_path, **kw):
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw)


def _model(**kw):
    return LitSAE(SparseCoderConfig(num_latents=32, k=4), lr_warmup_steps=1, init_samples=256,
                  recovered=RecoveredConfig(images=0), **kw)


def test_data__split_is_by_image_and_filters_by_window(tmp_path):
    write_sparse_store(tmp_path / "s", n=1024, d=8, images=8, timesteps=(999, 500, 100))
    dm = ActivationDataModule(str(tmp_path / "s"), window="early", val_fraction=0.25, batch_size=16)
    dm.setup()
    images = dm.reader.meta_column("image")
    assert not set(images[dm.train_ids]) & set(images[dm.val_ids])
    assert np.all(dm.reader.meta_column("t")[np.concatenate([dm.train_ids, dm.val_ids])] == 999)
    batch = next(iter(dm.train_dataloader()))
    assert batch["acts"].shape == (16, 8) and torch.allclose(batch["tau"], torch.full((16,), 0.999))


def test_data__epochs_shuffle_across_images(tmp_path):
    write_sparse_store(tmp_path / "s", n=512, d=8, images=8)
    dm = ActivationDataModule(str(tmp_path / "s"), batch_size=64, val_fraction=0.0)
    dm.setup()
    images = dm.reader.meta_column("image")
    first = next(iter(dm.train_dataloader()))
    assert len(set(images[first["rows"].numpy()])) >= 6  # one batch mixes most images
    assert not np.array_equal(dm.epoch_order(0), dm.epoch_order(1))


def test_bad_input__sae_width_different_from_site_width_is_refused(tmp_path):
    write_sparse_store(tmp_path / "s", n=512, d=8)
    dm = ActivationDataModule(str(tmp_path / "s"), batch_size=32)
    with pytest.raises(ValueError, match=r"d_in=12 does not match site 'mid_block.attentions.0' of width 8"):
        _trainer(tmp_path, max_steps=1).fit(_model(d_in=12), datamodule=dm)


def test_bad_input__empty_site_is_refused(tmp_path):
    SiteWriter(tmp_path / "s", "mid_block.attentions.0", width=8, grid=(1, 1), header={"model": "x"})
    dm = ActivationDataModule(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="is empty"):
        dm.setup()


def test_bad_input__filter_that_leaves_no_rows_names_the_filter_and_what_exists(tmp_path):
    write_sparse_store(tmp_path / "s", n=256, d=8, timesteps=(999,))
    dm = ActivationDataModule(str(tmp_path / "s"), window="late")
    with pytest.raises(ValueError, match=r"no rows .* match window='late'.*tau in \[0.999\]"):
        dm.setup()


def test_bad_input__store_with_several_sites_needs_a_site(tmp_path):
    write_sparse_store(tmp_path / "s", n=256, d=8, site="a")
    write_sparse_store(tmp_path / "s", n=256, d=8, site="b")
    with pytest.raises(ValueError, match="choose one with --data.site, valid: a, b"):
        ActivationDataModule(str(tmp_path / "s")).setup()
    with pytest.raises(ValueError, match="site 'c' is not in store"):
        ActivationDataModule(str(tmp_path / "s"), site="c").setup()


def _nan_store(root):
    acts = torch.randn(256, 8)
    acts[37, 2] = float("nan")
    acts[100, 0] = float("inf")
    meta = {"image": np.arange(256) // 32, "step": np.zeros(256, int), "t": np.full(256, 500)}
    write_synthetic_store(root, "site", acts, meta)


def test_bad_input__nonfinite_rows_are_counted_and_skipped(tmp_path):
    _nan_store(tmp_path / "s")
    dm = ActivationDataModule(str(tmp_path / "s"), batch_size=32, val_fraction=0.0, nonfinite="skip")
    model = _model()
    _trainer(tmp_path, max_epochs=1).fit(model, datamodule=dm)
    assert dm.nonfinite_rows == 2
    assert all(torch.isfinite(p).all() for p in model.coder.parameters())


def test_bad_input__nonfinite_error_mode_names_the_first_offending_row(tmp_path):
    _nan_store(tmp_path / "s")
    dm = ActivationDataModule(str(tmp_path / "s"), batch_size=256, val_fraction=0.0, nonfinite="error")
    dm.setup()
    with pytest.raises(ValueError, match=r"non-finite activation \(NaN or inf\) in row 37 .*image 1"):
        next(iter(dm.train_dataloader()))


def test_bad_input__invalid_options_name_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match="nonfinite must be 'skip' or 'error', got 'drop'"):
        ActivationDataModule("x", nonfinite="drop")
    with pytest.raises(ValueError, match="unknown timestep window 'dawn'"):
        write_sparse_store(tmp_path / "s", n=64, d=8)
        ActivationDataModule(str(tmp_path / "s"), window="dawn").setup()


def test_windows_and_branches_have_one_home_in_activations_timesteps(tmp_path, monkeypatch):
    import activations.timesteps as timesteps
    from sae.metrics import FVUAccumulator

    # the branch names and their order are the store's (activations.timesteps.BRANCHES)
    with pytest.raises(ValueError, match=r"valid branches: uncond, cond, or null"):
        ActivationDataModule("x", branch="both")
    # the window table in messages and the per-window FVU follow activations.timesteps.WINDOWS
    monkeypatch.setitem(timesteps.WINDOWS, "late", (0.0, 0.3))
    write_sparse_store(tmp_path / "s", n=256, d=8, timesteps=(999,))
    with pytest.raises(ValueError, match=r"valid windows: early \[0.6, 1\], middle \[0.2, 0.6\), late \[0, 0.3\)"):
        ActivationDataModule(str(tmp_path / "s"), window="late").setup()
    acc = FVUAccumulator(2)
    x = torch.randn(4, 2)
    acc.update(x, x, torch.tensor([0.25, 0.25, 0.1, 0.7]))
    assert acc.count[acc.groups.index("late")] == 3
