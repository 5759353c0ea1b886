"""Composition before the first step completes (Tinaz et al., 003: the layout is readable from the
SAE features of the first denoising step): from block-site SAE features at the first step
(tau ~ 1) and at tau ~ 0.5, predict each object's final mask and score its IoU.

1. harvest the bundled toy model on ``--prompts`` toyworld prompts (default steps and guidance) at
   the sites ``--sites``, at step 0 and at the step whose tau is nearest 0.5;
2. train one TopK SAE per site on those rows (``sae.train_quick``);
3. label each feature, per step, with its best ground-truth concept value (highest AUROC,
   ``analysis.toy_truth``) on the even images ("measured on other images"); a feature labelled
   with a background or style value says "no object here";
4. on each odd image, per position take the top feature (largest activation); object o's predicted
   mask is the set of positions whose top feature's label is one of o's attribute values; the true
   mask is the set of patches o covers at least half of in the final scene's rendering
   (``token_labels(scene, grid)['object']``), at the site's grid. IoU per object, averaged over
   objects and images (an empty union counts as IoU 1): ``iou``. ``iou_scaled``: the same with
   each feature's activation divided by its largest on the even images, so that a feature of
   large norm does not win every position by scale alone;
   ``iou_vote``: a readout that uses every active feature, not only the top one: per position, the
   scaled activations are summed per label group (each object's values; "no object" for the
   background and style labels), and object o's predicted mask is the positions where o's group
   sum is the largest;
5. ``probe_auroc``: a least-squares linear probe on the raw activations for "an object covers this
   patch", fitted on the even images and scored (AUROC) on the odd ones: whether the layout is in
   the site at that step at all, whatever an SAE makes of it.

Anchor: mean IoU 0.26 at tau = 1 on SD 1.4's mid block (Tinaz et al.); goal >= 0.5 at tau = 1 for
the best toy site. Last line JSON {"iou_scaled": {site: {"tau_1.0", "tau_0.5"}},
"probe_auroc": {...}, "iou_vote": {...}, "iou": {site: {"tau_1.0": ..., "tau_0.5": ...}}, "model"}.

    OMP_NUM_THREADS=2 python benchmarks/composition.py [--prompts 128 --sites up_blocks.2.attentions.0 up_blocks.3.attentions.0]
    OMP_NUM_THREADS=2 python benchmarks/composition.py --model toy-mmdit   # transformer_blocks.1, .3, .4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common.files import claim_folder
from toyworld.benchmarks import check_sites, default_sites, run_record
from toyworld.vocab import OBJECT_ATTRIBUTES as OBJECT_ATTRS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="a toy-world model: toy (U-Net) or toy-mmdit")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--sites", nargs="+", default=None,
                    help="block sites (default: the model's, toyworld/benchmarks.py; toy: down_blocks.1.attentions.0 "
                         "up_blocks.2.attentions.0 up_blocks.3.attentions.0)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/composition")
    args = ap.parse_args()
    prog = Path(__file__).name
    args.sites = args.sites or default_sites(args.model, "blocks", prog, "--sites")
    check_sites(args.model, args.sites, prog, "--sites")
    claim_folder(args.out, run_record(__file__, args), prog=prog)  # another run's folder: refused

    from activations.config import HarvestConfig, PromptSource
    from activations.harvest import harvest
    from activations.pipeline import load_pipeline, model_defaults
    from activations.generate import schedule
    from activations.store import ActivationStore
    from analysis.toy_truth import concept_values, feature_truth, scene_of
    from sae import SAE, train_quick
    from toyworld.render import token_labels

    out = Path(args.out)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    d = model_defaults(pipe)
    steps = d["num_inference_steps"]
    taus = np.array(schedule(pipe, steps), dtype=np.float64) / pipe.scheduler.config.num_train_timesteps
    mid = int(np.argmin(np.abs(taus - 0.5)))
    store_root = out / "store"
    harvest(HarvestConfig(model=args.model, out=str(store_root), sites=list(args.sites), seed=args.seed,
                          prompts=PromptSource(kind="toyworld", num_prompts=args.prompts),
                          num_inference_steps=steps, guidance_scale=d["guidance_scale"],
                          timesteps={"steps": [0, mid]}, branch="cond", batch_size=16, progress=False), pipe=pipe)
    values = concept_values()
    obj_attrs = set(OBJECT_ATTRS)
    result, scaled, probe, vote = {}, {}, {}, {}
    for site in args.sites:
        folder, _ = train_quick(str(store_root), site=site, out=str(out / "sae"), k=args.k, expansion_factor=args.expansion,
                                epochs=args.epochs, wandb=False, recovered_images=0, seed=args.seed)
        sae = SAE.from_pretrained(folder)
        reader = ActivationStore(store_root).site(site)
        images = reader.meta_column("image")
        fit_rows, eval_rows = np.flatnonzero(images % 2 == 0), np.flatnonzero(images % 2 == 1)
        grid = reader.grid
        result[site], scaled[site], probe[site], vote[site] = {}, {}, {}, {}
        for step in (0, mid):
            gate = {"steps": [step]}
            key = f"tau_{taus[step]:.1f}"
            # each feature's label: its best concept value of any attribute; a background or style
            # label predicts "no object here"
            auc = feature_truth(sae, reader, store_root, windows=(gate,), rows=fit_rows)["auroc"][0]
            label = np.where(np.isfinite(auc).any(1), np.nanargmax(np.nan_to_num(auc, nan=-1), 1), -1)
            is_obj = np.array([a in obj_attrs for a, _ in values])
            fit_acts, fit_meta = reader.read(np.intersect1d(reader.select(window=gate), fit_rows))
            acts, meta = reader.read(np.intersect1d(reader.select(window=gate), eval_rows))
            with torch.no_grad():
                z = sae.encode(acts.float()).to_dense().clamp(min=0)
                z_max = sae.encode(fit_acts.float()).to_dense().clamp(min=0).max(0).values.clamp(min=1e-12)
            truth = {int(im): token_labels(scene_of(store_root, int(im)), grid[0])["object"] for im in np.unique(images)}
            result[site][key] = mask_iou(z, label, is_obj, meta, truth, store_root, grid, values)
            scaled[site][key] = mask_iou(z / z_max, label, is_obj, meta, truth, store_root, grid, values)
            vote[site][key] = mask_iou_vote(z / z_max, label, is_obj, meta, truth, store_root, grid, values)
            probe[site][key] = presence_probe(fit_acts, fit_meta, acts, meta, truth)
        print(json.dumps({"site": site, "grid": list(grid), "iou": result[site], "iou_scaled": scaled[site],
                          "iou_vote": vote[site], "probe_auroc": probe[site]}), flush=True)
    print(json.dumps({"iou_scaled": scaled, "probe_auroc": probe, "iou_vote": vote, "iou": result, "model": args.model}))


def present(meta, truth) -> np.ndarray:
    """[rows] bool: does an object cover the row's patch in its image's final scene."""
    return np.array([truth[int(im)][int(i), int(j)] >= 0 for im, i, j in zip(meta["image"], meta["i"], meta["j"])])


def presence_probe(fit_acts, fit_meta, acts, meta, truth) -> float:
    """AUROC on the odd images of a least-squares linear probe for "an object covers this patch",
    fitted on the even images' raw activations: is the layout in the site at all?"""
    from analysis.auroc import auroc

    X = torch.cat([fit_acts.float(), torch.ones(len(fit_acts), 1)], 1).double()
    w = torch.linalg.lstsq(X, torch.from_numpy(present(fit_meta, truth)).double()[:, None]).solution
    score = torch.cat([acts.float(), torch.ones(len(acts), 1)], 1).double() @ w
    return round(float(auroc(score.numpy(), present(meta, truth))[0, 0]), 4)


