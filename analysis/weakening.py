"""Ordered weakening (Park et al., ICLR 2025, Section 4): does the HRV order find the heads that
carry a concept?

A weakened head's attention probabilities on the prompt's semantic tokens are multiplied by −2 at
every timestep (start, end and padding tokens untouched; no renormalisation). ``tokens=
"all_but_start"`` weakens the end and padding tokens too (not the paper's: an option to ask whether
they carry a concept; the start token, every head's sink, is never touched). Heads are added one
after another in MoRHF order (most relevant first), LeRHF order (least relevant first) and a seeded
random order (the baseline the paper's reviewers asked for); at each head count the concept is
scored on fresh images. If the HRV ranks heads well, the concept vanishes fastest under MoRHF:
the area under its survival curve is the smallest of the three.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from activations.families import denoiser_of
from activations.generate import sample
from activations.text import semantic_mask, text_length
from analysis.hrv import HRV
from analysis.mechanism import weaken_heads
from common.errors import UsageError

ORDERS = ("MoRHF", "LeRHF", "random")


def head_counts(num_heads: int, points: int) -> list[int]:
    """0, ``points`` evenly spaced counts strictly between, and all heads (deduplicated)."""
    inner = np.linspace(0, num_heads, points + 2)[1:-1]
    counts = sorted({0, num_heads, *(int(round(x)) for x in inner)})
    return counts


def head_orders(hrv: HRV, concept: str, seed: int) -> dict[str, list[int]]:
    """MoRHF, LeRHF and a random order (seeded by (seed, concept index)) of all global heads; ties in
    the HRV are broken by a seeded permutation, not by head index (which would put the 16x16
    down-block heads first among the many heads with no vote)."""
    rng = np.random.default_rng([seed, hrv.concepts.index(concept), 11])
    return {
        "MoRHF": hrv.order(concept, most_first=True, tie_seed=seed),
        "LeRHF": hrv.order(concept, most_first=False, tie_seed=seed),
        "random": [int(h) for h in rng.permutation(hrv.num_heads)],
    }


WEAKENED_TOKENS = ("semantic", "all_but_start")


def check_tokens(tokens: str) -> None:
    if tokens not in WEAKENED_TOKENS:
        raise UsageError(f"tokens={tokens!r}: valid: {', '.join(WEAKENED_TOKENS)}")


def token_scales(pipe, prompts: list[str], factor: float = -2.0, tokens: str = "semantic") -> torch.Tensor:
    """[b, T]: ``factor`` on the weakened tokens (``semantic``: each prompt's own words;
    ``all_but_start``: every token after the start token), 1 on the others."""
    check_tokens(tokens)
    if tokens == "semantic":
        weakened_bT = semantic_mask(pipe, prompts)
    else:
        weakened_bT = torch.ones(len(prompts), text_length(pipe), dtype=torch.bool)
        weakened_bT[:, 0] = False
    return torch.where(weakened_bT, torch.tensor(float(factor)), torch.tensor(1.0)).to(pipe.device, denoiser_of(pipe).dtype)


def generate_weakened(pipe, prompts: list[str], seeds: list[int], heads: list[int], steps: int, guidance: float,
                      factor: float = -2.0, batch_size: int = 40, tokens: str = "semantic") -> list[np.ndarray]:
    """Images (uint8 [H, W, 3]) for ``prompts`` with ``heads`` weakened; one generator per image."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        scale_bT = token_scales(pipe, chunk, factor, tokens)
        with torch.no_grad(), weaken_heads(pipe, heads, scale_bT):
            out = sample(pipe, chunk, seeds[start:start + batch_size], steps=steps, guidance=guidance, output_type="np").images
        images += [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in out]
    return images


def normalised_area(fractions: list[float], scores: list[float]) -> float:
    """Area under the survival curve over the fraction of heads weakened in [0, 1] (trapezoids)."""
    x, y = np.asarray(fractions, float), np.asarray(scores, float)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def run_weakening(hrv: HRV, pipe, scorer, concepts: list[str] | None = None, *, images_per_point: int = 40,
                  points: int = 6, seed: int = 0, steps: int = 25, guidance: float = 4.0, factor: float = -2.0,
                  batch_size: int = 40, progress: bool = True, tokens: str = "semantic") -> dict:
    """Survival curves per concept and order; ``scorer`` gives prompts and scores (analysis.toy /
    analysis.clip_score). Returns {concept: {order: {"counts", "fractions", "scores", "area"}},
    plus "area_between" (A_LeRHF − A_MoRHF) and "area_vs_random" (A_random − A_MoRHF)}."""
    from tqdm.auto import tqdm

    if points < 5:
        raise UsageError(f"points={points}: score at least 5 head counts between none and all heads (Section 4's curves)")
    if images_per_point < 1:
        raise UsageError(f"images_per_point={images_per_point}: need at least 1 image per point")
    check_tokens(tokens)
    hrv.check_model(pipe)
    concepts = list(concepts or hrv.concepts.names)
    for c in concepts:
        hrv.concepts.index(c)  # unknown names raise, listing the valid ones
    scorer.check(concepts)
    H = hrv.num_heads
    counts = head_counts(H, points)
    seeds = [seed * 100_003 + i for i in range(images_per_point)]  # the same noise at every point
    cache: dict[tuple, list[np.ndarray]] = {}
    total = len(concepts) * len(ORDERS) * len(counts)
    bar = tqdm(total=total, desc="weaken", unit="point", disable=not progress, dynamic_ncols=True)
    results: dict = {}
    for concept in concepts:
        jobs = scorer.prompts(concept, images_per_point, seed)
        prompts, targets = [p for p, _ in jobs], [t for _, t in jobs]
        per_order = {}
        for order, heads in head_orders(hrv, concept, seed).items():
            scores = []
            for k in counts:
                key = (frozenset(heads[:k]), tuple(prompts))  # 0 and all heads are shared by all orders
                if key not in cache:
                    cache[key] = generate_weakened(pipe, prompts, seeds, heads[:k], steps, guidance, factor, batch_size,
                                                   tokens)
                scores.append(float(np.mean(scorer.score(concept, cache[key], targets))))
                bar.update(1)
            fractions = [k / H for k in counts]
            per_order[order] = {"counts": counts, "fractions": fractions, "scores": scores,
                                "area": normalised_area(fractions, scores)}
        per_order["area_between"] = per_order["LeRHF"]["area"] - per_order["MoRHF"]["area"]
        per_order["area_vs_random"] = per_order["random"]["area"] - per_order["MoRHF"]["area"]
        results[concept] = per_order
    bar.close()
    return results


def summary(results: dict, images_per_point: int) -> dict:
    """The benchmark's headline: per concept the two area differences, and whether all are > 0."""
    concepts = {c: {"area_between": round(r["area_between"], 4), "area_vs_random": round(r["area_vs_random"], 4)}
                for c, r in results.items()}
    ok = all(v["area_between"] > 0 and v["area_vs_random"] > 0 for v in concepts.values())
    return {"concepts": concepts, "all_positive": ok, "images_per_point": images_per_point}


def save_results(results: dict, out: str | Path, ylabel: str, meta: dict | None = None) -> tuple[Path, Path]:
    from analysis.plots import weakening_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "weakening.json"
    js.write_text(json.dumps({"results": results, **(meta or {})}, indent=1))
    curves = {c: {o: (r[o]["fractions"], r[o]["scores"]) for o in ORDERS} for c, r in results.items()}
    png = weakening_curves(curves, out / "weakening_curves.png", ylabel)
    return js, png
