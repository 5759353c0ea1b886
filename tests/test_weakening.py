"""Ordered weakening: edits only the semantic tokens of chosen heads; orders, counts and areas; both
scorers; the `diffatlas analyze` command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from activations.hooks import attach
from activations.models import build_tiny_pipeline, tiny_tokenizer
from activations.sites import head_table
from analysis.concepts import ConceptList
from analysis.hrv import HRV
from analysis.mechanism import head_sites, weaken_heads
from analysis.weakening import head_counts, head_orders, normalised_area, run_weakening, token_scales
from common.errors import UsageError

CONCEPTS = ConceptList(("color", "animal"), (("red", "blue"), ("cat", "dog")))


def random_hrv(pipe, seed=0) -> HRV:
    g = torch.Generator().manual_seed(seed)
    H = len(head_table(pipe.unet))
    return HRV(CONCEPTS, torch.randint(0, 9, (2, 2, H), generator=g), head_table(pipe.unet), [999, 499])


def first_call_probs(pipe, site: str, prompts: list[str], heads=None, scale=None) -> torch.Tensor:
    """Attention probabilities [b, heads, N, T] of ``site`` at its first call (step 0)."""
    seen = []

    def keep(call):
        if not seen:
            seen.append(call.probs.clone())

    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with attach(pipe.unet, pipe) as tap, tap.observe_heads(site, keep, needs=("probs",)):
        if heads is None:
            pipe(prompt=prompts, num_inference_steps=2, guidance_scale=5.0, generator=gens, output_type="latent")
        else:
            with weaken_heads(pipe, heads, scale):
                pipe(prompt=prompts, num_inference_steps=2, guidance_scale=5.0, generator=gens, output_type="latent")
    return seen[0]


def test_weakening_multiplies_only_semantic_tokens_of_the_chosen_heads_by_minus_two():
    pipe = build_tiny_pipeline("sd1")
    site = head_sites(pipe)[0]  # the first module in forward order: its inputs are the same with the edit
    prompts = ["a red cat", "the big blue dog on the left"]
    scale_bT = token_scales(pipe, prompts, -2.0)
    T = scale_bT.shape[1]
    # start token, then 3 and 7 semantic tokens, then end/padding
    assert scale_bT[0].tolist() == [1.0, -2.0, -2.0, -2.0] + [1.0] * (T - 4)
    assert scale_bT[1].tolist() == [1.0] + [-2.0] * 7 + [1.0] * (T - 8)
    plain = first_call_probs(pipe, site.name, prompts)
    edited = first_call_probs(pipe, site.name, prompts, heads=[site.first_head], scale=scale_bT)
    b = len(prompts)
    uncond, cond = slice(0, b), slice(b, 2 * b)
    assert torch.equal(edited[uncond], plain[uncond])  # the empty prompt's branch untouched
    assert torch.equal(edited[cond, 1:], plain[cond, 1:])  # other heads untouched
    ratio = edited[cond, 0] / plain[cond, 0]  # [b, N, T]
    expected = scale_bT[:, None, :].expand_as(ratio)
    assert torch.allclose(ratio, expected, atol=1e-5)


def test_weakening_all_but_start__multiplies_end_and_padding_too_never_the_start_token():
    pipe = build_tiny_pipeline("sd1")
    prompts = ["a red cat", "the big blue dog on the left"]
    scale_bT = token_scales(pipe, prompts, -2.0, tokens="all_but_start")
    T = scale_bT.shape[1]
    assert scale_bT.tolist() == [[1.0] + [-2.0] * (T - 1)] * 2
    with pytest.raises(UsageError, match="tokens='padding': valid: semantic, all_but_start"):
        token_scales(pipe, prompts, -2.0, tokens="padding")


def test_head_counts_hold_zero_all_heads_and_at_least_five_between():
    counts = head_counts(52, 6)
    assert counts[0] == 0 and counts[-1] == 52 and len(counts) >= 7 and counts == sorted(set(counts))
    assert len(head_counts(1300, 5)) == 7


def test_orders_are_most_least_relevant_first_and_a_seeded_permutation():
    pipe = build_tiny_pipeline("sd1")
    hrv = random_hrv(pipe)
    orders = head_orders(hrv, "color", seed=3)
    row = hrv.row("color")
    assert row[orders["MoRHF"][0]] == row.max() and row[orders["LeRHF"][0]] == row.min()
    assert sorted(orders["random"]) == list(range(hrv.num_heads))
    assert orders["random"] == head_orders(hrv, "color", seed=3)["random"] != head_orders(hrv, "color", seed=4)["random"]


def test_normalised_area_is_one_for_full_survival_and_half_for_a_linear_drop():
    x = [0, 0.25, 0.5, 1.0]
    assert normalised_area(x, [1, 1, 1, 1]) == pytest.approx(1.0)
    assert normalised_area(x, [1 - v for v in x]) == pytest.approx(0.5)


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    tok = tiny_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(cfg).eval(), tok


def test_weakening_with_a_tiny_random_clip_scorer_gives_three_curves_per_concept(tmp_path):
    from analysis.clip_score import ClipScorer
    from analysis.weakening import save_results, summary

    pipe = build_tiny_pipeline("sd1")
    model, tok = tiny_clip()
    scorer = ClipScorer(model, tok, template="a photo of a {word}", concepts=CONCEPTS)
    results = run_weakening(random_hrv(pipe), pipe, scorer, ["animal"], images_per_point=2, points=5, steps=2,
                            guidance=5.0, batch_size=2, progress=False)
    curve = results["animal"]
    assert set(curve) >= {"MoRHF", "LeRHF", "random", "area_between", "area_vs_random"}
    assert len(curve["MoRHF"]["scores"]) == 7 and all(-1 <= s <= 1 for s in curve["MoRHF"]["scores"])
    # no head and all heads weakened are the same images whatever the order
    assert curve["MoRHF"]["scores"][0] == curve["random"]["scores"][0]
    assert curve["MoRHF"]["scores"][-1] == curve["LeRHF"]["scores"][-1]
    head = summary(results, 2)
    assert set(head) == {"concepts", "all_positive", "images_per_point"}
    js, png = save_results(results, tmp_path, scorer.ylabel)
    assert png.stat().st_size > 0 and json.loads(js.read_text())["results"]["animal"]


def test_weakening_refuses_an_hrv_of_another_model_and_unknown_concepts():
    pipe = build_tiny_pipeline("sd1")
    hrv = random_hrv(build_tiny_pipeline("sdxl"))
    from analysis.toy import ToyOracleScorer

    with pytest.raises(ValueError, match="HRV built for"):
        run_weakening(hrv, pipe, ToyOracleScorer(), images_per_point=1, steps=1)
    with pytest.raises(KeyError, match="unknown concept 'shape'; valid concepts: color, animal"):
        run_weakening(random_hrv(pipe), pipe, ToyOracleScorer(), ["shape"], images_per_point=1, steps=1)
    with pytest.raises(ValueError, match="toy scorer reads only toy attributes.*'animal'"):
        run_weakening(random_hrv(pipe), pipe, ToyOracleScorer(), ["animal"], images_per_point=1, steps=1)


def test_analyze_cli_runs_end_to_end_on_the_toy_model(tmp_path, capsys):
    from diffatlas.cli import main

    hrv_dir, weak_dir = tmp_path / "hrv", tmp_path / "weak"
    # two prompts cannot name every concept word, so the config's in-context words are swapped for
    # words encoded alone (test_toy_config__in_context_words_need_prompts_that_name_them)
    rc = main(["analyze", "hrv", "configs/analysis/hrv_toy.yaml", "--prompts.num_prompts", "2", "--steps", "3",
               "--words", "alone", "--batch_size", "2", "--out", str(hrv_dir), "--progress", "false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "HRVs of 7 concepts x 52 heads from 2 images x 3 steps" in out and "position: top heads" in out
    assert {"hrv.safetensors", "hrv.json", "hrv_heatmap.png"} <= {p.name for p in hrv_dir.iterdir()}
    rc = main(["analyze", "weaken", "configs/analysis/weaken_toy.yaml", "--hrv", str(hrv_dir), "--images_per_point", "2",
               "--points", "5", "--steps", "3", "--concepts", "[size]", "--out", str(weak_dir), "--progress", "false",
               "--wandb", "false"])
    assert rc == 0
    assert "size: A_LeRHF - A_MoRHF" in capsys.readouterr().out
    data = json.loads((weak_dir / "weakening.json").read_text())
    assert np.isfinite(data["results"]["size"]["area_between"])
    assert (weak_dir / "weakening_curves.png").is_file()


def test_toy_config__in_context_words_need_prompts_that_name_them(tmp_path, capsys):
    """The toy config reads each concept word where its prompts name it (the construction that
    measures best on held-out prompts); too few prompts to name every word is one line, before any
    image, saying what to do."""
    from diffatlas.cli import main

    rc = main(["analyze", "hrv", "configs/analysis/hrv_toy.yaml", "--prompts.num_prompts", "2", "--steps", "3",
               "--out", str(tmp_path / "o"), "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "occurs in none of the 2 HRV prompts" in err[0] and "words: alone" in err[0]
    assert not (tmp_path / "o" / "hrv.safetensors").exists()


def test_analyze_cli_bad_input_is_one_clear_message(tmp_path, capsys):
    from diffatlas.cli import main

    assert main(["analyze", "plot"]) == 2
    assert "valid subcommands: hrv, weaken" in capsys.readouterr().err
    bad = tmp_path / "c.yaml"
    bad.write_text("concepts:\n  color: [red]\n")
    rc = main(["analyze", "hrv", "configs/analysis/hrv_toy.yaml", "--concepts", str(bad), "--out", str(tmp_path / "o"),
               "--wandb", "false"])
    assert rc == 2 and "at least 2 concepts" in capsys.readouterr().err


def test_toy_scorer__reads_an_object_attribute_wherever_the_object_moved():
    import dataclasses

    from analysis.toy import ToyOracleScorer, toy_prompts
    from toyworld.oracle import check_image
    from toyworld.render import render

    _, truth = toy_prompts(1, seed=3)[0]
    obj = truth.objects[0]
    moved_to = "top left" if obj.position != "top left" else "bottom right"
    moved = dataclasses.replace(truth, objects=(dataclasses.replace(obj, position=moved_to),))
    image = render(moved).image
    scores = {c: ToyOracleScorer().score(c, [image], [truth])[0] for c in ("color", "shape", "position", "background")}
    assert scores == {"color": 1.0, "shape": 1.0, "position": 0.0, "background": 1.0}
    assert not check_image(truth, image)["color"]  # the position-matched check the scorer must not use
