"""The feature browser as one W&B run per SAE: a ``wandb.Table`` of the shown features (id, density,
mean activation, timestep-profile plot, top heads, top HRV concept, best toy label and AUROC, top
examples with heatmap overlays) plus the HRV heatmap and weakening curves when given.
Offline unless the user set WANDB_MODE."""

from __future__ import annotations

import os
from pathlib import Path

COLUMNS = ["id", "density", "mean_activation", "tau_profile", "top_heads", "top_hrv_concept", "truth_label",
           "truth_auroc", "top_examples"]


def _heads(row: dict) -> str:
    return ", ".join(f"{h['head']} ({h['site'].replace('.transformer_blocks.0.attn2', '')}:{h['local']}) {h['share']:+.2f}"
                     for h in row.get("top_heads", []))


def log_feature_run(report: dict, out: str | Path) -> str:
    """Log ``report`` (``build_report``'s dict, PNG paths relative to ``out``); returns the run folder."""
    import wandb

    from common.quiet import quiet_libraries

    out = Path(out)
    quiet_libraries(wandb=True)
    mode = None if "WANDB_MODE" in os.environ else "offline"
    run = wandb.init(project="diffatlas", job_type="features", dir=str(out), mode=mode,
                     name=f"features {report['site']}", config={k: report[k] for k in ("sae", "store", "site", "model", "num_latents", "rows")},
                     settings=wandb.Settings(console="off", silent=True))
    try:
        table = wandb.Table(columns=COLUMNS)
        for row in report["features"]:
            truth = row.get("truth") or {}
            hrv = row.get("hrv_concepts") or []
            table.add_data(row["id"], row["density"], row["mean"], wandb.Image(str(out / row["tau_png"])), _heads(row),
                           hrv[0]["concept"] if hrv else "", truth.get("label", ""), truth.get("auroc"),
                           wandb.Image(str(out / row["top_png"])))
        logged = {"features": table}
        # the same pictures as plain images too: wandb stores a run table's media outside the run
        # folder (its table JSON holds "Image" placeholders offline), plain images land in files/media/images
        for row in report["features"]:
            for key in ("top_png", "strip_png", "tau_png"):
                if row.get(key):
                    logged[f"feature_{row['id']}/{key[:-4]}"] = wandb.Image(str(out / row[key]))
        for key, rel in report.get("pictures", {}).items():
            logged[key] = wandb.Image(str(out / rel))
        run.log(logged)
        return str(Path(run.dir).parent)
    finally:
        run.finish()
