"""Steering overhead: plain generation vs the same generation under ``steer``, in one process.

    python benchmarks/steering_overhead.py                    # toy model, CPU
    python benchmarks/steering_overhead.py --prompts 16 --steps 10 --repeats 7
    python benchmarks/steering_overhead.py --model toy-mmdit                 # its site: transformer_blocks.4

Three variants of the same batch (prompts, seeds, steps, guidance):
* plain:  no steering;
* idle:   ``steer`` with one feature edit attached but gated off at every step ({steps: [9999]}),
          i.e. the cost of the hooks and gates alone;
* active: one spatial feature edit (``FeatureEdit(op="spatial")``, via="add") at one block site at
          every step: an SAE encode and a decoder-direction add per call.
The variants run as ``--repeats`` interleaved rounds (the order rotates each round, so a drifting
machine load hits all alike); each round gives the ratios idle / plain and active / plain, and we
report their medians. Goals: idle <= 1.02, active <= 1.10. The SAE is a random TopK SAE
(expansion 8, k 16) of the site's width unless ``--sae`` gives one: the cost does not depend on
what it learned. Last line JSON, headline last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from common.files import claim_folder
from toyworld.benchmarks import default_sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="toy", help="a model name or folder (toy, toy-mmdit, ...)")
    ap.add_argument("--site", default=None,
                    help="the edited block site (default: the model's, toyworld/benchmarks.py; toy: up_blocks.2.attentions.0)")
    ap.add_argument("--sae", default=None, help="an SAE folder for --site (default: a random TopK SAE)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="outputs/bench/steering_overhead")
    args = ap.parse_args()
    args.site = args.site or default_sites(args.model, "block", Path(__file__).name, "--site")
    claim_folder(args.out, {"benchmark": Path(__file__).stem, **vars(args)}, prog=Path(__file__).name)  # another run's folder: refused

    from activations.generate import sample
    from activations.pipeline import load_pipeline, model_defaults
    from activations.sites import list_sites, resolve_sites
    from sae.config import Placement, SparseCoderConfig
    from sae.registry import get_architecture
    from steering import FeatureEdit, steer

    torch.manual_seed(0)
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.sae is None:
        width = resolve_sites(list_sites(pipe), [args.site])[0].width
        sae = get_architecture("topk")(SparseCoderConfig(expansion_factor=8, k=16), width)
        sae.placement = Placement(site=args.site)
        folder = sae.save_pretrained(Path(args.out) / "random_sae")
    else:
        folder = args.sae
    edit = dict(sae=str(folder), features=[0], op="spatial", strength=4.0, region={"quadrant": "top left"})
    idle = FeatureEdit(when={"steps": [9999]}, **edit)
    active = FeatureEdit(**edit)
    prompts = ["a red circle in the top left on a white background" for _ in range(args.prompts)]
    seeds = list(range(args.prompts))
    guidance = model_defaults(pipe)["guidance_scale"]

    def run(name: str) -> float:
        start = time.perf_counter()
        if name == "plain":
            sample(pipe, prompts, seeds, steps=args.steps, guidance=guidance, output_type="latent")
        else:
            with steer(pipe, idle if name == "idle" else active):
                sample(pipe, prompts, seeds, steps=args.steps, guidance=guidance, output_type="latent")
        return time.perf_counter() - start

    names = ["plain", "idle", "active"]
    run("plain")  # warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % 3:] + names[:r % 3]
        for n in order:
            times[n].append(run(n))
    idle_ratio = [i / p for i, p in zip(times["idle"], times["plain"])]
    active_ratio = [a / p for a, p in zip(times["active"], times["plain"])]
    print(json.dumps({"seconds": {n: [round(t, 3) for t in ts] for n, ts in times.items()},
                      "idle_ratios": [round(x, 4) for x in idle_ratio], "active_ratios": [round(x, 4) for x in active_ratio]}))
    print(json.dumps({"model": args.model, "prompts": args.prompts, "steps": args.steps, "repeats": args.repeats, "site": args.site,
                      "plain_median_s": round(statistics.median(times["plain"]), 3),
                      "idle": round(statistics.median(idle_ratio), 4), "active": round(statistics.median(active_ratio), 4)}))


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
