"""What does HRV construction cost over plain generation? (goal: ratio <= 1.25)

    python benchmarks/hrv_cost.py [--prompts 16] [--steps 25] [--repeats 5] [--batch 8]
    python benchmarks/hrv_cost.py --model toy-mmdit   # the toy MMDiT: its HRVs also draw each concept word once

Same toy prompts, seeds, steps and batches: plain generation (the pipeline alone, latent output)
against HRV construction (analysis.construct.build_hrv: word encoding, the voting observers and
the per-batch progress file; latent output too, since HRVs need no pixels). Runs are interleaved
(plain, hrv, plain, hrv, ...) so that load changes hit both alike; the ratio is of the medians.
Last line: {"ratio", "plain_s", "hrv_s", "prompts", "steps", "repeats", "model"}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time

import torch

from activations.config import PromptSource
from activations.generate import sample
from analysis.config import HRVConfig
from analysis.construct import build_hrv, load_model, prompt_texts, sampling_defaults


def plain(pipe, texts: list[str], seeds: list[int], steps: int, guidance: float, batch: int) -> None:
    jobs = [(t, s) for t in texts for s in seeds]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        with torch.no_grad():
            # generate.sample: the pipeline call with the model's call options (the toy MMDiT's text
            # length), as build_hrv draws; on a U-Net the plain pipeline call
            sample(pipe, [t for t, _ in chunk], [s for _, s in chunk], steps=steps, guidance=guidance, output_type="latent")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy", help="a model name: toy (U-Net) or toy-mmdit, ...")
    p.add_argument("--concepts", default="toy", help="concept list (configs/concepts/ name or YAML)")
    p.add_argument("--prompts", type=int, default=16, help="toy prompts (one image each)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=5, help="interleaved plain/hrv repeats (median of each)")
    p.add_argument("--batch", type=int, default=8, help="images per pipeline call")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    cfg = HRVConfig(model=args.model, concepts=args.concepts, prompts=PromptSource(kind="toyworld", num_prompts=args.prompts),
                    steps=args.steps, batch_size=args.batch, device=args.device, progress=False, wandb=False)
    pipe = load_model(cfg, cfg.model)
    steps, guidance = sampling_defaults(pipe, cfg.steps, cfg.guidance)
    texts = prompt_texts(cfg)
    plain(pipe, texts[: args.batch], cfg.seeds, 2, guidance, args.batch)  # warm-up of both paths
    with tempfile.TemporaryDirectory() as tmp:
        warm = dataclasses.replace(cfg, out=tmp, steps=2, prompts=PromptSource(kind="toyworld", num_prompts=min(args.batch, args.prompts)))
        build_hrv(warm, pipe)
    times = {"plain": [], "hrv": []}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        plain(pipe, texts, cfg.seeds, steps, guidance, args.batch)
        times["plain"].append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            cfg.out = tmp
            t0 = time.perf_counter()
            build_hrv(cfg, pipe)
            times["hrv"].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{args.repeats}: plain {times['plain'][-1]:.2f}s, hrv {times['hrv'][-1]:.2f}s", file=sys.stderr)
    plain_s, hrv_s = statistics.median(times["plain"]), statistics.median(times["hrv"])
    print(json.dumps({"ratio": round(hrv_s / plain_s, 4), "plain_s": round(plain_s, 3), "hrv_s": round(hrv_s, 3),
                      "prompts": args.prompts, "steps": steps, "repeats": args.repeats, "model": args.model}))
    return 0


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
