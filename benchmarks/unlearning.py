"""Unlearning one concept value by ablating SAE features (SAeUron: Cywiński & Deja, 2025), scored the
way UnlearnCanvas scores unlearning (Zhang et al., 2024), with the pixel oracle as the classifier.

    python benchmarks/unlearning.py                                   # 3 targets, 100 prompts per measure
    python benchmarks/unlearning.py --prompts 8 --steps 10 --targets striped   # a quick check
    python benchmarks/unlearning.py --model toy-mmdit                 # the toy MMDiT (transformer_blocks.4)

For each target value (default: striped, red, night):

1. Choose features. On selection images (scenes and seeds of their own), half naming the target and
   half another value of its attribute, each feature's activation is averaged per image over the
   patches that show the attribute (the object's patches for an object attribute, every patch for
   background and style) and over the steps of ``--when``. Score: the standardised difference of
   the means, target against the other values (SAeUron ranks features by how much more they fire
   on the concept than off it); the ``--features`` best are taken.
2. Remove. One ``FeatureEdit`` per site of ``--sites`` (one SAE each, its own features) in
   ``--when``: ``--op ablate`` sets the features to 0; ``--op scale`` multiplies them by
   ``--strength`` (SAeUron's negative multiplier: β < 0 pushes the block output away from the
   concept rather than only removing it). Written as a ``diffatlas steer`` recipe
   (``<out>/recipe_<target>.yaml``) and run through ``steering.run_recipe``, which draws each prompt
   unsteered and steered from the same noise.
3. Score, before and after, on ``--prompts`` one-object captions that name everything:
   * UA: captions that ask for the target; share of images that do not show it;
   * IRA: captions that ask for another value of the same attribute; share drawn as asked;
   * CRA: on both sets, the other six attributes; the mean of their accuracies (``cra``; per
     attribute in ``cra_by_attribute``) and the share of images with all six right (``cra_all``).
   Object attributes are read wherever the object is (``analysis.toy.reads_value``).

Goals (SAeUron reports 95.8 / 99.1 / 99.4 for styles on UnlearnCanvas): UA ≥ 0.9, IRA ≥ 0.9,
CRA ≥ 0.95. Writes ``<out>/unlearning_<target>.png`` (top: unsteered, bottom: steered, UA prompts
then IRA prompts) and ``<out>/unlearning_before_after.png`` (every target's, labelled with its UA). Last line JSON: {"model", "targets": {name: {"ua", "ira", "cra", ...}}, "ua_mean",
"ira_mean", "cra_mean"}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common.files import claim_folder
from toyworld.benchmarks import run_record

# a sibling script, importable because Python puts a script's own folder first on sys.path
from steering_eval import build_saes  # the same harvest-and-train as the steering cells

SHOWN = 4  # prompts of each set in the before/after figure


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="unlearning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="striped,red,night", help="concept values to remove, comma-separated")
    ap.add_argument("--prompts", type=int, default=100, help="captions per measure (UA and IRA each)")
    ap.add_argument("--select-prompts", type=int, default=32, help="images that choose the features")
    ap.add_argument("--features", type=int, default=8, help="features removed per target and site")
    ap.add_argument("--when", default="all", help="timestep window of the edit: all, early, middle or late")
    ap.add_argument("--model", default="toy", help="a toy-world model: toy (U-Net) or toy-mmdit")
    ap.add_argument("--sites", default=None,
                    help="block sites edited, comma-separated, or 'all' (every attention block; default: the model's, "
                         "toyworld/benchmarks.py; toy: up_blocks.2.attentions.0)")
    ap.add_argument("--op", default="ablate", choices=("ablate", "scale"),
                    help="ablate: features set to 0; scale: features multiplied by --strength")
    ap.add_argument("--strength", type=float, default=-1.0, help="--op scale: the factor β (SAeUron: negative)")
    ap.add_argument("--sae", default=None, help="SAE folder for a single --sites site (default: harvest and train one)")
    ap.add_argument("--harvest-prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance (default: the model's)")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench/unlearning")
    ap.add_argument("--device", default="cpu", help="torch device of the model (images are the same on any: CPU noise)")
    args = ap.parse_args(argv)
    from activations.timesteps import WINDOWS
    from toyworld.vocab import ATTRIBUTES

    values = {v: a for a, vs in ATTRIBUTES.items() for v in vs}
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in args.targets:
        if t not in values:
            ap.error(f"--targets: unknown value {t!r}; valid: {', '.join(values)}")
    if not args.targets:
        ap.error("--targets is empty; give at least one value, e.g. striped")
    if args.when not in ("all", *WINDOWS):
        ap.error(f"--when {args.when!r}; valid: all, {', '.join(WINDOWS)}")
    for name in ("prompts", "select_prompts", "features", "harvest_prompts", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and not (np.isfinite(args.guidance) and args.guidance >= 1):
        ap.error(f"--guidance must be a finite number >= 1, got {args.guidance}")
    if not np.isfinite(args.strength):
        ap.error(f"--strength must be a finite number, got {args.strength}")
    from toyworld.benchmarks import default_sites, image_block_sites

    if args.sites is None:
        args.sites = default_sites(args.model, "block", ap.prog, "--sites")
    blocks = image_block_sites(args.model)  # the model's architecture, without its weights
    args.sites = blocks if args.sites == "all" else [s.strip() for s in args.sites.split(",") if s.strip()]
    for s in args.sites:
        if s not in blocks:
            ap.error(f"--sites: {s!r} is not a block site of model {args.model!r}; valid: all, {', '.join(blocks)}")
    if not args.sites:
        ap.error("--sites is empty; give a block site, e.g. up_blocks.2.attentions.0, or all")
    if args.sae is not None and len(args.sites) != 1:
        ap.error(f"--sae is the SAE of one site; --sites names {len(args.sites)}")
    args.attribute_of = values
    return args


# -- prompts -----------------------------------------------------------------------------------


def scenes_with(n: int, rng: np.random.Generator, attribute: str, value: str | None, avoid: str | None = None):
    """``n`` one-object scenes whose ``attribute`` is ``value`` (None: any value but ``avoid``)."""
    from toyworld.scene import sample_scene
    from toyworld.vocab import ATTRIBUTES, OBJECT_ATTRIBUTES

    out = []
    for _ in range(n):
        s = sample_scene(rng, num_objects=1)
        v = value if value is not None else rng.choice([x for x in ATTRIBUTES[attribute] if x != avoid])
        if attribute in OBJECT_ATTRIBUTES:
            s = dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], **{attribute: str(v)}),))
        else:
            s = dataclasses.replace(s, **{attribute: str(v)})
        out.append(s)
    return out


# -- feature choice ----------------------------------------------------------------------------


@torch.no_grad()
def choose_features(args, pipe, sae, site: str, attribute: str, target: str, steps: int,
                    guidance: float) -> list[tuple[int, float]]:
    from activations.edits import Observe
    from activations.generate import sample
    from steering import steer
    from toyworld.prompts import scene_to_prompt
    from toyworld.render import patch_coverage, render
    from toyworld.vocab import OBJECT_ATTRIBUTES

    rng = np.random.default_rng([args.seed, 11])
    half = max(1, args.select_prompts // 2)
    sel = scenes_with(half, rng, attribute, target) + scenes_with(half, rng, attribute, None, avoid=target)
    labels = torch.tensor([True] * half + [False] * half)
    prompts = [scene_to_prompt(s, rng) for s in sel]
    seeds = [10_000 + k for k in range(len(sel))]
    means = []  # per image: [latents]
    for start in range(0, len(sel), args.batch):
        chunk = slice(start, start + args.batch)
        sums: list[torch.Tensor] = []

        def grab(x, call):
            rows = call.rows("cond")
            z = sae.encode((x if rows is None else x[rows]).float().reshape(-1, x.shape[-1]).to(sae.device, sae.dtype))
            sums.append(z.to_dense().float().reshape(-1, x.shape[1], sae.num_latents))  # [b, n, f]

        with steer(pipe, Observe(site=site, stage="block", fn=grab, when=args.when, sees="before"),
                   prompts=prompts[chunk]):
            sample(pipe, prompts[chunk], seeds[chunk], steps=steps, guidance=guidance, output_type="latent")
        z_bnf = torch.stack(sums).mean(0)  # mean over the window's steps
        grid = int(round(z_bnf.shape[1] ** 0.5))
        for scene, z_nf in zip(sel[chunk], z_bnf):
            if attribute in OBJECT_ATTRIBUTES:
                cover = torch.from_numpy(patch_coverage(render(scene).masks, grid)[0].reshape(-1))
                where = cover >= min(0.5, float(cover.max()))  # on a coarse grid: the patch it covers most
            else:
                where = torch.ones(z_nf.shape[0], dtype=torch.bool)
            means.append(z_nf[where].mean(0))
    m = torch.stack(means)
    score = (m[labels].mean(0) - m[~labels].mean(0)) / m.std(0).clamp_min(1e-6)
    best = score.argsort(descending=True)[: args.features]
    return [(int(k), round(float(score[k]), 3)) for k in best]


def combined_figure(out: Path, results: dict) -> Path:
    """The per-target before/after grids stacked, each under a line naming the target and its UA
    before and after: the README's picture of what unlearning removed."""
    from PIL import Image, ImageDraw

    grids = [(t, Image.open(out / f"unlearning_{t}.png").convert("RGB")) for t in results]
    label_h = 14
    canvas = Image.new("RGB", (max(g.width for _, g in grids), sum(g.height + label_h for _, g in grids)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for t, g in grids:
        r = results[t]
        draw.text((2, y + 1), f"{t}: UA {r['before']['ua']:.2f} -> {r['ua']:.2f} (top: unsteered, bottom: steered; "
                              "left half asks for it, right half for another value)", fill="black")
        canvas.paste(g, (0, y + label_h))
        y += g.height + label_h
    canvas.save(out / "unlearning_before_after.png")
    return out / "unlearning_before_after.png"


# -- scoring -----------------------------------------------------------------------------------


def rate(flags) -> float:
    return round(float(np.mean(flags)), 4) if len(flags) else float("nan")


def score(images, scenes, attribute: str, others: list[str]) -> dict[str, list[bool]]:
    from analysis.toy import reads_value

    return {a: [reads_value(s, np.asarray(im), a) for s, im in zip(scenes, images)] for a in [attribute, *others]}


def measures(ua_reads, ira_reads, attribute: str, others: list[str]) -> dict:
    cra = {a: rate(ua_reads[a] + ira_reads[a]) for a in others}
    all_right = [all(r[a][k] for a in others) for r in (ua_reads, ira_reads) for k in range(len(r[attribute]))]
    return {"ua": rate([not ok for ok in ua_reads[attribute]]), "ira": rate(ira_reads[attribute]),
            "cra": round(float(np.mean(list(cra.values()))), 4), "cra_all": rate(all_right), "cra_by_attribute": cra}


def main(argv=None) -> dict:
    args = parse_args(argv)
    claim_folder(args.out, run_record(__file__, args), prog=Path(__file__).name)  # another run's folder: refused
    from activations.pipeline import load_pipeline, model_defaults
    from sae.sparse_coder import SparseCoder
    from steering import FeatureEdit, Recipe, run_recipe
    from common.images import before_after_grid
    from toyworld.prompts import scene_to_prompt
    from toyworld.vocab import ATTRIBUTES

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    defaults = model_defaults(pipe)
    steps = args.steps or defaults["num_inference_steps"]
    guidance = args.guidance if args.guidance is not None else defaults["guidance_scale"]
    folders = {args.sites[0]: args.sae} if args.sae else build_saes(args, pipe, steps, guidance, args.sites)
    saes = {site: SparseCoder.from_pretrained(f) for site, f in folders.items()}

    results = {}
    for target in args.targets:
        attribute = args.attribute_of[target]
        others = [a for a in ATTRIBUTES if a != attribute]
        feats = {site: choose_features(args, pipe, sae, site, attribute, target, steps, guidance)
                 for site, sae in saes.items()}
        rng = np.random.default_rng([args.seed, 12])
        ua_scenes = scenes_with(args.prompts, rng, attribute, target)
        ira_scenes = scenes_with(args.prompts, rng, attribute, None, avoid=target)
        scenes = ua_scenes + ira_scenes
        recipe = Recipe(model=args.model, prompts=[scene_to_prompt(s, rng) for s in scenes],
                        seeds=[20_000 + k for k in range(len(scenes))], steps=steps, guidance=guidance,
                        interventions=[FeatureEdit(sae=folders[site], features=[f for f, _ in chosen], op=args.op,
                                                   strength=args.strength if args.op == "scale" else 1.0, when=args.when)
                                       for site, chosen in feats.items()])
        recipe.save(out / f"recipe_{target}.yaml")
        before, after = [], []
        for start in range(0, len(scenes), args.batch):
            part = dataclasses.replace(recipe, prompts=recipe.prompts[start : start + args.batch],
                                       seeds=recipe.seeds[start : start + args.batch])
            b, a = run_recipe(part, pipe)
            before += b
            after += a
        n = len(ua_scenes)
        got = {}
        for name, ims in (("before", before), ("after", after)):
            got[name] = measures(score(ims[:n], ua_scenes, attribute, others),
                                 score(ims[n:], ira_scenes, attribute, others), attribute, others)
        shown = list(range(min(SHOWN, n))) + list(range(n, n + min(SHOWN, n)))
        before_after_grid([before[k] for k in shown], [after[k] for k in shown], 2).save(out / f"unlearning_{target}.png")
        results[target] = {**got["after"], "before": got["before"], "features": feats, "attribute": attribute}
        print(json.dumps({"target": target, **results[target]}), flush=True)

    print(f"figure: {combined_figure(out, results).resolve()}", file=sys.stderr)
    summary = {"model": args.model, "targets": results, "sites": args.sites, "op": args.op,
               **({"strength": args.strength} if args.op == "scale" else {}), "when": args.when, "prompts_per_measure": args.prompts,
               "steps": steps, "guidance": guidance}
    for key in ("ua", "ira", "cra"):
        summary[f"{key}_mean"] = round(float(np.mean([r[key] for r in results.values()])), 4)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
