"""`diffatlas train`: a documented LightningCLI that trains, saves and reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.sparse_coder import SAE
from sae.synthetic import write_sparse_store

REPO = Path(__file__).resolve().parent.parent


def test_cli__help_documents_every_sae_option():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "diffatlas", "train", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    for needle in [
        "--model.sae.k K Active latents per token",
        "--model.sae.auxk_coefficient",
        "Gao et al. 2024, App. B.1: 1/32",
        "--model.lr_decay_fraction",
        "--model.b_dec_init",
        "--data.window+ WINDOW Timestep window: early",
        "--data.saes SAES",
        "--data.nonfinite",
        "--model.recovered.images",
        "--ckpt_path",
    ]:
        assert needle in text, needle


@pytest.mark.parametrize("config", ["topk", "batchtopk", "relu", "jumprelu"])
def test_cli__each_shipped_config_trains_and_saves_an_sae(tmp_path, config):
    from sae.cli import main

    write_sparse_store(tmp_path / "store", n=512, d=8, images=8)
    rc = main([
        "--config", str(REPO / f"configs/sae/{config}.yaml"),
        "--data.store", str(tmp_path / "store"), "--data.batch_size", "64", "--data.branch", "cond",
        "--model.sae.num_latents", "32", "--model.sae.k", "4", "--model.init_samples", "256",
        "--model.recovered.images", "0", "--model.save_dir", str(tmp_path / "out"),
        "--trainer.logger", "false", "--trainer.max_steps", "4", "--trainer.val_check_interval", "null",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.callbacks", "[]",
    ])
    assert rc == 0
    sae = SAE.from_pretrained(tmp_path / "out" / "mid_block.attentions.0__cond")
    assert sae.architecture == config and sae.d_in == 8


def _train_args(store, root) -> list[str]:
    return ["--data.store", str(store), "--data.batch_size", "32", "--data.val_fraction", "0",
            "--model.sae.num_latents", "16", "--model.sae.k", "2", "--model.init_samples", "64",
            "--model.recovered.images", "0", "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root)]


def test_cli__config_and_wandb_run_go_under_default_root_dir_without_an_args_warning(tmp_path, monkeypatch):
    import warnings

    from sae.cli import main

    pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)  # anything written outside default_root_dir would land here
    write_sparse_store(tmp_path / "store", n=256, d=8, images=8)
    monkeypatch.setattr(sys, "argv", ["diffatlas", "train", "--given", "on", "the", "command", "line"])
    for root in (tmp_path / "a", tmp_path / "b"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(_train_args(tmp_path / "store", root)) == 0
        assert not [w for w in caught if "args" in str(w.message) and "command line" in str(w.message)]
        assert "default_root_dir: " + str(root) in (root / "config.yaml").read_text()
        assert list((root / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "runs").exists()


def test_cli__nonfinite_rows_are_logged_to_wandb_and_printed_at_the_end(tmp_path, capsys):
    from activations.store import write_synthetic_store
    from tests.test_sae_wandb import logged_keys

    pytest.importorskip("wandb")
    from sae.cli import main

    acts = torch.randn(256, 8)
    acts[37, 2], acts[100, 0] = float("nan"), float("inf")
    meta = {"image": np.arange(256) // 32, "step": np.zeros(256, int), "t": np.full(256, 500)}
    write_synthetic_store(tmp_path / "store", "site", acts, meta)
    assert main(_train_args(tmp_path / "store", tmp_path / "run") + ["--trainer.max_steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 rows holding NaN or inf" in out and "--data.nonfinite error" in out, out
    assert "data/nonfinite_rows" in logged_keys(tmp_path / "run" / "wandb")
