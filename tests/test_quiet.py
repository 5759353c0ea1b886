"""Commands print our own lines only: no library set-up notices, adverts or model-loading bars."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOREIGN = ("low_cpu_mem_usage", "torchvision", "litlogger", "anonymous", "git root", "Loading pipeline components",
           "Loading weights", "GPU available", "wandb:", "LeafSpec")


def _run(args: list[str], cwd: Path) -> str:
    # Only what a newcomer's shell would have: none of the silencing variables set by hand, and no
    # W&B mode or API key (runs must go offline by themselves).
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_DISABLE_GIT", "WANDB_MODE", "WANDB_API_KEY")}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    out = subprocess.run([sys.executable, "-m", "diffatlas", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def assert_quiet(text: str) -> None:
    found = [needle for needle in FOREIGN if needle in text]
    assert not found, f"{found} in:\n{text}"


def test_quiet__generate_on_the_toy_model_prints_our_lines_only(tmp_path):
    prompt = "a small blue striped circle at the center on a white background, at night"
    text = _run(["generate", "--prompts", json.dumps([prompt]), "--seeds", "[0]", "--steps", "2",
                 "--out", str(tmp_path / "out")], tmp_path)
    assert_quiet(text)
    assert "wrote 1 images" in text


def test_quiet__train_with_its_wandb_logger_prints_our_lines_only(tmp_path):
    pytest.importorskip("wandb")
    from sae.synthetic import write_sparse_store

    write_sparse_store(tmp_path / "store", n=256, d=8, images=8)
    text = _run(["train", "--data.store", str(tmp_path / "store"), "--data.batch_size", "32",
                 "--model.sae.num_latents", "16", "--model.sae.k", "2", "--model.init_samples", "64",
                 "--model.recovered.images", "0", "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run")],
                tmp_path)  # tmp_path is no git repository: wandb would say so
    assert_quiet(text)
    assert "SAE saved to" in text
