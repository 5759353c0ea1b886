"""What a wheel holds: the code finds its configs inside its packages, not beside a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LOADS = """
from activations.models import MODEL_CONFIGS, model_config
from analysis.concepts import load_concepts
assert "sd-1.4" in MODEL_CONFIGS, MODEL_CONFIGS
assert model_config("sd-1.4")["unet"]["cross_attention_dim"] == 768
assert model_config("sdxl")["unet"]["cross_attention_dim"] == 2048
assert "color" in load_concepts("toy").names
print("ok")
"""


def test_model_and_concept_configs_load_from_an_installed_copy_outside_the_repo(tmp_path):
    # the packages as a wheel lays them out (package folders only), imported from elsewhere
    site = tmp_path / "site"
    for package in ("common", "activations", "analysis"):
        shutil.copytree(ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", LOADS], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
