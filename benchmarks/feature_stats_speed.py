"""Speed of the feature-statistics pass (``analysis.features.compute_feature_stats``) against reading
the same rows from the store alone, in one run.

A synthetic sparse store (``sae.synthetic.write_sparse_store``) of ``--rows`` rows of width ``--d``
and an untrained TopK SAE of ``--latents`` latents (the pass's cost does not depend on training).
Each round times (a) reading every row in chunks of ``--chunk`` (``SiteReader.read``) and (b) the
full statistics pass over the same rows with the same chunks; the order alternates between rounds
(interleaved repeats). The ratio per round is tokens/s of (b) over tokens/s of (a); we report the
median over ``--repeats`` rounds and its spread. Goal: ratio >= 0.5. Each round also times (c)
reading + the SAE's encoder alone (no statistics): ``encode_over_read`` is the most any statistics
pass could reach, ``stats_over_encode`` what the statistics themselves cost on top of encoding;
and (d) reading + the encoder's matrix product alone (``x @ W_enc``, nothing picked):
``gemm_over_read``, the bound for any exact TopK encoder on this machine; and (e) the same pass
as (b) with nothing accumulated (``compute_feature_stats(..., accumulate=False)``: the same reads,
chunks and ``sparse_codes`` encode): ``stats_overhead`` = time of (b) / time of (e) - 1, the
extra time the statistics add to the pass that encodes every row anyway, which is what ``diffatlas
train`` now runs after its last epoch (``LitSAE.save_feature_stats``). Goal: stats_overhead <= 0.10.

Last line JSON: {"read_tok_s", "encode_tok_s", "stats_tok_s", "gemm_over_read", "encode_over_read", "stats_over_encode",
"stats_overhead", "ratio_spread", "ratio"}.

    OMP_NUM_THREADS=2 python benchmarks/feature_stats_speed.py [--rows 65536 --d 64 --latents 512 --k 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--latents", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from analysis.features import compute_feature_stats
    from sae.config import SparseCoderConfig
    from sae.registry import get_architecture
    from sae.synthetic import write_sparse_store

    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=args.latents, k=args.k), args.d)
    with tempfile.TemporaryDirectory() as tmp:
        reader = write_sparse_store(Path(tmp) / "store", n=args.rows, d=args.d, images=64)
        reader.read(np.arange(min(reader.num_rows, 1024)))  # verify checksums before timing

        def read_only() -> float:
            t0 = time.perf_counter()
            for lo in range(0, reader.num_rows, args.chunk):
                reader.read(np.arange(lo, min(lo + args.chunk, reader.num_rows)))
            return reader.num_rows / (time.perf_counter() - t0)

        def encode_only() -> float:
            t0 = time.perf_counter()
            for lo in range(0, reader.num_rows, args.chunk):
                acts, _ = reader.read(np.arange(lo, min(lo + args.chunk, reader.num_rows)))
                sae.encode(acts.float())
            return reader.num_rows / (time.perf_counter() - t0)

        def gemm_only() -> float:
            # the one product no TopK encoder can skip: x W_encᵀ + b_enc, with nothing picked from it
            t0 = time.perf_counter()
            for lo in range(0, reader.num_rows, args.chunk):
                acts, _ = reader.read(np.arange(lo, min(lo + args.chunk, reader.num_rows)))
                with torch.no_grad():
                    F.linear(acts.float(), sae.encoder.weight, sae.encoder.bias)
            return reader.num_rows / (time.perf_counter() - t0)

        def pass_only() -> float:
            t0 = time.perf_counter()
            compute_feature_stats(sae, reader, chunk_rows=args.chunk, progress=False, accumulate=False)
            return reader.num_rows / (time.perf_counter() - t0)

        def stats() -> float:
            t0 = time.perf_counter()
            compute_feature_stats(sae, reader, chunk_rows=args.chunk, progress=False)
            return reader.num_rows / (time.perf_counter() - t0)

        paths = [read_only, gemm_only, encode_only, pass_only, stats]
        for f in paths:  # warm every path
            f()
        reads, gemms, encodes, passes, ratios, overheads = [], [], [], [], [], []
        for r in range(args.repeats):
            order = paths[r % len(paths):] + paths[:r % len(paths)]  # rotate
            got = {f.__name__: f() for f in order}
            a, g, e, b = got["read_only"], got["gemm_only"], got["encode_only"], got["stats"]
            reads.append(a), gemms.append(g), encodes.append(e), passes.append(b), ratios.append(b / a)
            overheads.append(got["pass_only"] / b - 1)  # time with stats / time without - 1
            print(json.dumps({"round": r, "read_tok_s": round(a), "encode_tok_s": round(e), "stats_tok_s": round(b),
                              "pass_tok_s": round(got["pass_only"]), "stats_overhead": round(overheads[-1], 4),
                              "ratio": round(b / a, 4)}))
    med = statistics.median
    print(json.dumps({"read_tok_s": round(med(reads)), "encode_tok_s": round(med(encodes)), "stats_tok_s": round(med(passes)),
                      "gemm_over_read": round(med(g / a for g, a in zip(gemms, reads)), 4),
                      "encode_over_read": round(med(e / a for e, a in zip(encodes, reads)), 4),
                      "stats_over_encode": round(med(b / e for b, e in zip(passes, encodes)), 4),
                      "stats_overhead": round(med(overheads), 4),
                      "ratio_spread": [round(min(ratios), 4), round(max(ratios), 4)],
                      "ratio": round(statistics.median(ratios), 4)}))


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
