"""Shared helpers of the harvester's tests (test_sites/processor/trace/harvest/store)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def synthetic_rows(n_images=6, steps=(0, 1, 2), ts=(900, 500, 100), grid=(4, 4), width=8, branches=(1,), seed=0):
    """Acts + meta of a fake harvest: every image x step x branch x position, in harvest order."""
    rng = np.random.default_rng(seed)
    h, w = grid
    rows = []
    for img in range(n_images):
        for s, t in zip(steps, ts):
            for br in branches:
                for p in range(h * w):
                    rows.append((img, s, t, br, p // w, p % w))
    rows = np.array(rows)
    meta = {"image": rows[:, 0], "step": rows[:, 1], "t": rows[:, 2], "branch": rows[:, 3], "i": rows[:, 4], "j": rows[:, 5]}
    acts = rng.standard_normal((len(rows), width)).astype(np.float32)
    return acts, meta


def run_cli(args, env_extra=None, timeout=300, **popen):
    """Run ``python -m diffatlas ...`` in a subprocess (offline, one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    cmd = [sys.executable, "-m", "diffatlas", *args]
    if popen.pop("background", False):
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
