"""Many SAEs from one read of the store: one `diffatlas train` run of N SAEs against N runs of one.

Harvests the bundled toy model (``--prompts`` toy-world prompts, ``--steps`` steps, every step,
conditional branch) at ``--sites`` (3 block sites), then times, as a user runs them (each a
`diffatlas train` process with configs/sae/topk.yaml, W&B offline, checkpoints and the
training-pass feature statistics on, the loss-recovered metric off as it loads the pipeline):

- ``grid``: one run with ``--data.site [3 sites] --data.window [early, late]`` (N = 6 SAEs);
- ``separate``: the same 6 SAEs as 6 runs of one SAE each;
- ``grid_nostats``: the grid run with ``--model.feature_stats false``.

The statistics describe every row of each site (``--stats-rows site``, what ``diffatlas analyze
features`` describes by default) or each SAE's own rows (``--stats-rows trained``).

Rounds are interleaved (the order of the three rotates) and repeated ``--repeats`` times; each
figure is the median over rounds of a per-round ratio:
- ``many_over_single`` = grid / separate (goal <= 0.5);
- ``stats_overhead`` = grid / grid_nostats - 1: the extra time the feature statistics add to a
  training run (goal <= 0.10).

Last line JSON: {"grid_s", "separate_s", "grid_nostats_s", "n_saes", "stats_overhead", "many_over_single"}.

    OMP_NUM_THREADS=2 python benchmarks/many_saes.py [--prompts 64 --steps 20 --epochs 2 --repeats 3]
    OMP_NUM_THREADS=2 python benchmarks/many_saes.py --stats-rows trained
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toyworld.benchmarks import check_sites

REPO = Path(__file__).resolve().parent.parent
SITES = ["down_blocks.1.attentions.0", "up_blocks.1.attentions.0", "up_blocks.2.attentions.0"]
WINDOWS = ["early", "late"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def train(store: Path, root: Path, args, *, sites: list[str], windows: list, stats: bool = True) -> float:
    """Seconds of one `diffatlas train` process training one SAE per site x window."""
    cmd = [sys.executable, "-m", "diffatlas", "train", "--config", str(REPO / "configs/sae/topk.yaml"),
           "--data.store", str(store), "--data.site", json.dumps(sites), "--data.window", json.dumps(windows),
           "--data.branch", "cond", "--data.batch_size", str(args.batch),
           "--model.sae.expansion_factor", str(args.expansion), "--model.sae.k", str(args.k),
           "--model.lr_warmup_steps", "50", "--model.recovered.images", "0",
           "--model.feature_stats", "true" if stats else "false", "--model.feature_stats_rows", args.stats_rows,
           "--trainer.max_epochs", str(args.epochs), "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", str(root)]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"many_saes.py: error: diffatlas train failed:\n{proc.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=_positive, default=64, help="toy-world prompts harvested (one image each)")
    p.add_argument("--steps", type=_positive, default=20, help="denoising steps per image (all captured)")
    p.add_argument("--sites", nargs="+", default=SITES, help="block sites (one SAE per site x window)")
    p.add_argument("--batch", type=_positive, default=1024, help="rows of a site per training batch")
    p.add_argument("--expansion", type=_positive, default=8)
    p.add_argument("--k", type=_positive, default=32)
    p.add_argument("--epochs", type=_positive, default=2)
    p.add_argument("--stats-rows", choices=("site", "trained"), default="site",
                   help="rows the training-pass statistics describe (--model.feature_stats_rows): every row of the "
                        "site, or each SAE's own window and branch")
    p.add_argument("--repeats", type=_positive, default=3, help="interleaved rounds (the median is reported)")
    args = p.parse_args(argv)
    from common.quiet import quiet_libraries

    quiet_libraries()
    check_sites("toy", args.sites, Path(__file__).name, "--sites")

    from activations.config import HarvestConfig, PromptSource
    from activations.harvest import harvest

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = tmp / "harvest"
        t0 = time.perf_counter()
        harvest(HarvestConfig(model="toy", out=str(store), sites=list(args.sites),
                              prompts=PromptSource(kind="toyworld", num_prompts=args.prompts),
                              num_inference_steps=args.steps, branch="cond", batch_size=16,
                              images_per_shard=32, seed=0))
        harvest_s = time.perf_counter() - t0
        n = len(args.sites) * len(WINDOWS)
        kinds = ["grid", "separate", "grid_nostats"]
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(args.repeats):
            for kind in kinds[r % 3:] + kinds[: r % 3]:  # rotate the order each round
                root = tmp / f"{kind}{r}"
                if kind == "separate":
                    times[kind].append(sum(train(store, root / f"{s}_{w}", args, sites=[s], windows=[w])
                                           for s in args.sites for w in WINDOWS))
                else:
                    times[kind].append(train(store, root, args, sites=list(args.sites), windows=WINDOWS,
                                             stats=kind == "grid"))
                print(json.dumps({"round": r, "run": kind, "seconds": round(times[kind][-1], 2)}), file=sys.stderr)
        over = [g / s for g, s in zip(times["grid"], times["separate"])]
        stats = [g / b - 1 for g, b in zip(times["grid"], times["grid_nostats"])]
        print(json.dumps({"settings": vars(args), "harvest_s": round(harvest_s, 1),
                          **{f"{k}_s_rounds": [round(t, 2) for t in v] for k, v in times.items()},
                          "many_over_single_rounds": [round(x, 3) for x in over],
                          "stats_overhead_rounds": [round(x, 3) for x in stats]}))
        print(json.dumps({"grid_s": round(statistics.median(times["grid"]), 2),
                          "separate_s": round(statistics.median(times["separate"]), 2),
                          "grid_nostats_s": round(statistics.median(times["grid_nostats"]), 2), "n_saes": n,
                          "stats_overhead": round(statistics.median(stats), 3),
                          "many_over_single": round(statistics.median(over), 3)}))
    return 0


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
