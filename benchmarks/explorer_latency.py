"""Explorer latency: an edited image and a new generation with its head grid, against plain generation.

    python benchmarks/explorer_latency.py                       # toy model, CPU, small settings
    python benchmarks/explorer_latency.py --steps 25 --repeats 6

Three things are timed, interleaved in one process (each repeat runs them in a rotated order, so
drifting machine load hits all alike), on the same prompt, seed, steps and guidance:

* ``plain``: ``activations.generate.sample`` without interventions;
* ``grid``: what ``POST /api/generate`` + the first ``GET /api/grid`` do: a generation with an
  ``Observe`` at stage ``probs`` on every attn2 site (the maps of every head, step and token copied
  to the CPU as float16), the PNG, and one grid view served from that cache;
* ``edit``: what ``POST /api/edit`` does: a -2 ``HeadEdit`` on 8 heads over a quarter of the
  patches, drawn through its recipe, with the PNGs of the image and its difference.

Each repeat gives one ratio per kind (time / plain of that repeat); we report the medians of those
paired ratios, their min and max, and the median seconds. Goals (issue 14): both ratios <= 1.5.
The last line is JSON with the headline figures last: {..., "edit_over_plain", "grid_over_plain"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


PROMPT = "a red circle in the top left on a blue background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from activations.generate import sample
    from activations.pipeline import load_pipeline
    from steering.explorer.session import EditSpec, Explorer, png_base64

    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model, device=args.device)
    explorer = Explorer(pipe, model=args.model, keep=2)
    gen0 = explorer.generate(PROMPT, 0, args.steps, args.guidance)
    H, W = explorer.select_grid
    quarter = [i * W + j for i in range(H // 2) for j in range(W // 2)]
    spec = EditSpec(gen=gen0.id, heads=list(range(0, len(explorer.head_table), max(1, len(explorer.head_table) // 8)))[:8],
                    patches=quarter, factor=-2.0)

    def plain():
        image = sample(pipe, [PROMPT], [0], steps=args.steps, guidance=args.guidance).images[0]
        png_base64(image)

    def grid():
        gen = explorer.generate(PROMPT, 0, args.steps, args.guidance)
        png_base64(gen.image)
        explorer.grid(gen.id, args.steps - 1, 2)

    def edit():  # edits the newest generation (older ones drop out of the explorer's memory)
        spec.gen = next(reversed(explorer.generations))
        explorer.edit(spec)

    kinds = {"plain": plain, "grid": grid, "edit": edit}
    for fn in kinds.values():  # warm-up: first calls pay for lazy imports and allocator growth
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    names = list(kinds)
    for r in range(args.repeats):
        order = names[r % 3:] + names[: r % 3]
        for name in order:
            t0 = time.perf_counter()
            kinds[name]()
            seconds[name].append(time.perf_counter() - t0)
    ratios = {k: [t / p for t, p in zip(seconds[k], seconds["plain"])] for k in ("grid", "edit")}
    out = {
        "model": args.model, "steps": args.steps, "guidance": args.guidance, "repeats": args.repeats,
        "device": args.device, "heads": len(explorer.head_table), "threads": torch.get_num_threads(),
        "seconds_median": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
        "ratio_range": {k: [round(min(v), 3), round(max(v), 3)] for k, v in ratios.items()},
        "edit_over_plain": round(statistics.median(ratios["edit"]), 3),
        "grid_over_plain": round(statistics.median(ratios["grid"]), 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
