"""Concept recovery on the toy world: do an SAE's features detect the ground-truth concepts, better
than the site's raw channels, and do their heads' HRVs name the right attribute?

1. harvest the bundled toy model on ``--prompts`` toyworld prompts (one image each, the model's
   default steps and guidance), block site ``--site`` at the steps of ``--every``; with
   ``--read renders``, the true renders of the prompts' scenes instead of the model's generations
   (each read through the denoiser at those steps: features of real images, issue 23);
2. train one SAE per ``--arms`` entry (``architecture:k:expansion``, ``sae.train_quick``, ``--epochs``
   each): a sweep over sparsity, since one feature can only detect a concept on every token that
   shows it if it fires on all of them (the default is TopK L0 8, 16, 32 and BatchTopK 32);
3. per ground-truth concept value (``toyworld.render.token_labels``: every value of color, shape,
   texture, size, position, background, style), per timestep window (all steps, early, middle,
   late): choose the best feature (highest AUROC) on the even images and report its AUROC on the
   odd images; the same for the best single raw channel (either sign: a channel may detect a
   value by going down, while a feature's activation is used as is), the baseline an SAE must
   beat. The headline arm is the one with the best mean AUROC on the even images (the selection
   never sees the odd ones); every arm's figures are printed and kept under "arms";
   ``objects``: the object attributes' values again with the negatives drawn from the patches that
   show an object only (against every patch, a feature that fires on any object separates each
   object value from the background, 95% of the patches, whatever the value);
   ``distinct_features``: how many different features the values chose;
4. HRVs of the seven toy attributes from ``--hrv-prompts`` prompts (``analysis.build_hrv``); each
   chosen feature's head attribution (``analysis.feature_heads``, rerun of its top ``--examples``
   tokens) times the HRVs gives its top HRV concept; ``hrv_agreement`` is the fraction of chosen
   features whose top HRV concept is the attribute of their best ground-truth label, and
   ``hrv_chance`` the agreement expected if the two were independent (sum over attributes of the
   product of their frequencies among those features). ``hrv_agreement_lift``: the same with
   each concept's score divided by its mean over the chosen features (``concept_lift``);
   ``hrv_agreement_objects``: the same with each object value's feature chosen among object
   patches (so that its label names a value, not only "an object is here");
   ``--hrv-window`` builds the HRVs from one timestep window's votes; ``--attribution total``
   attributes each feature to every head by its total effect (attribution patching) instead of
   the direct write of its block's own heads (the default on the toy U-Net; on an MMDiT, whose
   AdaLN gates the heads' writes, ``direct`` is refused and ``total`` is the default).

Goals (issue 12): sae_mean_auroc >= 0.95, sae_frac_ge_0.95 >= 0.8, above neuron_mean_auroc.
Last line JSON {"arm", "arms": {arm: {"l0", "fvu", "fit_mean_auroc", "distinct_features", "objects": {"sae", "neuron"},
window: {"sae", "frac_ge_0.95", "neuron"}}}, "objects_sae_mean_auroc", "objects_neuron_mean_auroc", "sae_mean_auroc", "sae_frac_ge_0.95", "neuron_mean_auroc", "hrv_agreement",
"hrv_chance", "hrv_agreement_lift", "hrv_chance_lift", "hrv_agreement_objects", "hrv_chance_objects", "per_value": {value: {"sae", "neuron", "feature"}},
"model", "site", "attribution"}.

    OMP_NUM_THREADS=2 python benchmarks/concept_recovery.py [--prompts 256 --every 4 --arms topk:8:8 ... --out runs/bench/concepts]
    OMP_NUM_THREADS=2 python benchmarks/concept_recovery.py --model toy-mmdit   # transformer_blocks.4, attribution total
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.files import claim_folder
from toyworld.benchmarks import check_sites, default_sites, direct_attribution, run_record
from toyworld.vocab import OBJECT_ATTRIBUTES as OBJECT_ATTRS


WINDOWS = ("all", "early", "middle", "late")


def parse_arm(spec: str) -> tuple[str, int, int]:
    from sae.registry import available_architectures

    parts = spec.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or parts[0] not in available_architectures():
        raise SystemExit(f"bad arm {spec!r}: expected architecture:k:expansion with architecture one of "
                         f"{', '.join(available_architectures())}, e.g. topk:8:8")
    return parts[0], int(parts[1]), int(parts[2])


def hrv_folder(args) -> str:
    """Each HRV construction in its own folder (a rerun resumes it; another config is refused)."""
    return "hrv" if args.hrv_words == "alone" and not args.hrv_sink else f"hrv_{args.hrv_words}{'_sink' * args.hrv_sink}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="a toy-world model: toy (U-Net) or toy-mmdit")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--site", default=None,
                    help="block site (default: the model's, toyworld/benchmarks.py; toy: up_blocks.2.attentions.0)")
    ap.add_argument("--every", type=int, default=4, help="harvest every N-th sampling step")
    ap.add_argument("--read", default="generations", choices=["generations", "renders"],
                    help="harvest the model's generations of the prompts, or read the true renders of their scenes "
                         "(real images: activations.harvest.read_images)")
    ap.add_argument("--arms", nargs="+", default=["topk:8:8", "topk:16:4", "topk:32:2", "batchtopk:32:2"],
                    help="SAEs to train, each architecture:k:expansion")
    ap.add_argument("--epochs", type=int, default=32)
    ap.add_argument("--hrv-prompts", type=int, default=16)
    ap.add_argument("--hrv-words", default="alone", choices=["alone", "in_context"],
                    help="HRV concept words encoded alone (Park et al.) or read where the HRV prompts name them")
    ap.add_argument("--hrv-sink", action="store_true", help="the start token joins every HRV contest, for no concept")
    ap.add_argument("--attribution", default=None, choices=["direct", "total"],
                    help="feature -> heads: the block's own heads' direct write, or every head's total effect "
                         "(default: direct where the model allows it, the U-Net toy; total on an MMDiT)")
    ap.add_argument("--hrv-window", default="all", choices=["all", "early", "middle", "late"],
                    help="HRVs from the votes of every step, or of one timestep window only")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/concepts")
    args = ap.parse_args()
    prog = Path(__file__).name
    args.site = args.site or default_sites(args.model, "block", prog, "--site")
    check_sites(args.model, args.site, prog, "--site")
    direct_ok = direct_attribution(args.model)
    if args.attribution == "direct" and not direct_ok:
        raise SystemExit(f"{prog}: error: --attribution direct folds a block's output projection into its heads' writes, "
                         f"which model {args.model!r} gates by the timestep (an MMDiT); use --attribution total")
    args.attribution = args.attribution or ("direct" if direct_ok else "total")
    claim_folder(args.out, run_record(__file__, args), prog=prog)  # another run's folder: refused

    from activations.config import HarvestConfig, ImageSource, PromptSource
    from activations.harvest import harvest
    from activations.pipeline import load_pipeline, model_defaults
    from activations.store import ActivationStore
    from analysis.config import HRVConfig
    from analysis.construct import build_hrv
    from analysis.feature_concepts import concept_lift, concept_scores
    from analysis.feature_heads import feature_head_attribution
    from analysis.features import compute_feature_stats
    from analysis.toy_truth import channel_truth, concept_values, feature_truth, row_targets
    from sae import SAE, train_quick

    out = Path(args.out)
    t0 = time.time()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    d = model_defaults(pipe)
    store_root = out / "store"
    harvest(HarvestConfig(model=args.model, out=str(store_root), sites=[args.site], seed=args.seed,
                          prompts=PromptSource(kind="toyworld", num_prompts=args.prompts),
                          num_inference_steps=d["num_inference_steps"], guidance_scale=d["guidance_scale"],
                          timesteps={"every": args.every}, branch="cond", batch_size=16, progress=False,
                          images=ImageSource(kind="none" if args.read == "generations" else "renders")), pipe=pipe)
    t_harvest = time.time() - t0
    reader = ActivationStore(store_root).site(args.site)
    images = reader.meta_column("image")
    fit_rows = np.flatnonzero(images % 2 == 0)
    eval_rows = np.flatnonzero(images % 2 == 1)
    # the baseline, per window: the best raw channel on the even images, scored on the odd ones
    neuron = {}
    for win in WINDOWS:
        gate = None if win == "all" else win
        ch_fit = channel_truth(reader, store_root, rows=fit_rows, window=gate)
        ch_ev = channel_truth(reader, store_root, rows=eval_rows, window=gate)
        neuron[win] = np.array([ch_ev[int(np.nanargmax(ch_fit[:, v])), v] if np.isfinite(ch_fit[:, v]).any() else np.nan
                                for v in range(ch_fit.shape[1])])

    # the object attributes again, among the patches that show an object only: against every patch,
    # a feature that fires on any object already separates each object value from the background
    # (95% of the patches), whatever the value
    obj_cols = [v for v, (a, _) in enumerate(concept_values()) if a in OBJECT_ATTRS]
    on_object = row_targets(store_root, {f: reader.meta_column(f) for f in ("image", "i", "j")}, reader.grid)[:, obj_cols].any(1)
    fit_obj, eval_obj = fit_rows[on_object[fit_rows]], eval_rows[on_object[eval_rows]]
    ch_fit = channel_truth(reader, store_root, rows=fit_obj)[:, obj_cols]
    neuron_obj = channel_truth(reader, store_root, rows=eval_obj)[:, obj_cols][np.nanargmax(ch_fit, 0), np.arange(len(obj_cols))]

    arms = {}
    for spec in args.arms:
        arch, k, expansion = parse_arm(spec)
        folder, metrics = train_quick(str(store_root), site=args.site, out=str(out / "sae" / spec.replace(":", "_")),
                                      architecture=arch, k=k, expansion_factor=expansion, epochs=args.epochs,
                                      wandb=False, recovered_images=0, seed=args.seed)
        sae = SAE.from_pretrained(folder)
        fit = feature_truth(sae, reader, store_root, windows=WINDOWS, rows=fit_rows)
        ev = feature_truth(sae, reader, store_root, windows=WINDOWS, rows=eval_rows)
        best = np.nanargmax(np.nan_to_num(fit["auroc"], nan=-1), axis=1)  # [windows, values]: chosen on even images
        got = np.take_along_axis(ev["auroc"], best[:, None, :], axis=1)[:, 0]  # [windows, values] on odd images
        fit_best = np.nanmax(fit["auroc"], axis=1)
        arm = {"arch": arch, "k": k, "latents": sae.num_latents, "fvu": round(float(metrics.get("metrics/fvu", float("nan"))), 4),
               "l0": round(float(metrics.get("metrics/l0", float("nan"))), 2), "fit_mean_auroc": round(float(np.nanmean(fit_best[0])), 4)}
        arm["distinct_features"] = int(len(set(best[0].tolist())))
        fo = feature_truth(sae, reader, store_root, windows=("all",), rows=fit_obj)["auroc"][0][:, obj_cols]
        eo = feature_truth(sae, reader, store_root, windows=("all",), rows=eval_obj)["auroc"][0][:, obj_cols]
        best_obj = np.nanargmax(np.nan_to_num(fo, nan=-1), 0)  # [object values]: chosen among object patches
        arm["objects"] = {"sae": round(float(np.nanmean(eo[best_obj, np.arange(len(obj_cols))])), 4),
                          "neuron": round(float(np.nanmean(neuron_obj)), 4)}
        for w, win in enumerate(WINDOWS):
            arm[win] = {"sae": round(float(np.nanmean(got[w])), 4), "frac_ge_0.95": round(float(np.nanmean(got[w] >= 0.95)), 4),
                        "neuron": round(float(np.nanmean(neuron[win])), 4)}
        arms[spec] = {"summary": arm, "sae": sae, "auroc": got[0], "feature": best[0], "values": fit["values"],
                      "object_feature": best_obj}
        print(json.dumps({"stage": "arm", "arm": spec, **arm}), flush=True)

    # the arm whose features detect best on the even images (model selection never sees the odd ones)
    pick = max(arms, key=lambda a: arms[a]["summary"]["fit_mean_auroc"])
    sae, values = arms[pick]["sae"], arms[pick]["values"]
    per_value, chosen = {}, {}
    for v, name in enumerate(values):
        if not np.isfinite(arms[pick]["auroc"][v]):
            continue
        f = int(arms[pick]["feature"][v])
        per_value[name] = {"sae": round(float(arms[pick]["auroc"][v]), 4), "neuron": round(float(neuron["all"][v]), 4), "feature": f}
        chosen.setdefault(f, name)
    # the same choice with each object value's feature chosen among object patches (its label then
    # says which value, not only "an object is here"); background and style as before
    chosen_obj = {}
    for v, name in enumerate(values):
        if v in obj_cols:
            chosen_obj.setdefault(int(arms[pick]["object_feature"][obj_cols.index(v)]), name)
        elif name in per_value:
            chosen_obj.setdefault(per_value[name]["feature"], name)
    sae_auc = np.array([p["sae"] for p in per_value.values()])
    neu_auc = np.array([p["neuron"] for p in per_value.values()])
    print(json.dumps({"stage": "truth", "arm": pick, "values": len(per_value), "features_chosen": len(chosen),
                      "harvest_s": round(t_harvest, 1)}))

    # HRVs and the chosen features' head attribution
    hrv = build_hrv(HRVConfig(model=args.model, concepts="toy", prompts=PromptSource(kind="toyworld", num_prompts=args.hrv_prompts),
                              prompt_seed=args.seed, out=str(out / hrv_folder(args)), words=args.hrv_words, sink=args.hrv_sink, progress=False, wandb=False), pipe)
    stats = compute_feature_stats(sae, reader, progress=False, store_root=str(store_root))
    att = feature_head_attribution(sae, pipe, store_root, stats, features=sorted(set(chosen) | set(chosen_obj)), examples=args.examples, method=args.attribution,
                                   progress=False)["attribution"]
    scores = concept_scores(hrv.hrv if args.hrv_window == "all" else hrv.window(args.hrv_window), att)
    names = list(hrv.concepts.names)

    def agreement(scores_mc, chosen):
        hits, top_attr, gt_attr = [], [], []
        for f, label in chosen.items():
            if not torch.isfinite(scores_mc[f]).any():
                continue
            top = names[int(torch.nan_to_num(scores_mc[f], nan=-1).argmax())]
            gt = label.split("=")[0]
            top_attr.append(top), gt_attr.append(gt), hits.append(top == gt)
        if not hits:
            return None, None, {}
        chance = sum((top_attr.count(a) / len(top_attr)) * (gt_attr.count(a) / len(gt_attr)) for a in set(names))
        return round(float(np.mean(hits)), 4), round(float(chance), 4), {a: top_attr.count(a) for a in sorted(set(top_attr))}

    rows = torch.tensor(sorted(chosen))
    lift = torch.full_like(scores, float("nan"))
    lift[rows] = concept_lift(scores[rows])  # relative to the chosen features' mean
    hrv_agreement, hrv_chance, tops = agreement(scores, chosen)
    lift_agreement, lift_chance, lift_tops = agreement(lift, chosen)
    obj_agreement, obj_chance, obj_tops = agreement(scores, chosen_obj)
    print(json.dumps({"stage": "hrv", "features": len(chosen), "top_hrv_concepts": tops, "top_lift_concepts": lift_tops,
                      "hrv_agreement_lift": lift_agreement, "hrv_chance_lift": lift_chance,
                      "features_objects": len(chosen_obj), "top_hrv_concepts_objects": obj_tops,
                      "total_s": round(time.time() - t0, 1)}))
    print(json.dumps({"arm": pick, "arms": {a: arms[a]["summary"] for a in arms},
                      "objects_sae_mean_auroc": arms[pick]["summary"]["objects"]["sae"],
                      "objects_neuron_mean_auroc": arms[pick]["summary"]["objects"]["neuron"],
                      "sae_mean_auroc": round(float(sae_auc.mean()), 4),
                      "sae_frac_ge_0.95": round(float((sae_auc >= 0.95).mean()), 4),
                      "neuron_mean_auroc": round(float(neu_auc.mean()), 4),
                      "hrv_agreement": hrv_agreement, "hrv_chance": hrv_chance,
                      "hrv_agreement_lift": lift_agreement, "hrv_chance_lift": lift_chance,
                      "hrv_agreement_objects": obj_agreement, "hrv_chance_objects": obj_chance,
                      "per_value": per_value, "model": args.model, "read": args.read, "site": args.site, "attribution": args.attribution}))


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
