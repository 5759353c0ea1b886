"""`diffatlas train`: a documented LightningCLI that trains, saves and reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        "--data.window WINDOW Timestep window: early",
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
    sae = SAE.from_pretrained(tmp_path / "out" / "mid_block.attentions.0")
    assert sae.architecture == config and sae.d_in == 8
