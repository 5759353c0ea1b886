"""``diffatlas demo``: the whole chain on the bundled toy model, end to end, on a CPU.

1. generate toy images from prompts the model never saw in training, and let the pixel oracle
   check each one (a labelled grid PNG);
2. harvest a small toy set: a block site at every sampling step, into a resumable store;
3. train a small TopK SAE on that site's early steps with Lightning and print its metrics and the
   W&B run;
4. build head relevance vectors of the seven toy attributes on a few prompts and print each
   attribute's top heads and where the heatmap is;
5. what the SAE's features mean: statistics, top images with heatmaps, heads, HRV concepts and
   toy ground truth, logged as one W&B run and written as a static HTML report;
6. steer: captions that leave the position unsaid (the noise decides where the object goes, as in
   Tinaz et al.'s prompts), and a spatial edit of the SAE's object features in one quadrant at
   the steps the SAE was trained on, written as a recipe; prints how many objects moved there,
   and a before/after grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class DemoConfig:
    out: str = "outputs/demo"
    """Folder for everything the demo writes."""
    num_images: int = 12
    """Images in the generated grid."""
    seed: int = 0
    """Seed for the scenes, prompts and sampling noise."""
    device: str | None = None
    """torch device (default: CUDA when available)."""
    harvest_prompts: int = 32
    """Toy prompts harvested (one image each)."""
    site: str = "up_blocks.2.attentions.0"
    """Block site harvested and given an SAE (8x8 tokens per image in the toy model)."""
    sae_epochs: int = 2
    """Epochs of SAE training over the demo harvest."""
    sae_window: str = "early"
    """Sampling steps the SAE is trained on (early: where the noise decides the layout, which the
    steering step edits; its features are read and edited on these steps only)."""
    hrv_prompts: int = 16
    """Toy prompts the demo's head relevance vectors are built from."""
    features: int = 16
    """SAE features shown in the feature browser (the densest ones)."""
    feature_examples: int = 2
    """Top tokens per shown feature rerun to attribute it to heads."""
    steer_images: int = 4
    """Images steered in the last step (before/after grid)."""
    steer_strength: float = 2.0
    """β of the spatial feature edit (features set to β·‖Z_ij‖ in the target quadrant)."""
    steer_quadrant: str = "top left"
    """The quadrant the steering step moves objects to: top left, top right, bottom left, bottom right."""


def step_generate(cfg: DemoConfig, pipe) -> Path:
    from activations.generate import generate
    from activations.pipeline import model_defaults
    from toyworld.grid import labelled_grid
    from toyworld.prompts import scene_to_prompt
    from toyworld.scene import sample_scene

    rng = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng, split="test") for _ in range(cfg.num_images)]
    prompts = [scene_to_prompt(s, rng) for s in scenes]
    defaults = model_defaults(pipe)
    jobs = [(prompt, cfg.seed + k) for k, prompt in enumerate(prompts)]
    images = [np.asarray(image) for _, _, image in generate(
        pipe, jobs, defaults["num_inference_steps"], defaults["guidance_scale"], progress=False)]
    grid, accuracy = labelled_grid(images, scenes, prompts)
    path = Path(cfg.out) / "generated_grid.png"
    grid.save(path)
    print(f"[1] generated {len(images)} images from held-out prompts; the oracle finds {accuracy:.0%} "
          f"entirely correct\n    grid: {path.resolve()}")
    return path


def step_harvest(cfg: DemoConfig, pipe) -> Path:
    from activations.config import HarvestConfig, PromptSource
    from activations.harvest import describe_store, harvest
    from activations.pipeline import model_defaults

    defaults = model_defaults(pipe)
    out = Path(cfg.out) / "harvest"
    harvest(
        HarvestConfig(
            model="toy", out=str(out), sites=[cfg.site], seed=cfg.seed,
            prompts=PromptSource(kind="toyworld", num_prompts=cfg.harvest_prompts),
            num_inference_steps=defaults["num_inference_steps"], guidance_scale=defaults["guidance_scale"],
            timesteps="all", branch="cond", batch_size=8, progress=False,
        ),
        pipe=pipe,
    )
    print("[2] harvested " + describe_store(out).replace("\n", "\n    "))
    return out


def step_sae(cfg: DemoConfig, pipe, store: Path) -> Path:
    from sae import train_quick

    folder, metrics = train_quick(str(store), site=cfg.site, window=cfg.sae_window, out=str(Path(cfg.out) / "sae"),
                                  epochs=cfg.sae_epochs, pipeline=pipe, seed=cfg.seed)
    headline = ("metrics/fvu", "metrics/l0", "sparsity/dead_fraction_val", "metrics/fraction_recovered")
    shown = {k.split("/")[-1]: round(float(metrics[k]), 4) for k in headline if k in metrics}
    print(f"[3] trained a TopK SAE on {cfg.site}, {cfg.sae_window} steps: {shown}\n    SAE: {folder.resolve()}")
    if "wandb_dir" in metrics:
        print(f"    W&B run (offline unless WANDB_MODE is set): {metrics['wandb_dir']}\n"
              f"    upload it with: wandb sync {metrics['wandb_dir']}")
    return folder


