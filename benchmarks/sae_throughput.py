"""Training throughput (tokens/s) of diffatlas' SAE trainer against SAELens, EleutherAI's sparsify and
a bare PyTorch loop, all TopK with the same width, k, batch size and dtype, on the same cached
activations, in one run.

- ours: the `diffatlas train` path: Lightning Trainer + LitSAE + ActivationDataModule reading the
  float16 activation store from disk (memory-mapped), logger off, validation off;
- bare loop: the same TopK steps (our TopKSAE.train_step, Adam, gradient clipping, decoder
  constraints, dead-latent bookkeeping) over the activations already in memory as float32: the
  limit a trainer can approach;
- sae-lens: `SAETrainer` with a `TopKTrainingSAE` fed in-memory float32 batches (default and
  `use_sparse_activations=True`; the faster one is compared);
- sparsify: sparsify's `Trainer` needs a Hugging Face model and tokens, so we drive its
  `SparseCoder` with the per-step work of its trainer for loss_fn='fvu' (forward with dead mask,
  backward, parallel-gradient removal, Adam step, unit-norm decoder, fired-latent bookkeeping).

Each system runs ``--warmup`` untimed steps and then ``--steps`` timed ones, once per round, for
``--repeats`` rounds (default 5); the order of the systems rotates from round to round so that none
always runs first or last. Each round gives one ratio ours / theirs per peer from runs taken
minutes apart at most; we report the median over rounds and its spread (min, max). On a shared
machine a best-of-N throughput mostly measures luck (one run of 0.89 against sparsify, others of
1.1), while paired ratios move together with the machine's load. SAELens runs both its dense and
its ``use_sparse_activations`` trainer in the first round and then only the faster one.

Prints one JSON line per system (median tokens/s and the per-round figures) and, last, the headline
{"vs_sae_lens", "vs_sae_lens_spread", "vs_sparsify", "vs_sparsify_spread", "vs_bare_loop_spread",
"vs_bare_loop"} (ours / theirs, medians; spreads are [min, max] over rounds).

    OMP_NUM_THREADS=2 python benchmarks/sae_throughput.py [--d 256 --latents 4096 --k 32 --batch 4096]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def _timed_iter(batches, warmup: int, marks: dict):
    for i, b in enumerate(batches):
        if i == warmup:
            marks["t0"] = time.perf_counter()
        yield b


def bench_bare(acts: torch.Tensor, args) -> float:
    from sae.config import SparseCoderConfig
    from sae.sparse_coder import TrainContext
    from sae.topk import TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(SparseCoderConfig(num_latents=args.latents, k=args.k, dead_tokens_threshold=10_000_000), args.d)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    since_fired = torch.zeros(args.latents, dtype=torch.float64)
    n = args.batch
    t0 = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            t0 = time.perf_counter()
        lo = (step * n) % (acts.shape[0] - n + 1)
        x = acts[lo : lo + n]
        out = sae.train_step(x, TrainContext(dead_mask=since_fired >= 10_000_000))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.after_optimizer_step()
        with torch.no_grad():
            fired = out.latents.fire_counts()
            since_fired += n
            since_fired[fired > 0] = 0
    return args.steps * n / (time.perf_counter() - t0)


def bench_ours(store: Path, args) -> float:
    import lightning.pytorch as pl

    from sae.config import SparseCoderConfig
    from sae.data import ActivationDataModule
    from sae.lit import LitSAE, RecoveredConfig

    marks: dict[str, float] = {}

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == args.warmup:
                marks["t0"] = time.perf_counter()

        def on_train_end(self, trainer, module):
            marks["t1"] = time.perf_counter()

    pl.seed_everything(0, verbose=False)
    dm = ActivationDataModule(str(store), batch_size=args.batch, val_fraction=0.0)
    model = LitSAE(SparseCoderConfig(num_latents=args.latents, k=args.k), lr=1e-4, lr_warmup_steps=1,
                   init_samples=4096, histogram_every_n_steps=0, recovered=RecoveredConfig(images=0),
                   save_dir=str(store.parent / "ours_sae"))
    trainer = pl.Trainer(max_steps=args.warmup + args.steps, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Clock()])
    trainer.fit(model, datamodule=dm)
    # on_train_end also calibrates and saves the SAE; measure up to the last optimiser step instead.
    return args.steps * args.batch / (marks["t1"] - marks["t0"])


def bench_sae_lens(acts: torch.Tensor, args, sparse: bool) -> float:
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(0)
    cfg = TopKTrainingSAEConfig(d_in=args.d, d_sae=args.latents, k=args.k, dtype="float32", device="cpu",
                                use_sparse_activations=sparse)
    sae = TopKTrainingSAE(cfg)
    total = args.warmup + args.steps
    tcfg = SAETrainerConfig(total_training_samples=total * args.batch, train_batch_size_samples=args.batch,
                            lr=1e-4, lr_end=1e-4, device="cpu")
    n = args.batch
    batches = (acts[(i * n) % (acts.shape[0] - n + 1) :][:n] for i in range(total))
    marks: dict[str, float] = {}
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=_timed_iter(batches, args.warmup, marks))
    trainer.fit()
    return args.steps * n / (time.perf_counter() - marks["t0"])


def bench_sparsify(acts: torch.Tensor, args) -> float:
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder
    from sparsify.config import SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(args.d, SparseCoderConfig(num_latents=args.latents, k=args.k), "cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(args.latents, dtype=torch.long)
    n = args.batch
    t0 = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            t0 = time.perf_counter()
        lo = (step * n) % (acts.shape[0] - n + 1)
        x = acts[lo : lo + n]
        dead = since_fired > 10_000_000
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            fired = torch.zeros(args.latents, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since_fired += n
            since_fired[fired] = 0
    return args.steps * n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256, help="activation width")
    p.add_argument("--latents", type=int, default=4096, help="SAE width")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--steps", type=int, default=8, help="timed steps per system and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per system and round")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds: every system once per round, in an order rotating from round to round; "
                        "medians over rounds are reported")
    p.add_argument("--skip", nargs="*", default=[], choices=["sae_lens", "sparsify"], help="peers to leave out")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    from sae.synthetic import sparse_activations

    n_tokens = args.batch * (args.warmup + args.steps + 2)
    acts16 = sparse_activations(n_tokens, args.d, num_features=4 * args.d, active=16).half()
    acts = acts16.float()  # what the in-memory systems train on: the store's values, as float32
    with tempfile.TemporaryDirectory() as tmp:
        from activations.store import write_synthetic_store

        store = Path(tmp) / "store"
        write_synthetic_store(store, "site", acts16, rows_per_shard=65536)
        common = {"d": args.d, "latents": args.latents, "k": args.k, "batch": args.batch, "dtype": "float32",
                  "threads": torch.get_num_threads()}
        runs = [("ours", lambda: bench_ours(store, args)), ("bare_loop", lambda: bench_bare(acts, args))]
        if "sae_lens" not in args.skip:
            runs += [("sae_lens", lambda: bench_sae_lens(acts, args, sparse=False)),
                     ("sae_lens_sparse", lambda: bench_sae_lens(acts, args, sparse=True))]
        if "sparsify" not in args.skip:
            runs += [("sparsify", lambda: bench_sparsify(acts, args))]
        failed: dict[str, str] = {}
        per_round: list[dict[str, float]] = []
        for r in range(args.repeats):
            order = runs[r % len(runs):] + runs[: r % len(runs)]
            got: dict[str, float] = {}
            for name, fn in order:
                if name in failed:
                    continue
                try:
                    got[name] = fn()
                except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                    failed[name] = f"{type(e).__name__}: {first}"
            if r == 0 and "sae_lens" in got and "sae_lens_sparse" in got:
                # measure only SAELens' faster trainer from now on
                slower = "sae_lens_sparse" if got["sae_lens"] >= got["sae_lens_sparse"] else "sae_lens"
                runs = [(n, f) for n, f in runs if n != slower]
            if "sae_lens" in got or "sae_lens_sparse" in got:
                got["sae_lens_best"] = max(got.get("sae_lens", 0.0), got.get("sae_lens_sparse", 0.0))
            per_round.append(got)
            print(f"round {r}: " + ", ".join(f"{n} {v:.0f} tok/s" for n, v in got.items()), file=sys.stderr, flush=True)
        names = [n for n in ("ours", "bare_loop", "sae_lens", "sae_lens_sparse", "sparsify")]
        for name in names:
            vals = [g[name] for g in per_round if name in g]
            if name in failed:
                print(json.dumps({"system": name, "error": failed[name]}), flush=True)
            elif vals:
                print(json.dumps({"system": name, "tokens_per_s": round(statistics.median(vals), 1),
                                  "per_round": [round(v, 1) for v in vals], **common}), flush=True)
    headline: dict[str, object] = {"repeats": args.repeats, "steps": args.steps}
    for key, peer in (("vs_sae_lens", "sae_lens_best"), ("vs_sparsify", "sparsify"), ("vs_bare_loop", "bare_loop")):
        ratios = [g["ours"] / g[peer] for g in per_round if g.get("ours") and g.get(peer)]
        headline[f"{key}_spread"] = [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None
        headline[key] = round(statistics.median(ratios), 3) if ratios else None
    # the three headline medians last, in a fixed order
    print(json.dumps({**{k: v for k, v in headline.items() if not k.startswith("vs_") or k.endswith("_spread")},
                      **{k: headline[k] for k in ("vs_sae_lens", "vs_sparsify", "vs_bare_loop")}}))
    return 0


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
