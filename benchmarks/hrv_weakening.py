"""Does the HRV order find the heads that carry each toy concept? Ordered weakening on the toy model.

    python benchmarks/hrv_weakening.py [--hrv-prompts 100] [--images 40] [--points 6] [--steps 25]
    python benchmarks/hrv_weakening.py --hrv-words alone --no-hrv-sink   # Park et al.'s construction
    python benchmarks/hrv_weakening.py --model toy-mmdit                  # the toy MMDiT (24 heads)

1. HRVs of the seven toy attributes (configs/concepts/toy.yaml) from ``--hrv-prompts`` toy prompts
   (toyworld.prompts.scene_to_prompt on sampled scenes; the same pass as generation);
2. for each attribute, heads weakened (attention on the prompt's semantic tokens x -2, every step;
   Park et al., ICLR 2025, Section 4) in MoRHF, LeRHF and a seeded random order; at 0 heads,
   ``--points`` counts between and all 52 heads (the toy MMDiT: 24), ``--images`` one-object toy prompts are drawn (the
   same prompts and noise at every point, one pipeline call per point) and the pixel oracle says
   whether it still reads the prompt's value of the attribute.
A = area under that survival curve over the fraction of heads weakened, in [0, 1]. Goal: for every
attribute A_LeRHF - A_MoRHF > 0 and A_random - A_MoRHF > 0, with >= 40 images per point, in <= 30
minutes on a 2-core CPU (7 x 3 x 6 points x 40 + 2 x 40 shared = 5,120 images at 25 steps).
Curves: <out>/weakening_curves.png. Last line: {"concepts": {name: {"area_between", "area_vs_random"}},
"all_positive", "images_per_point", ..., "model"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from activations.config import PromptSource
from analysis.config import HRVConfig
from analysis.construct import build_hrv, load_model
from analysis.toy import ToyOracleScorer
from analysis.weakening import save_results, summary, run_weakening
from common.files import claim_folder
from toyworld.benchmarks import run_record


def hrv_folder(args) -> str:
    """Each HRV construction in its own folder (a rerun resumes it; another config is refused)."""
    return "hrv" if args.hrv_words == "alone" and not args.hrv_sink else f"hrv_{args.hrv_words}{'_sink' * args.hrv_sink}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy", help="a toy-world model: toy (U-Net, 52 heads) or toy-mmdit (24 heads)")
    p.add_argument("--hrv-prompts", type=int, default=100, help="toy prompts for the HRVs")
    # default: the construction that agrees best with what heads read on held-out prompts
    # (hrv_in_context.py on HRVs of other prompts: in_context + sink 27 of 52 heads, alone 9; README)
    p.add_argument("--hrv-words", default="in_context", choices=["alone", "in_context"],
                    help="HRV concept words read where the HRV prompts name them, or encoded alone (Park et al.)")
    p.add_argument("--hrv-sink", action=argparse.BooleanOptionalAction, default=True,
                    help="the start token joins every HRV contest, for no concept")
    p.add_argument("--weaken-tokens", default="semantic", choices=["semantic", "all_but_start"],
                   help="tokens whose attention a weakened head loses: the prompt's words (Park et al.), or also "
                        "the end and padding tokens")
    p.add_argument("--images", type=int, default=40, help="images per point")
    p.add_argument("--points", type=int, default=6, help="head counts strictly between 0 and all heads")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (HRVs and weakening)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--concepts", default="", help="comma-separated subset of the toy concepts (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/hrv_weakening")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    claim_folder(args.out, run_record(__file__, args), prog=Path(__file__).name)  # another run's folder: refused

    t0 = time.perf_counter()
    out = Path(args.out)
    cfg = HRVConfig(model=args.model, concepts="toy", prompts=PromptSource(kind="toyworld", num_prompts=args.hrv_prompts),
                    prompt_seed=args.seed, steps=args.steps, guidance=args.guidance, batch_size=25,
                    out=str(out / hrv_folder(args)), words=args.hrv_words, sink=args.hrv_sink, device=args.device,
                    progress=False, wandb=False)
    pipe = load_model(cfg, args.model)
    hrv = build_hrv(cfg, pipe)
    t_hrv = time.perf_counter() - t0
    print(f"HRVs from {args.hrv_prompts} prompts in {t_hrv:.0f}s", file=sys.stderr)
    concepts = [c for c in args.concepts.split(",") if c] or None
    scorer = ToyOracleScorer()
    results = run_weakening(hrv, pipe, scorer, concepts, images_per_point=args.images, points=args.points,
                            seed=args.seed + 1, steps=args.steps, guidance=args.guidance, batch_size=args.images,
                            tokens=args.weaken_tokens)
    head = summary(results, args.images)
    seconds = time.perf_counter() - t0
    save_results(results, out, scorer.ylabel, {"summary": head, "steps": args.steps, "seconds": seconds})
    print(f"{'concept':<11} {'A_MoRHF':>8} {'A_LeRHF':>8} {'A_random':>8} {'LeRHF-MoRHF':>12} {'random-MoRHF':>13}", file=sys.stderr)
    for c, r in results.items():
        print(f"{c:<11} {r['MoRHF']['area']:>8.3f} {r['LeRHF']['area']:>8.3f} {r['random']['area']:>8.3f} "
              f"{r['area_between']:>+12.3f} {r['area_vs_random']:>+13.3f}", file=sys.stderr)
    print(f"curves: {(out / 'weakening_curves.png').resolve()}", file=sys.stderr)
    print(json.dumps({**head, "steps": args.steps, "hrv_prompts": args.hrv_prompts, "seconds": round(seconds, 1),
                      "model": args.model}))
    return 0


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