def step_hrv(cfg: DemoConfig, pipe) -> Path:
    from activations.config import PromptSource
    from analysis.cli import hrv_outputs
    from analysis.config import HRVConfig
    from analysis.construct import build_hrv

    out = Path(cfg.out) / "hrv"
    hrv = build_hrv(HRVConfig(model="toy", concepts="toy", prompts=PromptSource(kind="toyworld", num_prompts=cfg.hrv_prompts),
                              prompt_seed=cfg.seed, out=str(out), progress=False, wandb=False), pipe)
    png = hrv_outputs(hrv, pipe, out, wandb=False)["heatmap"]
    print(f"[4] head relevance vectors of {len(hrv.concepts)} toy attributes x {hrv.num_heads} heads "
          f"from {cfg.hrv_prompts} prompts; top heads (global index):")
    for name in hrv.concepts.names:
        print(f"    {name:<10} {', '.join(str(h) for h, *_ in hrv.top_heads(name, 5))}")
    print(f"    heatmap: {png.resolve()}")
    return out


def step_features(cfg: DemoConfig, pipe, store: Path, sae: Path, hrv: Path) -> Path:
    from analysis.cli import finish_features
    from analysis.feature_report import FeaturesConfig, build_report

    fcfg = FeaturesConfig(sae=str(sae), store=str(store), site=cfg.site, hrv=str(hrv), out=str(Path(cfg.out) / "features"),
                          features=cfg.features, examples=cfg.feature_examples, progress=False)
    report = build_report(fcfg, pipe=pipe)
    best = sorted((r for r in report["features"] if r.get("truth")), key=lambda r: -r["truth"]["auroc"])[:3]
    print(f"[5] feature browser: {len(report['features'])} of {report['num_latents']} features (statistics, top images, "
          f"heads, HRV concepts, toy labels); best labelled: "
          + ", ".join(f"{r['id']}={r['truth']['label']} (AUROC {r['truth']['auroc']:.2f})" for r in best))
    finish_features(fcfg, report)
    return Path(fcfg.out)
def step_steer(cfg: DemoConfig, pipe, store: Path, sae_folder: Path) -> Path:
    from sae.sparse_coder import SparseCoder
    from steering import FeatureEdit, Recipe, run_recipe
    from common.images import before_after_grid
    from steering.toy import object_features
    from toyworld.oracle import read_positions
    from toyworld.prompts import Named, scene_to_prompt
    from toyworld.scene import sample_scene

    sae = SparseCoder.from_pretrained(sae_folder)
    # the SAE's own window, from its saved placement: its features are chosen and edited where it was trained
    feats = object_features(str(store), cfg.site, sae, n=4, window=sae.placement.window)
    target = cfg.steer_quadrant
    rng = np.random.default_rng(cfg.seed + 7)
    scenes = [sample_scene(rng, num_objects=1, split="train") for _ in range(cfg.steer_images)]
    # position-free captions: where each object goes is the noise's to decide, and the edit's
    prompts = [scene_to_prompt(s, named=Named.all_but(s, "position")) for s in scenes]
    recipe = Recipe(model="toy", prompts=prompts, seeds=list(range(len(scenes))),
                    interventions=[FeatureEdit(sae=str(sae_folder), features=[f for f, _ in feats], op="spatial",
                                               strength=cfg.steer_strength, region={"quadrant": target})])
    out = Path(cfg.out) / "steer"
    recipe.save(out / "recipe.yaml")
    before, after = run_recipe(recipe, pipe)
    grid = out / "before_after.png"
    before_after_grid(before, after, 4).save(grid)

    def there(image) -> bool:
        return target in read_positions(np.asarray(image))

    elsewhere = [k for k, image in enumerate(before) if not there(image)]
    moved = sum(there(after[k]) for k in elsewhere)
    print(f"[6] steered {len(after)} images of captions without a position: object features {[f for f, _ in feats]} "
          f"(correlation with the object's mask {[c for _, c in feats]}) set in the {target} quadrant at "
          f"{sae.placement.window_label} steps (the SAE's window); "
          f"moved there: {moved} of the {len(elsewhere)} objects the noise had put elsewhere "
          f"({len(before) - len(elsewhere)} were there already)\n"
          f"    recipe: {(out / 'recipe.yaml').resolve()} (rerun: diffatlas steer {out / 'recipe.yaml'})\n"
          f"    before/after grid (top: plain, bottom: steered): {grid.resolve()}")
    return grid


def main(argv: list[str] | None = None) -> int:
    from activations.pipeline import load_pipeline
    from common.config import parse, save_config
    from activations.masks import QUADRANTS
    from activations.timesteps import parse_when
    from common.errors import UsageError

    cfg = parse(DemoConfig, argv, "diffatlas demo", __doc__.split("\n\n")[0])
    if cfg.steer_quadrant not in QUADRANTS:
        raise UsageError(f"--steer_quadrant {cfg.steer_quadrant!r} is not a quadrant; valid: {', '.join(QUADRANTS)}")
    try:  # a bad window: one line naming the valid ones, before any work
        parse_when(cfg.sae_window)
    except UsageError as err:
        raise UsageError(f"--sae_window: {err}") from None
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.out) / "demo_config.yaml")
    pipe = load_pipeline("toy", device=cfg.device)  # a missing toy model: one line from the dispatcher
    pipe.set_progress_bar_config(disable=True)
    step_generate(cfg, pipe)
    store = step_harvest(cfg, pipe)
    sae = step_sae(cfg, pipe, store)
    hrv = step_hrv(cfg, pipe)
    step_features(cfg, pipe, store, sae, hrv)
    step_steer(cfg, pipe, store, sae)
    return 0
