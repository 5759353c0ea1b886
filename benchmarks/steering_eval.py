"""Steering on the toy world, scored by the pixel oracle (toyworld.oracle).

    python benchmarks/steering_eval.py                       # >= 100 prompts per cell (long on a CPU)
    python benchmarks/steering_eval.py --prompts 8 --steps 10  # a quick check
    python benchmarks/steering_eval.py --model toy-mmdit       # the toy MMDiT (SAE edits at transformer_blocks.4)

Cells (single-object scenes; one image per prompt, seed = prompt index):
* spatial: move the object to a target quadrant by a spatial feature edit (Tinaz et al.: the
  object's features set to β·‖Z_ij‖ in the target quadrant, 0 elsewhere) applied early, middle or
  late. Success: the oracle reads an object in the target quadrant. Anchor (Tinaz et al., SD 1.4):
  0.80 / 0.35 / 0.23; chance 0.25. Two settings: ``spatial``, the prompt without the object's
  position (the noise then decides where it goes; target: a random quadrant), as in Tinaz et al.,
  whose prompts leave the layout to the model; ``spatial_named``, the prompt naming the position
  (target: the opposite quadrant), where the edit works against the prompt's own words.
* style: make the object striped, or the picture night, by a global feature edit (β·‖Z_ij‖/Σ‖Z‖
  times the features' decoder directions at every position) in each window, on captions that leave
  texture (or style) unsaid; ``<target>_unsteered``: how often the noise draws the target anyway;
  ``style_preserved``: the oracle also finds every other attribute of the prompt (shape, colour,
  position, background, and texture or style, whichever is not the target).
* hrv_strengthen: HRV strengthening where the base model misses: two-object captions in the
  canonical wording, at the model's guidance. ``--strengthen`` (default ``auto``: of colour, shape,
  texture and size, the one the unsteered model binds to the right object least often on
  ``--select-prompts`` other two-object captions) is the attribute. Success: the oracle reads each
  object's asked value at that object's position (toyworld.oracle.check_image: a colour drawn on
  the wrong object fails). ``base``: unsteered; ``hrv``: every value word of the attribute in the
  caption has its attention rescaled by HRV[attribute, h] (Park et al., ICLR 2025, Section 5);
  ``permuted``: the same factors shuffled across heads (the control: same total weight, other
  heads); ``adjusting``: 2·HRV[attribute] − HRV[undesired], with undesired the concept whose HRV
  row is closest to the attribute's.
* head_encode: the prompt with another colour word encoded through the ``--heads`` heads the colour
  HRV ranks highest, on the object's patches only (its rendered mask, resized to each grid),
  against as many random heads. Success: the oracle reads the other colour. On an MMDiT the other
  prompt is drawn once per edit to record its text keys and values (``steering.EncodePrompt``).

The object's features (spatial) are the SAE features whose activation correlates most with the
object's mask across patches (Pearson over every cond-branch row of early steps of the selection
images: activation vs the object's coverage of the patch). Style features: the largest
standardised difference of mean activation, striped vs plain objects (on object patches) and night
vs day pictures (all patches). The SAE (TopK at ``--site``) and the HRVs are built inside the
benchmark unless ``--sae`` / ``--hrv`` give folders. ``<out>/steering_examples.png``: per cell, the
first prompts unsteered and steered (best window). Last line JSON: the cells' results and "model".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.files import claim_folder
from toyworld.benchmarks import check_sites, default_sites, run_record

WINDOWS = ("early", "middle", "late")
OPPOSITE = {"top left": "bottom right", "top right": "bottom left", "bottom left": "top right", "bottom right": "top left"}
QUADS = tuple(OPPOSITE)
STRENGTHEN = ("color", "shape", "texture", "size")  # object attributes a caption binds to one object
EXAMPLES = 4  # prompts per cell shown in the examples figure


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="a toy-world model: toy (U-Net) or toy-mmdit")
    ap.add_argument("--prompts", type=int, default=100, help="prompts per cell")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance (default: the model's)")
    ap.add_argument("--strengthen", default="auto", choices=("auto",) + STRENGTHEN,
                    help="attribute of the HRV strengthening cell (auto: the one the base model misses most)")
    ap.add_argument("--site", default=None,
                    help="block site of the SAE edits (default: the model's, toyworld/benchmarks.py; toy: up_blocks.2.attentions.0)")
    ap.add_argument("--sae", default=None, help="SAE folder for --site (default: harvest and train one)")
    ap.add_argument("--hrv", default=None, help="HRV folder (default: build one)")
    ap.add_argument("--harvest-prompts", type=int, default=64)
    ap.add_argument("--hrv-prompts", type=int, default=32)
    ap.add_argument("--select-prompts", type=int, default=32, help="images used to pick features")
    ap.add_argument("--features", type=int, default=4, help="features per edit")
    ap.add_argument("--spatial-beta", type=float, default=2.0)
    ap.add_argument("--style-beta", type=float, default=128.0, help="β of the global edit (2 x the 64 patches)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--out", default="outputs/bench/steering_eval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cells", default="all", choices=("all", "spatial", "style", "heads"),
                    help="all cells, or one kind only (heads: HRV strengthening and head encoding)")
    ap.add_argument("--device", default="cpu", help="torch device of the model (images are the same on any: CPU noise)")
    args = ap.parse_args()
    prog = Path(__file__).name
    args.site = args.site or default_sites(args.model, "block", prog, "--site")
    check_sites(args.model, args.site, prog, "--site")
    return args


# -- resources -------------------------------------------------------------------------------


def build_saes(args, pipe, steps, guidance, sites: list[str]) -> dict[str, str]:
    """One harvest of ``sites`` (``--harvest-prompts`` toy prompts, every step, cond branch), then one
    TopK SAE per site: {site: SAE folder}."""
    from activations.config import HarvestConfig, PromptSource
    from activations.harvest import harvest
    from sae import train_quick

    store = Path(args.out) / "harvest"
    harvest(HarvestConfig(model=args.model, out=str(store), sites=list(sites), seed=args.seed,
                          prompts=PromptSource(kind="toyworld", num_prompts=args.harvest_prompts),
                          num_inference_steps=steps, guidance_scale=guidance, timesteps="all", branch="cond",
                          batch_size=8, progress=True), pipe=pipe)
    return {site: str(train_quick(str(store), site=site, out=str(Path(args.out) / "sae"), epochs=2, wandb=False,
                                  recovered_images=0, seed=args.seed)[0]) for site in sites}


def build_sae(args, pipe, steps, guidance) -> str:
    return build_saes(args, pipe, steps, guidance, [args.site])[args.site]


def build_hrvs(args, pipe, steps, guidance) -> str:
    from activations.config import PromptSource
    from analysis.config import HRVConfig
    from analysis.construct import build_hrv

    out = Path(args.out) / "hrv"
    build_hrv(HRVConfig(model=args.model, concepts="toy", prompts=PromptSource(kind="toyworld", num_prompts=args.hrv_prompts),
                        prompt_seed=args.seed, steps=steps, guidance=guidance, out=str(out), progress=True, wandb=False), pipe)
    return str(out)


# -- scenes ----------------------------------------------------------------------------------


def scenes(n: int, seed: int, **fixed):
    from toyworld.scene import Scene, sample_scene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = sample_scene(rng, num_objects=1, split="train")
        obj = dataclasses.replace(s.objects[0], **{k: v for k, v in fixed.items() if k in ("texture", "color")})
        out.append(Scene((obj,), s.background, fixed.get("style", s.style)))
    return out


def prompt(scene) -> str:
    from toyworld.prompts import scene_to_prompt

    return scene_to_prompt(scene)  # canonical: every attribute named


def images(pipe, prompts, seeds, steps, guidance, ivs=(), batch=8):
    from activations.generate import sample
    from steering import steer

    out = []
    for i in range(0, len(prompts), batch):
        p, s = prompts[i:i + batch], seeds[i:i + batch]
        with steer(pipe, *ivs, prompts=p):
            out += [np.asarray(im) for im in sample(pipe, p, s, steps=steps, guidance=guidance).images]
    return out


# -- feature choice ---------------------------------------------------------------------------


def site_rows(pipe, prompts, seeds, steps, guidance, site, window):
    """cond-branch rows of ``site`` in ``window``: [images, rows of steps, patches, width]."""
    from activations.edits import Observe

    got: list[torch.Tensor] = []

    def grab(x, call):
        rows = call.rows("cond")
        got.append((x if rows is None else x[rows]).detach().float().cpu())

    obs = Observe(site=site, stage="block", fn=grab, when=window, sees="before")
    per_image = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        got.clear()
        images(pipe, [p], [s], steps, guidance, [obs], batch=1)
        per_image.append(torch.cat(got))  # [steps_in_window, n, c]
    return per_image


def pick_features(args, pipe, sae, steps, guidance):
    from activations.generate import schedule
    from activations.timesteps import Window
    from toyworld.render import patch_coverage, render

    sel = scenes(args.select_prompts, args.seed + 1)
    # half striped, half night, so the style contrasts exist
    sel = [dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], texture="striped" if k % 2 else "plain"),),
                               style="night" if (k // 2) % 2 else "day") for k, s in enumerate(sel)]
    rows = site_rows(pipe, [prompt(s) for s in sel], list(range(len(sel))), steps, guidance, args.site, None)
    grid = int(round(rows[0].shape[1] ** 0.5))
    with torch.no_grad():
        z = [sae.encode(r.reshape(-1, r.shape[-1])).to_dense().reshape(r.shape[0], r.shape[1], -1) for r in rows]
    # the steps of the early window (the one rule: activations.timesteps), in the order they ran
    early = Window("early").select(schedule(pipe, steps), pipe.scheduler.config.num_train_timesteps)
    cover = [torch.from_numpy(patch_coverage(render(s).masks, grid)[0].reshape(-1)) for s in sel]
    a = torch.cat([zi[early].reshape(-1, zi.shape[-1]) for zi in z])
    m = torch.cat([c.repeat(zi[early].shape[0]) for c, zi in zip(cover, z)])
    a_c, m_c = a - a.mean(0), m - m.mean()
    corr = (a_c * m_c[:, None]).sum(0) / (a_c.norm(dim=0) * m_c.norm()).clamp_min(1e-9)
    obj = [int(i) for i in corr.argsort(descending=True)[: args.features]]

    def contrast(values, labels):
        v = torch.stack(values)
        lab = torch.tensor(labels, dtype=torch.bool)
        diff = v[lab].mean(0) - v[~lab].mean(0)
        return [int(i) for i in (diff / v.std(0).clamp_min(1e-6)).argsort(descending=True)[: args.features]]

    on_obj = [(zi * (c > 0.5).float()[None, :, None]).sum(1).mean(0) / (c > 0.5).float().sum().clamp_min(1) for zi, c in zip(z, cover)]
    everywhere = [zi.mean((0, 1)) for zi in z]
    striped = contrast(on_obj, [s.objects[0].texture == "striped" for s in sel])
    night = contrast(everywhere, [s.style == "night" for s in sel])
    return {"object": obj, "object_corr": [round(float(corr[i]), 3) for i in obj], "striped": striped, "night": night}


# -- cells -----------------------------------------------------------------------------------


def rate(flags) -> float:
    return round(float(np.mean(flags)), 4) if len(flags) else float("nan")


def without_position(scene) -> str:
    """The canonical prompt with the object's position left unsaid: the layout is the model's (the
    noise's) choice, as in Tinaz et al.'s prompts."""
    from toyworld.prompts import Named, scene_to_prompt

    return scene_to_prompt(scene, named=Named.all_but(scene, "position"))


def cell_spatial(args, pipe, sae_folder, feats, steps, guidance, examples):
    """Per window, how often the object ends in the target quadrant: ``spatial`` with the position
    left out of the prompt (target: a random quadrant), ``spatial_named`` with the prompt naming the
    object's position (target: the opposite quadrant; a centred object gets a random one).
    ``<cell>_moved``: the object is in the target quadrant and no longer where the oracle read it
    in the unsteered image of the same prompt and seed, so a second object painted into the
    target does not count as a move."""
    from steering import FeatureEdit
    from toyworld.oracle import read_positions

    sc = scenes(args.prompts, args.seed + 2)
    rng = np.random.default_rng(args.seed + 2)
    named_targets = [OPPOSITE.get(s.objects[0].position) or QUADS[rng.integers(4)] for s in sc]
    free_targets = [QUADS[rng.integers(4)] for _ in sc]
    first = list(range(min(EXAMPLES, len(sc))))
    out = {}
    for cell, write, targets in (("spatial", without_position, free_targets), ("spatial_named", prompt, named_targets)):
        base = images(pipe, [write(s) for s in sc], list(range(len(sc))), steps, guidance, (), args.batch)
        examples[cell] = {"base": [base[i] for i in first]}
        origin = [set(read_positions(im)) for im in base]  # where the unsteered image has its object
        out[cell], out[f"{cell}_moved"] = {}, {}
        out[f"{cell}_unsteered"] = rate([t in o for t, o in zip(targets, origin)])  # already there by chance
        for window in WINDOWS:
            flags, moved, shown = [], [], {}
            for q in QUADS:  # one batch per target quadrant (the region is shared by a batch)
                idx = [i for i, t in enumerate(targets) if t == q]
                if not idx:
                    continue
                edit = FeatureEdit(sae=sae_folder, features=feats, op="spatial", strength=args.spatial_beta,
                                   region={"quadrant": q}, when=window)
                ims = images(pipe, [write(sc[i]) for i in idx], idx, steps, guidance, [edit], args.batch)
                read = [read_positions(im) for im in ims]
                flags += [q in r for r in read]
                moved += [q in r and not (origin[i] - {q}) & set(r) for i, r in zip(idx, read)]
                shown.update(zip(idx, ims))
            out[cell][window] = rate(flags)
            out[f"{cell}_moved"][window] = rate(moved)
            examples[cell][window] = [shown[i] for i in first]
    return out


def cell_style(args, pipe, sae_folder, feats, steps, guidance, examples):
    """Make the object striped, or the picture night, with captions that leave that attribute
    unsaid (the noise decides it unsteered: ``<target>_unsteered`` is how often it is there anyway).
    Per window: the share of images that show the target, and the share that keep every other
    attribute the caption names."""
    from steering import FeatureEdit
    from toyworld.oracle import check_image
    from toyworld.prompts import Named, scene_to_prompt

    sc = scenes(args.prompts, args.seed + 3)
    seeds = list(range(len(sc)))
    style, kept = {}, {}
    for target in ("striped", "night"):
        attr = "texture" if target == "striped" else "style"
        truth = [dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], texture="striped"),)) if target == "striped"
                 else dataclasses.replace(s, style="night") for s in sc]
        ps = [scene_to_prompt(s, named=Named.all_but(s, attr)) for s in sc]
        others = [a for a in ("shape", "color", "position", "background", "texture", "style") if a != attr]
        base = images(pipe, ps, seeds, steps, guidance, (), args.batch)
        examples[target] = {"base": base[:EXAMPLES]}
        style[f"{target}_unsteered"] = rate([check_image(t, im)[attr] for t, im in zip(truth, base)])
        for window in WINDOWS:
            edit = FeatureEdit(sae=sae_folder, features=feats[target], op="global", strength=args.style_beta, when=window)
            ims = images(pipe, ps, seeds, steps, guidance, [edit], args.batch)
            checks = [check_image(t, im) for t, im in zip(truth, ims)]
            examples[target][window] = ims[:EXAMPLES]
            style[f"{target}_{window}"] = rate([c[attr] for c in checks])
            kept[f"{target}_{window}"] = rate([all(c[a] for a in others) for c in checks])
    return style, kept


def undesired_for(hrv, concept: str) -> str:
    """The concept whose HRV row is closest (cosine) to ``concept``'s: the one its heads most share,
    so the one adjusting should move away from."""
    rows = hrv.hrv / hrv.hrv.norm(dim=1, keepdim=True).clamp_min(1e-9)
    sim = rows @ rows[hrv.concepts.index(concept)]
    sim[hrv.concepts.index(concept)] = -2.0
    return hrv.concepts.names[int(sim.argmax())]


def two_object_scenes(n: int, seed: int):
    from toyworld.scene import sample_scene

    rng = np.random.default_rng(seed)
    return [sample_scene(rng, num_objects=2, split="train") for _ in range(n)]


def binding_rates(pipe, sc, steps, guidance, batch) -> dict[str, float]:
    """Per attribute of STRENGTHEN, how often the unsteered model draws each object's asked value
    on that object (objects matched by position)."""
    from toyworld.oracle import check_image

    ims = images(pipe, [prompt(s) for s in sc], list(range(len(sc))), steps, guidance, (), batch)
    checks = [check_image(s, im) for s, im in zip(sc, ims)]
    return {a: rate([c[a] for c in checks]) for a in STRENGTHEN}


def cell_strengthen(args, pipe, hrv_folder, steps, guidance, examples: dict) -> dict:
    """base / hrv / permuted / adjusting on two-object captions for one attribute (module doc)."""
    from analysis.hrv import HRV
    from steering import HRVEdit
    from toyworld.oracle import check_image

    chosen = binding_rates(pipe, two_object_scenes(args.select_prompts, args.seed + 7), steps, guidance, args.batch)
    attribute = min(chosen, key=chosen.get) if args.strengthen == "auto" else args.strengthen
    undesired = undesired_for(HRV.load(hrv_folder), attribute)
    sc = two_object_scenes(args.prompts, args.seed + 4)
    ps = [prompt(s) for s in sc]
    groups: dict[tuple, list[int]] = {}  # prompts that name the same words share a batch (and an edit)
    for i, s in enumerate(sc):
        groups.setdefault(tuple(sorted({getattr(o, attribute) for o in s.objects})), []).append(i)
    variants = {
        "base": lambda w: [],
        "hrv": lambda w: [HRVEdit(hrv=hrv_folder, concept=attribute, token=w)],
        "permuted": lambda w: [HRVEdit(hrv=hrv_folder, concept=attribute, token=w, permute=args.seed + 6)],
        "adjusting": lambda w: [HRVEdit(hrv=hrv_folder, concept=attribute, undesired=undesired, token=w)],
    }
    out: dict = {"attribute": attribute}
    for name, edit in variants.items():
        flags, shown = {}, {}
        for words, idx in groups.items():
            ivs = [e for w in words for e in edit(w)]
            ims = images(pipe, [ps[i] for i in idx], idx, steps, guidance, ivs, args.batch)
            flags.update((i, check_image(sc[i], im)[attribute]) for i, im in zip(idx, ims))
            shown.update(zip(idx, ims))
        out[name] = rate([flags[i] for i in range(len(sc))])
        if name in ("base", "hrv"):
            examples.setdefault("hrv_strengthen", {})[name] = [shown[i] for i in range(min(EXAMPLES, len(sc)))]
    return {**out, "undesired": undesired, "selection_base_rates": chosen}


def cell_heads(args, pipe, hrv_folder, steps, guidance, examples):
    from analysis.hrv import HRV
    from steering import EncodePrompt
    from toyworld.oracle import check_image
    from toyworld.render import render
    from toyworld.vocab import COLORS

    hrv = HRV.load(hrv_folder)
    top = [h for h, *_ in hrv.top_heads("color", args.heads)]
    rnd = [int(h) for h in np.random.default_rng(args.seed + 5).choice(hrv.num_heads, args.heads, replace=False)]
    sc = scenes(args.prompts, args.seed + 5)
    first = list(range(min(EXAMPLES, len(sc))))
    examples["head_encode"] = {"base": images(pipe, [prompt(sc[i]) for i in first], first, steps, guidance)}
    out = {}
    for name, heads in (("hrv_heads", top), ("random_heads", rnd)):
        flags = []
        for i, s in enumerate(tqdm(sc, desc=f"head_encode {name}", leave=False)):
            obj = s.objects[0]
            other = COLORS[(COLORS.index(obj.color) + 1) % len(COLORS)]
            target = dataclasses.replace(s, objects=(dataclasses.replace(obj, color=other),))
            # steps and guidance: an MMDiT draws the other prompt once at them to record its text keys and values
            edit = EncodePrompt(prompt=prompt(target), heads=heads, mask={"image": render(s).masks[0].astype(np.float32)},
                                steps=steps, guidance=guidance)
            im = images(pipe, [prompt(s)], [i], steps, guidance, [edit], 1)[0]
            flags.append(check_image(target, im)["color"])
            if i in first:
                examples["head_encode"].setdefault(name, []).append(im)
        out[name] = rate(flags)
    out["heads"] = {"hrv": top, "random": rnd}
    return out


def examples_figure(examples: dict, results: dict, path: Path) -> Path:
    """One row per cell: the unsteered image, then the steered one (the window with the best score
    where a cell has windows), for the first ``EXAMPLES`` prompts; the row's label says which."""
    from PIL import Image, ImageDraw

    rows = []
    for cell, shots in examples.items():
        score = results.get(cell, {})
        steered = max((k for k in shots if k != "base"), key=lambda k: score.get(k, -1.0))  # the best window or variant
        rows.append((f"{cell}: base | {steered}", shots["base"], shots[steered]))
    size = rows[0][1][0].shape[0]
    label_h, gap = 14, 4
    width = EXAMPLES * (2 * size + gap) + gap
    canvas = Image.new("RGB", (width, len(rows) * (size + label_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, base, steered) in enumerate(rows):
        y = r * (size + label_h + gap)
        draw.text((gap, y), label, fill="black")
        for c, (a, b) in enumerate(zip(base, steered)):
            x = gap + c * (2 * size + gap)
            canvas.paste(Image.fromarray(np.asarray(a)), (x, y + label_h))
            canvas.paste(Image.fromarray(np.asarray(b)), (x + size, y + label_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def main() -> None:
    args = parse_args()
    claim_folder(args.out, run_record(__file__, args), prog=Path(__file__).name)  # another run's folder: refused
    from activations.pipeline import load_pipeline, model_defaults
    from sae.sparse_coder import SparseCoder

    torch.manual_seed(args.seed)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    d = model_defaults(pipe)
    steps = args.steps or d["num_inference_steps"]
    guidance = args.guidance if args.guidance is not None else d["guidance_scale"]
    kinds = ("spatial", "style", "heads") if args.cells == "all" else (args.cells,)
    resources: dict = {}
    if {"spatial", "style"} & set(kinds):
        sae_folder = resources["sae"] = args.sae or build_sae(args, pipe, steps, guidance)
        feats = resources["features"] = pick_features(args, pipe, SparseCoder.from_pretrained(sae_folder), steps, guidance)
    if "heads" in kinds:
        hrv_folder = resources["hrv"] = args.hrv or build_hrvs(args, pipe, steps, guidance)
    print(json.dumps(resources), flush=True)
    examples: dict = {}
    result: dict = {}
    if "spatial" in kinds:
        result.update(cell_spatial(args, pipe, sae_folder, feats["object"], steps, guidance, examples))
        print(json.dumps(result), flush=True)
    if "style" in kinds:
        result["style"], result["style_preserved"] = cell_style(args, pipe, sae_folder, feats, steps, guidance, examples)
        print(json.dumps({k: result[k] for k in ("style", "style_preserved")}), flush=True)
    heads_used = None
    if "heads" in kinds:
        result["hrv_strengthen"] = cell_strengthen(args, pipe, hrv_folder, steps, guidance, examples)
        print(json.dumps({"hrv_strengthen": result["hrv_strengthen"]}), flush=True)
        result["head_encode"] = cell_heads(args, pipe, hrv_folder, steps, guidance, examples)
        heads_used = result["head_encode"].pop("heads")
    per_cell = {**result, **{t: {w: result["style"][f"{t}_{w}"] for w in WINDOWS}
                             for t in ("striped", "night") if "style" in result}}
    fig = examples_figure(examples, per_cell, Path(args.out) / "steering_examples.png")
    print(json.dumps({"settings": vars(args) | {"steps": steps, "guidance": guidance}, "heads_used": heads_used,
                      "examples": str(fig.resolve())}), flush=True)
    print(json.dumps({**result, "model": args.model}))

if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
