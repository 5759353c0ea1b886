"""Quality of a TopK SAE on the toy world: harvest the bundled toy model, train on one block site,
report held-out FVU, L0, dead fraction and loss recovered.

Goals (issue 4): fvu <= 0.15 at l0 <= 32, dead_fraction <= 0.05, fraction_recovered >= 0.90.

- fvu, l0: on held-out images (the data module splits by image), all timesteps pooled;
- dead_fraction: latents that never fire on those held-out tokens;
- fraction_recovered: denoising loss of the denoiser (U-Net or MMDiT) with the site's residual update replaced by the
  SAE reconstruction, scored against zero ablation (also printed: against mean ablation).

    OMP_NUM_THREADS=2 python benchmarks/sae_quality.py [--prompts 256 --site up_blocks.2.attentions.0]
    OMP_NUM_THREADS=2 python benchmarks/sae_quality.py --model toy-mmdit     # transformer_blocks.4

Prints a JSON line with every setting and metric, then the headline
{"fvu", "l0", "dead_fraction", "fraction_recovered", "model"} last.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common.files import claim_folder
from toyworld.benchmarks import check_sites, default_sites, run_record


def harvest_toy(out: Path, args, pipe):
    from activations.config import HarvestConfig, PromptSource
    from activations.harvest import harvest

    cfg = HarvestConfig(model=args.model, out=str(out), sites=[args.site],
                        prompts=PromptSource(kind="toyworld", num_prompts=args.prompts),
                        num_inference_steps=args.steps, guidance_scale=args.guidance, branch="cond",
                        batch_size=args.harvest_batch, images_per_shard=max(args.harvest_batch, 32), seed=0)
    return harvest(cfg, pipe=pipe)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="a toy-world model: toy (U-Net) or toy-mmdit")
    p.add_argument("--site", default=None,
                   help="block site to train on (default: the model's, toyworld/benchmarks.py; toy: up_blocks.2.attentions.0)")
    p.add_argument("--prompts", type=int, default=256, help="toy-world prompts harvested (one image each)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per image (all captured)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale of the harvest (the toy models' default)")
    p.add_argument("--harvest-batch", type=int, default=16)
    p.add_argument("--expansion", type=int, default=8, help="latents per input dimension")
    p.add_argument("--k", type=int, default=32, help="TopK k (the goal is measured at l0 <= 32)")
    p.add_argument("--batch", type=int, default=1024, help="training batch (tokens)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default: Gao et al.'s scaling rule")
    p.add_argument("--recovered-images", type=int, default=8)
    p.add_argument("--out", default=None, help="keep the harvest and the SAE here (default: a temporary folder)")
    p.add_argument("--random-weights", action="store_true",
                   help="use the model's toy architecture with random weights (when the trained weights are absent; "
                        "figures are then only a smoke test)")
    args = p.parse_args(argv)
    prog = Path(__file__).name
    args.site = args.site or default_sites(args.model, "block", prog, "--site")
    check_sites(args.model, args.site, prog, "--site")
    if args.random_weights and args.model not in ("toy", "toy-mmdit"):
        raise SystemExit(f"{prog}: error: --random-weights builds a toy architecture: --model toy or toy-mmdit, got {args.model!r}")
    if args.out is not None:  # None: a temporary folder, nobody else's
        claim_folder(args.out, run_record(__file__, args), prog=prog)  # another run's folder: refused
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import lightning.pytorch as pl

    from sae.config import SparseCoderConfig
    from sae.data import ActivationDataModule
    from sae.lit import LitSAE, RecoveredConfig

    if args.random_weights and args.model == "toy-mmdit":
        from toyworld.model_mmdit import build_mmdit_pipeline

        pipe = build_mmdit_pipeline(seed=0)
    elif args.random_weights:
        from toyworld.model import build_pipeline

        pipe = build_pipeline(seed=0)
    else:
        from activations import load_pipeline

        pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)

    tmp = tempfile.TemporaryDirectory()
    root = Path(args.out or tmp.name)
    store = root / "harvest"
    t0 = time.perf_counter()
    harvest_toy(store, args, pipe)
    t_harvest = time.perf_counter() - t0

    pl.seed_everything(0, verbose=False)
    dm = ActivationDataModule(str(store), site=args.site, branch="cond", batch_size=args.batch, val_fraction=0.1)
    dm.setup()
    tokens_per_epoch = len(dm.train_ids)
    model = LitSAE(
        SparseCoderConfig(architecture="topk", expansion_factor=args.expansion, k=args.k,
                          dead_tokens_threshold=max(10 * args.batch, tokens_per_epoch // 4)),
        lr=args.lr, lr_warmup_steps=100, init_samples=16384, histogram_every_n_steps=0,
        recovered=RecoveredConfig(images=args.recovered_images, timesteps=4), save_dir=str(root / "sae"),
    )
    model.pipeline = pipe
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=args.epochs)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    t_train = time.perf_counter() - t0
    # Final metrics after training (BatchTopK-style calibration included): one more validation pass.
    trainer.validate(model, datamodule=dm, verbose=False)
    m = model.last_val_metrics
    detail = {
        "model": args.model, "site": args.site, "width": dm.width, "num_latents": model.coder.num_latents, "k": args.k,
        "train_tokens": int(model.member(0).total_tokens), "val_tokens": int(len(dm.val_ids)),
        "harvest_s": round(t_harvest, 1), "train_s": round(t_train, 1), "random_weights": args.random_weights,
        **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()},
    }
    print(json.dumps(detail), flush=True)
    headline = {
        "fvu": round(m["metrics/fvu"], 4),
        "l0": round(m["metrics/l0"], 2),
        "dead_fraction": round(m["sparsity/dead_fraction_val"], 4),
        "fraction_recovered": round(m.get("metrics/fraction_recovered", float("nan")), 4),
        "model": args.model,
    }
    print(json.dumps(headline))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
