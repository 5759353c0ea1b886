"""Concept recovery on the toy world: do an SAE's features detect the ground-truth concepts, better
than the site's raw channels, and do their heads' HRVs name the right attribute?

1. harvest the bundled toy model on ``--prompts`` toyworld prompts (one image each, the model's
   default steps and guidance), block site ``--site`` at the steps of ``--every``;
2. train a TopK SAE (``sae.train_quick``: ``--k``, ``--expansion``, ``--epochs``);
3. per ground-truth concept value (``toyworld.render.token_labels``: every value of color, shape,
   texture, size, position, background, style), over all harvested steps: choose the best feature
   (highest AUROC) on the even images and report its AUROC on the odd images; the same for the best
   single raw channel (either sign: a channel may detect a value by going down, while a feature's
   activation is used as is), the baseline an SAE must beat;
4. HRVs of the seven toy attributes from ``--hrv-prompts`` prompts (``analysis.build_hrv``); each
   chosen feature's head attribution (``analysis.feature_heads``, rerun of its top ``--examples``
   tokens) times the HRVs gives its top HRV concept; ``hrv_agreement`` is the fraction of chosen
   features whose top HRV concept is the attribute of their best ground-truth label, and
   ``hrv_chance`` the agreement expected if the two were independent (sum over attributes of the
   product of their frequencies among those features). ``hrv_agreement_lift``: the same with
   each concept's score divided by its mean over the chosen features (``concept_lift``).

Goals (issue 12): sae_mean_auroc >= 0.95, sae_frac_ge_0.95 >= 0.8, above neuron_mean_auroc.
Last line JSON {"sae_mean_auroc", "sae_frac_ge_0.95", "neuron_mean_auroc", "hrv_agreement",
"hrv_chance", "hrv_agreement_lift", "hrv_chance_lift", "per_value": {value: {"sae", "neuron", "feature"}}}.

    OMP_NUM_THREADS=2 python benchmarks/concept_recovery.py [--prompts 256 --every 4 --out runs/bench/concepts]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--site", default="up_blocks.2.attentions.0")
    ap.add_argument("--every", type=int, default=4, help="harvest every N-th sampling step")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--hrv-prompts", type=int, default=16)
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/concepts")
    args = ap.parse_args()

    from activations.config import HarvestConfig, PromptSource
    from activations.harvest import harvest
    from activations.pipeline import load_pipeline, model_defaults
    from activations.store import ActivationStore
    from analysis.config import HRVConfig
    from analysis.construct import build_hrv
    from analysis.feature_concepts import concept_lift, concept_scores
    from analysis.feature_heads import feature_head_attribution
    from analysis.features import compute_feature_stats
    from analysis.toy_truth import channel_truth, feature_truth
    from sae import SAE, train_quick

    out = Path(args.out)
    t0 = time.time()
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    d = model_defaults(pipe)
    store_root = out / "store"
    harvest(HarvestConfig(model="toy", out=str(store_root), sites=[args.site], seed=args.seed,
                          prompts=PromptSource(kind="toyworld", num_prompts=args.prompts),
                          num_inference_steps=d["num_inference_steps"], guidance_scale=d["guidance_scale"],
                          timesteps={"every": args.every}, branch="cond", batch_size=16, progress=False), pipe=pipe)
    t_harvest = time.time() - t0
    folder, metrics = train_quick(str(store_root), site=args.site, out=str(out / "sae"), k=args.k,
                                  expansion_factor=args.expansion, epochs=args.epochs, wandb=False,
                                  recovered_images=0, seed=args.seed)
    sae = SAE.from_pretrained(folder)
    reader = ActivationStore(store_root).site(args.site)
    images = reader.meta_column("image")
    fit_rows = np.flatnonzero(images % 2 == 0)
    eval_rows = np.flatnonzero(images % 2 == 1)
    fit = feature_truth(sae, reader, store_root, windows=("all",), rows=fit_rows)
    ev = feature_truth(sae, reader, store_root, windows=("all",), rows=eval_rows)
    values = fit["values"]
    ch_fit = channel_truth(reader, store_root, rows=fit_rows)
    ch_ev = channel_truth(reader, store_root, rows=eval_rows)
    per_value, chosen = {}, {}
    for v, name in enumerate(values):
        col = fit["auroc"][0, :, v]
        if not np.isfinite(col).any():
            continue
        f = int(np.nanargmax(col))
        c = int(np.nanargmax(ch_fit[:, v]))
        per_value[name] = {"sae": round(float(ev["auroc"][0, f, v]), 4), "neuron": round(float(ch_ev[c, v]), 4), "feature": f}
        chosen.setdefault(f, name)
    sae_auc = np.array([p["sae"] for p in per_value.values()])
    neu_auc = np.array([p["neuron"] for p in per_value.values()])
    print(json.dumps({"stage": "truth", "values": len(per_value), "features_chosen": len(chosen),
                      "fvu": round(float(metrics.get("metrics/fvu", float("nan"))), 4), "harvest_s": round(t_harvest, 1)}))

    # HRVs and the chosen features' head attribution
    hrv = build_hrv(HRVConfig(model="toy", concepts="toy", prompts=PromptSource(kind="toyworld", num_prompts=args.hrv_prompts),
                              prompt_seed=args.seed, out=str(out / "hrv"), progress=False, wandb=False), pipe)
    stats = compute_feature_stats(sae, reader, progress=False, store_root=str(store_root))
    att = feature_head_attribution(sae, pipe, store_root, stats, features=sorted(chosen), examples=args.examples,
                                   progress=False)["attribution"]
    scores = concept_scores(hrv.hrv, att)
    names = list(hrv.concepts.names)

    def agreement(scores_mc):
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
    hrv_agreement, hrv_chance, tops = agreement(scores)
    lift_agreement, lift_chance, lift_tops = agreement(lift)
    print(json.dumps({"stage": "hrv", "features": len(chosen), "top_hrv_concepts": tops, "top_lift_concepts": lift_tops,
                      "hrv_agreement_lift": lift_agreement, "hrv_chance_lift": lift_chance,
                      "total_s": round(time.time() - t0, 1)}))
    print(json.dumps({"sae_mean_auroc": round(float(sae_auc.mean()), 4),
                      "sae_frac_ge_0.95": round(float((sae_auc >= 0.95).mean()), 4),
                      "neuron_mean_auroc": round(float(neu_auc.mean()), 4),
                      "hrv_agreement": hrv_agreement, "hrv_chance": hrv_chance,
                      "hrv_agreement_lift": lift_agreement, "hrv_chance_lift": lift_chance,
                      "per_value": per_value}))


if __name__ == "__main__":
    main()
