"""Do the HRVs name what each head attends to in real prompts? A check of the HRV construction on
the toy world.

HRVs (Park et al., ICLR 2025, Section 3; ``analysis.build_hrv``) encode each concept word alone and
let every head's queries choose among those words' keys. Here the words are read where they occur
instead: ``--prompts`` one-object toyworld prompts in the canonical wording are generated (the
model's default steps, guidance 4) with ``Observe`` at stage ``probs`` on every attn2 site; for
each head and each of the seven attributes, the attention on the tokens of the attribute's value
in the prompt (mean over the value's tokens, the image positions, the steps and the prompts, on
the conditional branch) is its in-context strength. A head's in-context attribute is the one of
largest strength; its HRV attribute is the top of its HRV column (``--hrv``, a folder written by
``diffatlas analyze hrv`` or by ``concept_recovery.py``).

Last line JSON {"heads", "agree", "chance", "in_context_tops": {attribute: heads}, "hrv_tops": {...},
"per_head": {head: {"in_context", "hrv"}}, "model"}: ``agree`` is the number of heads whose two attributes
match; ``chance`` the number expected if they were independent (sum over attributes of the product
of the two counts, over the number of heads).

    OMP_NUM_THREADS=2 python benchmarks/hrv_in_context.py --hrv runs/bench/concepts/hrv [--prompts 24]
    OMP_NUM_THREADS=2 python benchmarks/hrv_in_context.py --model toy-mmdit --hrv <an HRV folder of toy-mmdit>
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import numpy as np
import torch


def value_positions(pipe, prompt: str, scene, attributes: list[str]) -> dict[str, list[int]]:
    """Token positions of each attribute's value in ``prompt`` (first occurrence in every text
    segment, ``activations.text.word_positions``: on the toy models, its one tokenizer's tokens)."""
    from activations.text import word_positions
    from common.errors import UsageError

    out = {}
    for a in attributes:
        word = getattr(scene.objects[0] if hasattr(scene.objects[0], a) else scene, a)
        try:
            out[a] = word_positions(pipe, prompt, word)
        except UsageError:  # not in the prompt
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="a toy-world model: toy (U-Net) or toy-mmdit")
    ap.add_argument("--hrv", required=True, help="an HRV folder of the model's seven toy attributes")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()

    from activations.edits import Observe
    from activations.generate import sample
    from activations.hooks import intervene
    from activations.pipeline import load_pipeline, model_defaults
    from activations.sites import list_sites
    from analysis.hrv import HRV
    from common.errors import UsageError
    from toyworld.prompts import scene_to_prompt
    from toyworld.scene import sample_scene
    from toyworld.vocab import ATTRIBUTES

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    try:
        hrv = HRV.load(args.hrv, pipe=pipe)
    except UsageError as err:  # e.g. an HRV of another model: one line
        raise SystemExit(f"hrv_in_context.py: error: --hrv: {err}") from None
    attrs = list(ATTRIBUTES)
    if sorted(hrv.concepts.names) != sorted(attrs):
        raise SystemExit(f"the HRV's concepts {list(hrv.concepts.names)} are not the toy attributes {attrs}")
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng, num_objects=1) for _ in range(args.prompts)]
    prompts = [scene_to_prompt(s) for s in scenes]  # canonical wording: every value named once
    where = [value_positions(pipe, p, s, attrs) for p, s in zip(prompts, scenes)]
    sites = [s for s in list_sites(pipe) if s.kind == "head"]
    num_heads = sum(s.heads for s in sites)
    strength = torch.zeros(num_heads, len(attrs), dtype=torch.float64)
    count = torch.zeros(num_heads, len(attrs), dtype=torch.float64)

    def reader(site):
        heads = slice(site.first_head, site.first_head + site.heads)

        def read(probs, call):  # probs [b, heads, N, T]
            rows = call.rows("cond")
            per_token = (probs if rows is None else probs[rows]).float().mean(2)  # [prompts, heads, T]
            for b, found in enumerate(where):
                for a, tokens in found.items():
                    strength[heads, attrs.index(a)] += per_token[b][:, tokens].mean(-1).double()
                    count[heads, attrs.index(a)] += 1
        return read

    observers = [Observe(site=s.name, stage="probs", fn=reader(s), sees="before") for s in sites]
    with torch.no_grad(), intervene(pipe, *observers):
        sample(pipe, prompts, list(range(len(prompts))), steps=model_defaults(pipe)["num_inference_steps"],
               guidance=4.0, output_type="latent")
    in_context = strength / count.clamp(min=1)
    names = list(hrv.concepts.names)
    ctx_top = [attrs[int(in_context[h].argmax())] for h in range(num_heads)]
    hrv_top = [names[int(hrv.hrv[:, h].argmax())] for h in range(num_heads)]
    agree = sum(a == b for a, b in zip(ctx_top, hrv_top))
    chance = sum(ctx_top.count(a) * hrv_top.count(a) for a in attrs) / num_heads
    print(json.dumps({"heads": num_heads, "agree": agree, "chance": round(chance, 2),
                      "in_context_tops": dict(collections.Counter(ctx_top)), "hrv_tops": dict(collections.Counter(hrv_top)),
                      "per_head": {h: {"in_context": ctx_top[h], "hrv": hrv_top[h]} for h in range(num_heads)},
                      "model": args.model}))


if __name__ == "__main__":
    from common.errors import run_script

    sys.exit(run_script(main, __file__))
