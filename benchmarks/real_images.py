"""Real images on the toy world: toy renders inverted, drawn again, and edited, scored by the pixel
oracle (toyworld.oracle) against the scenes they render.

    python benchmarks/real_images.py                        # 100 held-out scenes, the model's steps
    python benchmarks/real_images.py --scenes 8 --steps 10  # a quick check

Scenes: ``--scenes`` one-object scenes never drawn by any other benchmark (seed ``--seed`` + 7),
plain texture and a corner position (so that "make it striped" and "move it" have somewhere to
go), rendered exactly and captioned canonically (every attribute named). Each render is inverted
(``activations.invert``: DDIM or Euler inversion with ``--refine`` fixed-point refinements, no
guidance) with its caption and then:

* reconstruction: drawn again unedited; per attribute, the share read back as rendered (goal
  >= 0.95 each);
* edits, each drawn from the same inverted noise (goal: success >= 0.8 with >= 0.9 of the other
  attributes kept):
  - recolour: the caption with another colour word (a random other colour);
  - striped: the caption with "striped" for "plain";
  - move: a spatial SAE feature edit in the early window to the opposite quadrant (the object's
    features, as ``steering_eval.py`` picks them, set to β·‖Z_ij‖ there and 0 elsewhere;
    Tinaz et al.), drawn with the caption; success: the oracle reads an object there, and not
    where it was;
  - move_unsaid: the same edit, drawn with the caption that leaves the position unsaid (as
    ``steering_eval.py``'s spatial cell, where the words do not hold the object in place).

``kept``: the share of the other attributes (of shape, colour, texture, size, position,
background, style: all but the edited one) read as rendered, over all images. The SAE (TopK at
``--site``) is built inside unless ``--sae`` gives one. ``<out>/real_images.png``: renders,
reconstructions and each edit for the first scenes. Last line JSON, headline last:
{"model", "scenes", "steps", "refine", "seconds", "reconstruction": {attribute: accuracy},
"edits": {name: {"success", "kept"}}}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from common.files import claim_folder
from toyworld.benchmarks import check_sites, default_sites, run_record

# a sibling script, importable because Python puts a script's own folder first on sys.path
from steering_eval import OPPOSITE, QUADS, build_sae, pick_features, without_position  # the steering cells' pieces

ATTRIBUTES = ("shape", "color", "texture", "size", "position", "background", "style")
SHOWN = 6


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="a toy-world model: toy (U-Net) or toy-mmdit")
    ap.add_argument("--scenes", type=int, default=100, help="held-out scenes rendered, inverted and edited")
    ap.add_argument("--steps", type=int, default=None, help="inversion and drawing steps (default: the model's)")
    ap.add_argument("--refine", type=int, default=3, help="fixed-point refinements per inversion step")
    ap.add_argument("--site", default=None, help="block site of the move edit's SAE (default: the model's)")
    ap.add_argument("--sae", default=None, help="SAE folder for --site (default: harvest and train one)")
    ap.add_argument("--harvest-prompts", type=int, default=64)
    ap.add_argument("--select-prompts", type=int, default=32, help="images used to pick the object's features")
    ap.add_argument("--features", type=int, default=4, help="features of the move edit")
    ap.add_argument("--spatial-beta", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench/real_images")
    args = ap.parse_args()
    prog = Path(__file__).name
    for name in ("scenes", "batch", "features", "harvest_prompts", "select_prompts"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.refine < 0 or (args.steps is not None and args.steps < 1):
        ap.error("--refine must be >= 0 and --steps >= 1")
    args.site = args.site or default_sites(args.model, "block", prog, "--site")
    check_sites(args.model, args.site, prog, "--site")
    return args


def held_out_scenes(n: int, seed: int):
    """One-object scenes, plain and in a corner, from a seed no other benchmark draws."""
    from toyworld.scene import Scene, sample_scene

    rng = np.random.default_rng([seed, 7])
    out = []
    for _ in range(n):
        s = sample_scene(rng, num_objects=1, split="train")
        obj = dataclasses.replace(s.objects[0], texture="plain", position=QUADS[int(rng.integers(4))])
        out.append(Scene((obj,), s.background, s.style))
    return out


def score(scenes, images, skip: str | None = None) -> dict[str, list[bool]]:
    """Per attribute (all but ``skip``), whether the oracle reads it as in ``scenes``."""
    from toyworld.oracle import check_image

    out = {a: [] for a in ATTRIBUTES if a != skip}
    for s, im in zip(scenes, images):
        read = check_image(s, im)
        for a in out:
            out[a].append(bool(read.get(a, False)))
    return out


def kept_share(scores: dict[str, list[bool]]) -> float:
    flags = [v for values in scores.values() for v in values]
    return round(float(np.mean(flags)), 4) if flags else float("nan")


def main() -> None:
    args = parse_args()
    claim_folder(args.out, run_record(__file__, args), prog=Path(__file__).name)
    from PIL import Image

    from activations.invert import Inversion, invert
    from activations.pipeline import load_pipeline, model_defaults
    from sae import SAE
    from steering import FeatureEdit, steer
    from toyworld.oracle import read_positions
    from toyworld.prompts import scene_to_prompt
    from toyworld.render import render
    from toyworld.vocab import COLORS

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    defaults = model_defaults(pipe)
    steps = args.steps or defaults["num_inference_steps"]
    sae_folder = args.sae or build_sae(args, pipe, steps, defaults["guidance_scale"])
    feats = pick_features(args, pipe, SAE.from_pretrained(sae_folder), steps, defaults["guidance_scale"])["object"]

    sc = held_out_scenes(args.scenes, args.seed)
    rng = np.random.default_rng([args.seed, 8])
    renders = [render(s).image for s in sc]
    captions = [scene_to_prompt(s) for s in sc]
    unsaid = [without_position(s) for s in sc]
    recolour = [dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], color=str(rng.choice(
        [c for c in COLORS if c != s.objects[0].color]))),)) for s in sc]
    striped = [dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], texture="striped"),)) for s in sc]
    targets = [OPPOSITE[s.objects[0].position] for s in sc]
    drawn: dict[str, list[np.ndarray]] = {name: [] for name in ("reconstruction", "recolour", "striped")}
    moved_images: dict[str, dict[int, np.ndarray]] = {}
    for lo in range(0, len(sc), args.batch):
        part = list(range(lo, min(lo + args.batch, len(sc))))
        inv = invert(pipe, [renders[i] for i in part], [captions[i] for i in part], steps, refine=args.refine)

        def draw(inverted, prompts, *edits):
            with steer(pipe, *edits, prompts=prompts):
                return [np.asarray(im) for im in inverted.sample(pipe, prompts).images]

        drawn["reconstruction"] += draw(inv, [captions[i] for i in part])
        drawn["recolour"] += draw(inv, [scene_to_prompt(recolour[i]) for i in part])
        drawn["striped"] += draw(inv, [scene_to_prompt(striped[i]) for i in part])
        for q in QUADS:  # one edit per target quadrant (a region is shared by a batch)
            local = [k for k, i in enumerate(part) if targets[i] == q]
            if not local:
                continue
            edit = FeatureEdit(sae=sae_folder, features=feats, op="spatial", strength=args.spatial_beta,
                               region={"quadrant": q}, when="early")
            subset = Inversion(inv.latents[local], inv.steps, inv.guidance, inv.sampler)
            for name, words in (("move", captions), ("move_unsaid", unsaid)):
                for k, im in zip(local, draw(subset, [words[part[k]] for k in local], edit)):
                    moved_images.setdefault(name, {})[part[k]] = im
        print(f"{part[-1] + 1}/{len(sc)} scenes", file=sys.stderr)
    for name in ("move", "move_unsaid"):
        drawn[name] = [moved_images[name][i] for i in range(len(sc))]

    recon = score(sc, drawn["reconstruction"])
    edits = {}
    for name, truth, attr in (("recolour", recolour, "color"), ("striped", striped, "texture")):
        s = score(truth, drawn[name])
        edits[name] = {"success": round(float(np.mean(s.pop(attr))), 4), "kept": kept_share(s)}
    for name in ("move", "move_unsaid"):
        moved = [t in read_positions(im) and s.objects[0].position not in read_positions(im)
                 for s, t, im in zip(sc, targets, drawn[name])]
        edits[name] = {"success": round(float(np.mean(moved)), 4), "kept": kept_share(score(sc, drawn[name], skip="position"))}

    out = Path(args.out)
    rows = [renders[:SHOWN]] + [drawn[k][:SHOWN] for k in ("reconstruction", "recolour", "striped", "move", "move_unsaid")]
    h, w = renders[0].shape[:2]
    grid = Image.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(Image.fromarray(im), (c * w, r * h))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(out / "real_images.png")
    print(json.dumps({"model": args.model, "scenes": len(sc), "steps": steps, "refine": args.refine, "site": args.site,
                      "features": feats, "seconds": round(time.perf_counter() - t0, 1),
                      "figure": str(out / "real_images.png"),
                      "reconstruction": {a: round(float(np.mean(v)), 4) for a, v in recon.items()},
                      "edits": edits}))


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