def mask_iou(z, label, is_obj, meta, truth, store_root, grid, values) -> float:
    """Mean IoU over objects: per position the top feature of ``z`` [rows, m]; object o's predicted
    mask is the positions whose top feature is labelled with one of o's attribute values."""
    from analysis.toy_truth import scene_of

    top = np.where(z.max(1).values.numpy() > 0, z.argmax(1).numpy(), -1)
    lab = np.where(top >= 0, label[top], -1)
    lab = np.where((lab >= 0) & is_obj[np.maximum(lab, 0)], lab, -1)
    ious = []
    for im in np.unique(meta["image"]):
        sel = meta["image"] == im
        pred_val = np.full(grid, -1)
        pred_val[meta["i"][sel].astype(int), meta["j"][sel].astype(int)] = lab[sel]
        for o, obj in enumerate(scene_of(store_root, int(im)).objects):
            own = [values.index((a, getattr(obj, a))) for a in OBJECT_ATTRS]
            pred = np.isin(pred_val, own)
            true = truth[int(im)] == o
            union = (pred | true).sum()
            ious.append(1.0 if union == 0 else float((pred & true).sum() / union))
    return round(float(np.mean(ious)), 4)


def mask_iou_vote(z, label, is_obj, meta, truth, store_root, grid, values) -> float:
    """Mean IoU over objects, reading every active feature: per position, ``z`` [rows, m] summed over
    the features of each label group (one group per object: its attribute values; one "no object"
    group: background and style labels); object o's predicted mask is where its group wins."""
    from analysis.toy_truth import scene_of

    z = z.numpy()
    labelled = label >= 0
    no_object = z[:, labelled & ~is_obj[np.maximum(label, 0)]].sum(1)
    ious = []
    for im in np.unique(meta["image"]):
        sel = meta["image"] == im
        objects = scene_of(store_root, int(im)).objects
        sums = [no_object[sel]]
        for obj in objects:
            own = np.isin(label, [values.index((a, getattr(obj, a))) for a in OBJECT_ATTRS])
            sums.append(z[sel][:, own].sum(1))
        winner = np.stack(sums).argmax(0) - 1  # -1: no object
        pred_obj = np.full(grid, -2)
        pred_obj[meta["i"][sel].astype(int), meta["j"][sel].astype(int)] = winner
        for o in range(len(objects)):
            pred, true = pred_obj == o, truth[int(im)] == o
            union = (pred | true).sum()
            ious.append(1.0 if union == 0 else float((pred & true).sum() / union))
    return round(float(np.mean(ious)), 4)


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
