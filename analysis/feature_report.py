"""``diffatlas analyze features``: everything known about an SAE's features, in one folder.

    diffatlas analyze features <sae> <store> [--hrv DIR] [--out DIR] [--features N] ...

Writes under ``out``: ``stats/`` (``FeatureStats``), ``report.json`` (per shown feature: top heads,
top HRV concepts, best toy ground-truth label and AUROC), ``toy_auroc.npy`` (on the toy: [windows,
features, values], every feature), ``attribution.safetensors`` ([m, heads]), ``png/`` (top images
with heatmaps, step strip, timestep profile per shown feature), then one W&B run
(``analysis.feature_wandb``) and a static HTML report (``analysis.feature_html``).
``FeatureLabels.load(out)`` reads each feature's labels back (the explorer shows them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from common.errors import UsageError


@dataclass
class FeaturesConfig:
    """Feature statistics, links and browsers (W&B run + static HTML) of one trained SAE over a store."""

    sae: str = ""
    """the SAE folder (or a folder of SAEs with --site)"""
    store: str = ""
    """the activation store the SAE reads (a harvest folder)"""
    site: Optional[str] = None
    """the site (default: the SAE's placement)"""
    hrv: Optional[str] = None
    """an HRV folder (``diffatlas analyze hrv``): features get their top HRV concepts; its heatmap is logged"""
    weaken: Optional[str] = None
    """a weakening results folder (``diffatlas analyze weaken``): its curves PNG is logged"""
    out: str = "runs/features"
    """output folder (stats, links, PNGs, HTML report, W&B run)"""
    features: int = 32
    """features shown (pictures, head links, table rows): the densest ones that fire"""
    top_k: int = 16
    """top tokens kept per feature"""
    rows: Literal["site", "trained"] = "site"
    """rows the statistics describe: site (every row of the site) or trained (the SAE's own window
    and branch, from its placement: what it was trained on)"""
    examples: int = 4
    """top tokens per feature rerun for the head attribution (0: no head links)"""
    attribution: Literal["direct", "total"] = "direct"
    """head attribution of a block-site SAE: direct (the block's own heads' write, projected on the
    feature) or total (every head's total effect, by attribution patching)"""
    images: int = 4
    """top images per feature picture"""
    model: Optional[str] = None
    """model for the head attribution rerun (default: the store's model)"""
    device: Optional[str] = None
    """torch device of the rerun"""
    wandb: bool = True
    """log the feature browser run to W&B (offline unless WANDB_MODE is set)"""
    html: bool = True
    """write the static HTML report"""
    progress: bool = True
    """progress bars"""


def shown_features(stats, n: int) -> list[int]:
    alive = torch.nonzero(stats.density > 0).reshape(-1)
    order = alive[torch.argsort(stats.density[alive], descending=True)]
    return [int(f) for f in order[:n]]


def saved_stats(sae, reader, store_root, top_k: int, rows: int | None = None, rows_of: str = "site"):
    """The statistics the training pass saved next to ``sae`` (``<sae folder>/feature_stats``) when
    they are exactly what ``compute_feature_stats`` would give here (same weights, store, site,
    rows, ``top_k``, default ``cooc_top``); else None (and why, at INFO level)."""
    import logging

    from sae.stats import SAE_STATS_DIR, FeatureStats, stats_match

    folder = Path(sae.source) / SAE_STATS_DIR if getattr(sae, "source", None) is not None else None
    if folder is None or not folder.is_dir():
        return None
    log = logging.getLogger(__name__)
    try:
        stats = FeatureStats.load(folder)
    except (FileNotFoundError, OSError, ValueError, KeyError) as err:
        log.info("not reusing %s: %s", folder, err)
        return None
    why = stats_match(stats, sae, reader, store_root=store_root, rows=rows, rows_of=rows_of, top_k=top_k)
    if why is not None:
        log.info("not reusing the feature statistics in %s (%s): computing them", folder, why)
        return None
    stats.info["sae"] = str(sae.source)
    log.info("reusing the feature statistics of the training run in %s", folder)
    return stats


def build_report(cfg: FeaturesConfig, pipe=None) -> dict:
    """Compute and save everything; returns the report dict (also ``out/report.json``)."""
    from activations.store import ActivationStore
    from analysis.feature_plots import step_strip_png, tau_profile_png, top_images_png
    from analysis.features import compute_feature_stats
    from sae import SAE

    sae = SAE.from_pretrained(cfg.sae, site=cfg.site)
    store = ActivationStore(cfg.store)
    record = store.record()  # {} for a synthetic store: no harvest config, no model to rerun
    sae.check_model(record.get("model_revision"), f"store {store.root}")
    site = cfg.site or sae.placement.site
    if site is None:
        raise UsageError(f"the SAE at {cfg.sae} records no site; pass --site (sites of the store: {', '.join(store.sites)})")
    reader = store.site(site)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    from sae.stats import ROWS_SITE, trained_rows

    rows, rows_of = trained_rows(reader, sae.placement) if cfg.rows == "trained" else (None, ROWS_SITE)
    stats = saved_stats(sae, reader, store.root, cfg.top_k, rows=None if rows is None else len(rows), rows_of=rows_of)
    if stats is None:
        stats = compute_feature_stats(sae, reader, rows=rows, rows_of=rows_of, top_k=cfg.top_k, progress=cfg.progress,
                                      store_root=str(store.root))
    stats.save(out / "stats")
    feats = shown_features(stats, cfg.features)
    model = cfg.model or record.get("config", {}).get("model") or sae.placement.model
    is_toy = model == "toy" and (store.root / "images").is_dir() and any((store.root / "images").glob("*.json"))

    rows = {f: {"id": f, "density": float(stats.density[f]), "mean": float(stats.mean[f]),
                "mean_active": float(stats.mean_active[f]), "max": float(stats.max[f]),
                "cooccurring": [int(c) for c in stats.cooc_idx[f] if int(c) >= 0][:5]} for f in feats}
    # pictures
    for f in feats:
        png = out / "png"
        rows[f]["top_png"] = str(top_images_png(stats, sae, reader, f, png / f"f{f}_top.png", n=cfg.images, store_root=store.root).relative_to(out))
        rows[f]["tau_png"] = str(tau_profile_png(stats, f, png / f"f{f}_tau.png").relative_to(out))
        ex = stats.top_examples(f, 1)
        if ex:
            branch = "cond" if ex[0]["branch"] == 1 else "uncond"
            rows[f]["strip_png"] = str(step_strip_png(sae, reader, f, ex[0]["image"], png / f"f{f}_strip.png", branch=branch,
                                                      store_root=store.root).relative_to(out))
    # feature -> heads (and HRV concepts)
    hrv = None
    if cfg.examples > 0 and model is not None and record:
        from activations.families import denoiser_of
        from activations.pipeline import load_pipeline, model_fingerprint
        from analysis.feature_heads import feature_head_attribution, top_heads
        from safetensors.torch import save_file

        if pipe is None:
            pipe = load_pipeline(model, device=cfg.device)
            pipe.set_progress_bar_config(disable=True)
        sae.check_model(model_fingerprint(denoiser_of(pipe)), f"model {model!r}")
        res = feature_head_attribution(sae, pipe, store.root, stats, method=cfg.attribution, features=feats,
                                       examples=cfg.examples, progress=cfg.progress)
        att = res["attribution"]
        save_file({"attribution": att.contiguous()}, str(out / "attribution.safetensors"))
        for f in feats:
            rows[f]["top_heads"] = [{"head": h, "site": s, "local": j, "share": v} for h, s, j, v in top_heads(att, res["head_table"], f, 3)]
        if cfg.hrv:
            from analysis.feature_concepts import concept_scores, top_concepts
            from analysis.hrv import HRV

            hrv = HRV.load(cfg.hrv)
            scores = concept_scores(hrv.hrv, att)
            for f in feats:
                rows[f]["hrv_concepts"] = [{"concept": c, "score": v} for c, v in top_concepts(scores, list(hrv.concepts.names), f, 3)]
    # feature -> toy ground truth
    truth_values = None
    if is_toy:
        from analysis.toy_truth import best_labels, feature_truth

        truth = feature_truth(sae, reader, store.root)
        np.save(out / "toy_auroc.npy", truth["auroc"])
        truth_values = truth["values"]  # the names of toy_auroc.npy's last axis, for FeatureLabels
        best_all = best_labels(_best_over_windows(truth["auroc"]), truth["values"])
        for f in feats:
            label, auc = best_all[f]
            w = int(np.nanargmax(np.nan_to_num(truth["auroc"][:, f, truth["values"].index(label)], nan=-1))) if label else 0
            rows[f]["truth"] = {"label": label, "auroc": auc, "window": truth["windows"][w] if label else None}
    report = {"sae": str(sae.source), "store": str(store.root), "site": site, "model": model, "toy": is_toy,
              "num_latents": sae.num_latents, "rows": stats.info["rows"], "features": [rows[f] for f in feats],
              "hrv": str(cfg.hrv) if cfg.hrv else None, "truth_values": truth_values}
    extra = {}
    if hrv is not None and pipe is not None:
        from activations.sites import list_sites
        from analysis.plots import hrv_heatmap

        res = {s.name: s.resolution for s in list_sites(pipe) if s.kind == "head"}
        png = hrv_heatmap(hrv.hrv.numpy(), list(hrv.concepts.names), hrv.head_table, res, out / "hrv_heatmap.png")
        extra["hrv_heatmap"] = str(Path(png).relative_to(out))
    if cfg.weaken:
        curves = sorted(Path(cfg.weaken).glob("*.png"))
        if curves:
            import shutil

            shutil.copy(curves[0], out / "weakening_curves.png")
            extra["weakening_curves"] = "weakening_curves.png"
    report["pictures"] = extra
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def _best_over_windows(auroc_wfv: np.ndarray) -> np.ndarray:
    """[features, values]: each (feature, value)'s best AUROC over the windows (NaN where none)."""
    a = np.where(np.isfinite(auroc_wfv), auroc_wfv, -np.inf).max(0)
    return np.where(np.isfinite(a), a, np.nan)


@dataclass
class FeatureLabels:
    """What a ``build_report`` folder says each feature means, read back (``FeatureLabels.load``):
    its density over the whole store (every feature), its top HRV concept (only the features the
    report shows: only those were rerun for their heads) and, on the toy, its best ground-truth
    label with that label's AUROC, best over the timestep windows (every feature)."""

    folder: Path
    site: str
    model: Optional[str]
    num_latents: int
    density: np.ndarray
    """[m] fraction of the store's rows where the feature fires"""
    hrv: dict[int, tuple[str, float]]
    """feature -> (top HRV concept, its score), for the features the report shows"""
    truth: Optional[list[tuple[str, float]]]
    """[m] (best ground-truth label, AUROC), ("", nan) where none; None off the toy"""

    @classmethod
    def load(cls, folder: str | Path) -> "FeatureLabels":
        from analysis.features import FeatureStats

        folder = Path(folder)
        if not (folder / "report.json").is_file():
            raise FileNotFoundError(f"{folder} is not a feature analysis folder: report.json is missing "
                                    "(write one with `diffatlas analyze features`)")
        report = json.loads((folder / "report.json").read_text())
        stats = FeatureStats.load(folder / "stats")
        hrv = {int(r["id"]): (r["hrv_concepts"][0]["concept"], float(r["hrv_concepts"][0]["score"]))
               for r in report["features"] if r.get("hrv_concepts")}
        truth = None
        if (folder / "toy_auroc.npy").is_file():
            from analysis.toy_truth import best_labels, concept_values

            # folders written before report.json named the values hold them in concept_values() order
            values = report.get("truth_values") or [f"{a}={v}" for a, v in concept_values()]
            truth = best_labels(_best_over_windows(np.load(folder / "toy_auroc.npy")), values)
        return cls(folder=folder, site=report["site"], model=report.get("model"), num_latents=int(report["num_latents"]),
                   density=stats.density.numpy(), hrv=hrv, truth=truth)

    def check_sae(self, sae) -> None:
        """Refuse labels of another SAE: another model, site or number of features."""
        p = sae.placement
        # a model either side does not record is no evidence against the other
        ours = (self.model or p.model, self.site, self.num_latents)
        theirs = (p.model or self.model, p.site, sae.num_latents)
        if ours != theirs:
            raise UsageError(f"the feature analysis in {self.folder} is of an SAE of model {self.model!r} at site "
                             f"{self.site!r} with {self.num_latents} features, but this SAE is of model {theirs[0]!r} "
                             f"at site {p.site!r} with {sae.num_latents}; give the folder that "
                             "`diffatlas analyze features` wrote for this SAE")

    def of(self, feature: int) -> dict:
        """One feature's labels, JSON-able (None where the analysis has none)."""
        f = int(feature)
        concept, score = self.hrv.get(f, (None, None))
        label, auc = self.truth[f] if self.truth is not None else ("", float("nan"))
        return {"density": float(self.density[f]), "hrv_concept": concept, "hrv_score": score,
                "truth": label or None, "auroc": auc if label else None}
