"""``diffatlas analyze``: head relevance vectors and ordered weakening.

    diffatlas analyze hrv configs/analysis/hrv_toy.yaml        # build HRVs (resumable)
    diffatlas analyze weaken configs/analysis/weaken_toy.yaml  # MoRHF / LeRHF / random curves
    diffatlas analyze features <sae> <store> [--hrv DIR] [--out DIR]  # feature browser (W&B + HTML)
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.errors import UsageError
from common.files import out_folder

SUBCOMMANDS = {
    "hrv": "build head relevance vectors during generation (Park et al., ICLR 2025, Section 3)",
    "weaken": "ordered weakening of heads in HRV order, scored per concept (Section 4)",
    "features": "what an SAE's features mean: statistics, heads, HRV concepts, toy truth; W&B run + HTML report",
}


def hrv_outputs(hrv, pipe, out: Path, wandb: bool) -> dict:
    """Heatmap PNG (and W&B run) of a finished HRV."""
    from activations.sites import list_sites
    from analysis.plots import hrv_heatmap, log_images

    resolutions = {s.name: s.resolution for s in list_sites(pipe) if s.kind == "head"}
    png = hrv_heatmap(hrv.hrv.numpy(), list(hrv.concepts.names), hrv.head_table, resolutions, out / "hrv_heatmap.png")
    info = {"heatmap": png}
    if wandb:
        info["wandb"] = log_images({"hrv/heatmap": png}, {"hrv/images": hrv.meta.get("images", 0)}, out, "hrv")
    return info


def run_hrv(argv: list[str]) -> int:
    from analysis.concepts import load_concepts
    from analysis.config import HRVConfig
    from analysis.construct import build_hrv, load_model
    from common.config import parse

    # bad input raises (UsageError, checked counts included); the diffatlas dispatcher prints it
    cfg = parse(HRVConfig, argv, "diffatlas analyze hrv", HRVConfig.__doc__, positional=("config",))
    load_concepts(cfg.concepts)  # a bad list fails before the model loads
    out_folder(cfg.out)
    pipe = load_model(cfg, cfg.model)
    hrv = build_hrv(cfg, pipe)
    out = Path(cfg.out)
    info = hrv_outputs(hrv, pipe, out, cfg.wandb)
    print(f"HRVs of {len(hrv.concepts)} concepts x {hrv.num_heads} heads from {hrv.meta['images']} images "
          f"x {len(hrv.step_t)} steps: {out.resolve()}")
    for name in hrv.concepts.names:
        top = ", ".join(f"{h} ({site.replace('.transformer_blocks.0.attn2', '')}:{j})" for h, site, j, _ in hrv.top_heads(name, 3))
        print(f"  {name}: top heads {top}")
    print(f"heatmap: {info['heatmap'].resolve()}")
    if info.get("wandb"):
        print(f"W&B run (offline unless WANDB_MODE is set): {info['wandb']}")
    return 0


def make_scorer(cfg, hrv):
    if cfg.scorer == "toy":
        from analysis.toy import ToyOracleScorer  # toy-specific code only when asked for

        return ToyOracleScorer()
    if not cfg.clip:
        raise UsageError("scorer 'clip' needs clip: a local CLIP folder (transformers CLIPModel + tokenizer)")
    from analysis.clip_score import ClipScorer

    return ClipScorer.from_folder(cfg.clip, template=cfg.template, concepts=hrv.concepts)


def run_weaken(argv: list[str]) -> int:
    from analysis.config import WeakenConfig
    from analysis.construct import load_model, sampling_defaults
    from analysis.hrv import HRV
    from analysis.plots import log_images
    from analysis.weakening import run_weakening, save_results, summary
    from common.config import parse, save_config

    cfg = parse(WeakenConfig, argv, "diffatlas analyze weaken", WeakenConfig.__doc__, positional=("config",))
    out_folder(cfg.out)
    hrv = HRV.load(cfg.hrv)
    model = cfg.model or hrv.meta.get("model", "toy")
    pipe = load_model(cfg, model)
    scorer = make_scorer(cfg, hrv)
    steps, guidance = sampling_defaults(pipe, cfg.steps, cfg.guidance)
    results = run_weakening(hrv, pipe, scorer, cfg.concepts, images_per_point=cfg.images_per_point,
                            points=cfg.points, seed=cfg.seed, steps=steps, guidance=guidance, factor=cfg.factor,
                            tokens=cfg.tokens, batch_size=cfg.batch_size, progress=cfg.progress)
    head = summary(results, cfg.images_per_point)
    js, png = save_results(results, cfg.out, scorer.ylabel, {"summary": head, "model": model, "steps": steps, "guidance": guidance})
    save_config(cfg, Path(cfg.out) / "weaken_config.yaml")
    for c, v in head["concepts"].items():
        print(f"  {c}: A_LeRHF - A_MoRHF = {v['area_between']:+.3f}, A_random - A_MoRHF = {v['area_vs_random']:+.3f}")
    print(f"curves: {png.resolve()}\nresults: {js.resolve()}")
    if cfg.wandb:
        flat = {f"weaken/{c}/{k}": v[k] for c, v in head["concepts"].items() for k in v}
        print(f"W&B run (offline unless WANDB_MODE is set): {log_images({'weaken/curves': png}, flat, cfg.out, 'weaken')}")
    return 0


def run_features(argv: list[str]) -> int:
    from common.config import parse, save_config
    from analysis.feature_report import FeaturesConfig, build_report

    cfg = parse(FeaturesConfig, argv, "diffatlas analyze features", FeaturesConfig.__doc__, positional=("sae", "store"))
    if not cfg.sae or not cfg.store:
        raise UsageError("give the SAE folder and the store: diffatlas analyze features <sae> <store> [--hrv DIR] [--out DIR]")
    out_folder(cfg.out)
    report = build_report(cfg)
    out = Path(cfg.out)
    save_config(cfg, out / "features_config.yaml")
    print(f"{len(report['features'])} features of {report['num_latents']} at {report['site']} over {report['rows']} rows: {out.resolve()}")
    return finish_features(cfg, report)


def finish_features(cfg, report) -> int:
    """W&B run and HTML report of a built feature report; prints where both are."""
    out = Path(cfg.out)
    if cfg.html:
        from analysis.feature_html import write_html

        print(f"HTML report (open from disk): {write_html(report, out).resolve()}")
    if cfg.wandb:
        from analysis.feature_wandb import log_feature_run

        run = log_feature_run(report, out)
        print(f"W&B run (offline unless WANDB_MODE is set): {run}\n  upload it with: wandb sync {run}")
    return 0


def _usage() -> str:
    lines = ["usage: diffatlas analyze <subcommand> <config.yaml> [--field value ...]", "", "subcommands:"]
    lines += [f"  {k:<8} {v}" for k, v in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise UsageError(f"unknown subcommand {name!r}; valid subcommands: {', '.join(SUBCOMMANDS)}")
    return {"hrv": run_hrv, "weaken": run_weaken, "features": run_features}[name](rest)


if __name__ == "__main__":
    sys.exit(main())
