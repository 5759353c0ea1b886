"""Head relevance vectors: one vote per image, head and step; rows of L1 norm H; resumable; clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from activations.config import PromptSource
from activations.models import build_tiny_pipeline
from activations.sites import head_sites, head_table
from analysis.concepts import ConceptList, load_concepts, word_token_positions
from analysis.config import HRVConfig
from analysis.construct import build_hrv
from analysis.hrv import HRV, concept_strengths, head_votes, normalise_rows
from analysis.words import encode_words
from common.errors import UsageError

TINY_CONCEPTS = """concepts:
  color: [red, green, blue]
  place: [top left, bottom right, sky]
  animal: [cat, dog, horse]
"""
TINY_PROMPTS = ["a red cat on the top left", "a blue horse in the sky", "a green dog with a tree"]


@pytest.fixture
def concepts_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONCEPTS)
    return path


def tiny_config(tmp_path, concepts_file, **kw) -> HRVConfig:
    base = dict(model="tiny", concepts=str(concepts_file), prompts=PromptSource(kind="list", texts=TINY_PROMPTS),
                seeds=[0, 1], steps=3, guidance=5.0, batch_size=2, out=str(tmp_path / "hrv"), progress=False, wandb=False)
    base.update(kw)
    return HRVConfig(**base)


@pytest.mark.parametrize("family, words", [("sd1", "alone"), ("sd2", "alone"), ("sdxl", "alone"), ("sd3", "alone"),
                                           ("flux", "alone"), ("sd3", "in_context")])
def test_hrv_on_tiny_pipelines_rows_have_l1_norm_H_and_each_head_votes_once_per_image_and_step(family, words, tmp_path, concepts_file):
    pipe = build_tiny_pipeline(family)
    texts = TINY_PROMPTS + ["a dog on the bottom right"]  # in context, every word needs a prompt that names it
    hrv = build_hrv(tiny_config(tmp_path, concepts_file, words=words, prompts=PromptSource(kind="list", texts=texts)), pipe)
    H = len(head_table(pipe))
    images = len(texts) * 2
    assert hrv.hrv.shape == (3, H) and hrv.hrv.dtype == torch.float32
    assert torch.allclose(hrv.hrv.abs().sum(1), torch.full((3,), float(H)))
    assert hrv.votes.dtype == torch.int64 and hrv.votes.shape == (3, 3, H)
    assert (hrv.votes.sum(1) == images).all()  # [steps, heads]: one vote per image at every step
    assert all(t is not None for t in hrv.step_t)


def test_head_whose_keys_match_a_concept_votes_for_it():
    torch.manual_seed(0)
    d, N = 8, 5
    k_concepts = torch.eye(d)[:3] * 4  # concept c's single token key points along axis c
    # head 0 queries along axis 1 (concept B), head 1 along axis 2 (concept C)
    q = torch.zeros(1, 2, N, d)
    q[0, 0, :, 1] = 3.0
    q[0, 1, :, 2] = 3.0
    k = k_concepts[None, None].expand(1, 2, 3, d)
    mask = torch.ones(1, 3, dtype=torch.bool)
    strengths = concept_strengths(q, k, mask, torch.tensor([0, 1, 2]), 3, scale=d**-0.5)
    assert strengths.argmax(-1).tolist() == [[1, 2]]
    votes_ch = head_votes(strengths)
    assert votes_ch.tolist() == [[0, 0], [1, 0], [0, 1]]


def test_multi_token_word_map_is_averaged_over_its_tokens():
    d = 4
    # slots: concept 0 has two tokens (a two-token word), concept 1 one token, plus a masked slot
    q = torch.zeros(1, 1, 2, d)
    q[0, 0, :, 0] = 1.0
    k = torch.zeros(1, 1, 4, d)
    k[0, 0, 0, 0] = 2.0  # first token of the word: high score
    k[0, 0, 3, 0] = 50.0  # masked slot: must not count even though it would win
    mask = torch.tensor([[True, True, True, False]])
    slot_concept = torch.tensor([0, 0, 1, 1])
    s = concept_strengths(q, k, mask, slot_concept, 2, scale=1.0)
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    assert torch.allclose(s[0, 0], torch.stack([(p[0] + p[1]) / 2, p[2]]), atol=1e-6)


def test_word_bank_keeps_only_semantic_tokens_and_averages_multi_token_words(concepts_file):
    pipe = build_tiny_pipeline("sd1")
    bank = encode_words(pipe, load_concepts(concepts_file))
    assert word_token_positions(pipe.tokenizer, "top left") == [1, 2]
    assert bank.embeds_TC.shape[0] == 3 + 2 + 2 + 1 + 3  # two two-token words in "place"
    assert [m.shape for m in bank.mask_per_concept] == [(3, 1), (3, 2), (3, 1)]
    assert bank.mask_per_concept[1].sum(1).tolist() == [2, 2, 1]


def test_in_context_words__states_read_where_each_prompt_names_the_word(concepts_file):
    """A word's in-context states are the mean of its tokens' states in the prompts naming it, which a
    causal text encoder makes differ from the word encoded alone."""
    from activations.text import encode_prompts

    pipe = build_tiny_pipeline("sd1")
    concepts = load_concepts(concepts_file)
    contexts = TINY_PROMPTS + ["a red dog under the sky", "a green cat and a blue horse at the bottom right"]
    alone = encode_words(pipe, concepts)
    ctx = encode_words(pipe, concepts, contexts=contexts)
    assert ctx.embeds_TC.shape == alone.embeds_TC.shape
    states = encode_prompts(pipe, contexts).float()
    # "red" is the first word of concept "color": prompt 0 at token 2, prompt 3 at token 2
    torch.testing.assert_close(ctx.embeds_TC[0], (states[0, 2] + states[3, 2]) / 2)
    # "top left" (concept "place", after color's 3 one-token words): tokens 6-7 of prompt 0
    top_left = ctx.index_per_concept[1][0]
    torch.testing.assert_close(ctx.embeds_TC[top_left], states[0, 6:8])
    assert not torch.allclose(ctx.embeds_TC[0], alone.embeds_TC[0])


def test_in_context_words__a_word_no_prompt_names_is_refused_naming_it(concepts_file):
    with pytest.raises(ValueError, match="'horse' occurs in none of the 2 HRV prompts"):
        encode_words(build_tiny_pipeline("sd1"), load_concepts(concepts_file),
                     contexts=["a red cat on the top left with a dog", "a blue dog in the sky, bottom right, green"])


def test_sink__start_token_is_a_slot_of_every_contest_that_counts_for_no_concept(concepts_file):
    from analysis.hrv import slot_weights, weighted_strengths
    from activations.text import encode_prompts

    pipe = build_tiny_pipeline("sd1")
    concepts = load_concepts(concepts_file)
    plain, bank = encode_words(pipe, concepts), encode_words(pipe, concepts, sink=True)
    assert bank.embeds_TC.shape[0] == plain.embeds_TC.shape[0] + 1
    torch.testing.assert_close(bank.embeds_TC[-1], encode_prompts(pipe, ["a red cat"]).float()[0, 0])  # any prompt's start
    idx, mask = bank.slots(torch.zeros(2, len(concepts), dtype=torch.long))
    assert idx[:, -1].tolist() == [bank.embeds_TC.shape[0] - 1] * 2 and mask[:, -1].all()
    weights = slot_weights(mask, bank.slot_concept_S, len(concepts))
    assert weights[:, -1].abs().sum() == 0  # the sink's attention counts for no concept
    q = torch.ones(2, 1, 5, 8)
    k = 0.1 * torch.randn(2, 1, idx.shape[1], 8)
    k[:, :, -1] = 1.0  # every position looks at the sink (score 8 against about 0)
    total = weighted_strengths(q, k, mask, weights, scale=1.0).sum(-1)
    assert (total < 0.5).all()


def test_hrv_with_sink_and_in_context_words__rows_keep_l1_norm_H(tmp_path, concepts_file):
    contexts = TINY_PROMPTS + ["a red dog under the sky", "a green cat and a blue horse at the bottom right"]
    cfg = tiny_config(tmp_path, concepts_file, sink=True, words="in_context",
                      prompts=PromptSource(kind="list", texts=contexts))
    hrv = build_hrv(cfg, build_tiny_pipeline("sd1"))
    images = len(contexts) * 2
    assert (hrv.votes.sum(1) == images).all()  # still one vote per image, head and step
    assert torch.allclose(hrv.hrv.abs().sum(1), torch.full((3,), float(hrv.num_heads)))
    assert hrv.meta["sink"] and hrv.meta["words"] == "in_context"


def test_named_choice__every_contest_uses_the_word_the_prompt_names_else_a_drawn_one(concepts_file):
    from analysis.hrv import VoteCounter
    from analysis.mechanism import head_sites
    from analysis.words import named_words

    pipe = build_tiny_pipeline("sd1")
    concepts = load_concepts(concepts_file)  # color [red, green, blue], place [top left, bottom right, sky], animal
    named = named_words(pipe, concepts, TINY_PROMPTS)
    assert named.tolist() == [[0, 0, 0], [2, 2, 2], [1, -1, 1]]  # the third prompt names no place
    bank = encode_words(pipe, concepts)
    counter = VoteCounter(bank, head_sites(pipe), seed=0, named_jC=named)
    counter.begin_batch([0, 1, 2], steps=4)
    rows = counter._idx.flatten(1, 2)  # [jobs, steps x sites, S]: rows into the bank
    first_slot = [int(bank.index_per_concept[c][w, 0]) for c, w in ((0, 0), (0, 2), (0, 1))]
    assert [set(rows[j, :, 0].tolist()) for j in range(3)] == [{f} for f in first_slot]
    place_slot = sum(m.shape[1] for m in bank.mask_per_concept[:1])
    assert len(set(rows[2, :, place_slot].tolist())) > 1  # drawn at each call where no word is named


def test_resume_does_not_count_any_prompt_twice(tmp_path, concepts_file):
    pipe = build_tiny_pipeline("sd1")
    full = build_hrv(tiny_config(tmp_path, concepts_file, out=str(tmp_path / "full")), pipe)
    cfg = tiny_config(tmp_path, concepts_file, out=str(tmp_path / "cut"))
    assert build_hrv(cfg, pipe, max_batches=1) is None  # interrupted after the first batch
    resumed = build_hrv(cfg, pipe)
    assert torch.equal(resumed.votes, full.votes)
    again = build_hrv(cfg, pipe)  # a finished run rerun counts nothing more
    assert torch.equal(again.votes, full.votes)


def test_resume_refuses_another_config(tmp_path, concepts_file):
    pipe = build_tiny_pipeline("sd1")
    build_hrv(tiny_config(tmp_path, concepts_file), pipe, max_batches=1)
    with pytest.raises(ValueError, match="another config.*steps"):
        build_hrv(tiny_config(tmp_path, concepts_file, steps=4), pipe)


def test_refused_resume__leaves_the_folders_hrv_config_as_it_was(tmp_path, concepts_file):
    pipe = build_tiny_pipeline("sd1")
    build_hrv(tiny_config(tmp_path, concepts_file), pipe, max_batches=1)
    written = (tmp_path / "hrv" / "hrv_config.yaml").read_text()
    with pytest.raises(ValueError, match="another config.*steps"):
        build_hrv(tiny_config(tmp_path, concepts_file, steps=4), pipe)
    assert (tmp_path / "hrv" / "hrv_config.yaml").read_text() == written


@pytest.mark.parametrize("edited", [TINY_CONCEPTS.replace("sky", "tree"),  # as many concepts, another word
                                    TINY_CONCEPTS + "  shape: [circle, square]\n"])
def test_resume__after_the_concept_file_was_edited_is_refused(tmp_path, concepts_file, edited):
    pipe = build_tiny_pipeline("sd1")
    cfg = tiny_config(tmp_path, concepts_file)
    assert build_hrv(cfg, pipe, max_batches=1) is None  # killed after the first batch
    concepts_file.write_text(edited)
    with pytest.raises(ValueError, match="another config.*concept_words"):
        build_hrv(cfg, pipe)


def test_save_load_round_trip_and_window(tmp_path, concepts_file):
    pipe = build_tiny_pipeline("sd1")
    hrv = build_hrv(tiny_config(tmp_path, concepts_file, steps=4), pipe)
    back = HRV.load(tmp_path / "hrv", pipe)
    assert torch.equal(back.votes, hrv.votes) and torch.equal(back.hrv, hrv.hrv)
    assert back.concepts == hrv.concepts and back.head_table == hrv.head_table and back.step_t == hrv.step_t
    meta = json.loads((tmp_path / "hrv" / "hrv.json").read_text())
    assert {"prompts", "seeds", "steps", "guidance", "scheduler", "model", "head_table"} <= set(meta)
    assert back.top_heads("color", 2)[0][1].endswith("attn2")
    # window(): the HRV of exactly the steps whose tau lies in the window
    taus = [t / 1000 for t in hrv.step_t]
    early = [i for i, tau in enumerate(taus) if tau >= 0.6]
    assert early and len(early) < len(taus)
    assert torch.equal(hrv.window("early"), normalise_rows(hrv.votes[early].sum(0)))
    with pytest.raises(ValueError, match="valid windows: early, middle, late"):
        hrv.window("dawn")


def test_loading_against_another_model_names_what_was_expected(tmp_path, concepts_file):
    build_hrv(tiny_config(tmp_path, concepts_file), build_tiny_pipeline("sd1"))
    with pytest.raises(ValueError, match=r"HRV built for \d+ heads .* this model has \d+"):
        HRV.load(tmp_path / "hrv", build_tiny_pipeline("sdxl"))
    hrv = HRV.load(tmp_path / "hrv")
    hrv.head_table[3] = ("mid_block.attentions.0.transformer_blocks.0.attn2", 0)
    with pytest.raises(ValueError, match="differs from this model's at head 3: expected mid_block"):
        hrv.check_model(build_tiny_pipeline("sd1"))


# -- bad concept lists -----------------------------------------------------------------------


def test_word_without_semantic_token_is_refused_naming_it(tmp_path):
    from toyworld.model import build_pipeline

    path = tmp_path / "c.yaml"
    path.write_text("concepts:\n  color: [red, blue]\n  plant: [Oak tree]\n")
    with pytest.raises(ValueError, match=r"concept 'plant': concept word 'Oak tree' has no semantic token.*unknown"):
        encode_words(build_pipeline(), load_concepts(path))


@pytest.mark.parametrize("text, message", [
    ("concepts:\n  color: [red, blue]\n  shape: []\n", "concept 'shape' has no words"),
    ("concepts:\n  color: [red, blue]\n  shape:\n", "concept 'shape' has no words"),
    ("concepts:\n  color: [red]\n  color: [blue]\n", r"duplicate concept name\(s\) \['color'\]"),
    ("concepts:\n  color: [red, blue]\n", "at least 2 concepts"),
    ("colors: [red]\n", "expected a mapping 'concepts:"),
    ("concepts:\n  color: [red, orange]\n  fruit: [apple, orange]\n",
     "word 'orange' is listed under concepts 'color' and 'fruit'"),
])
def test_bad_concept_lists_give_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_concepts(path)


def test_unknown_concept_list_name_lists_the_valid_ones():
    with pytest.raises(FileNotFoundError, match="valid names: sd34, toy"):
        load_concepts("sd35")


def test_bundled_concept_lists():
    from toyworld.model import build_pipeline
    from toyworld.vocab import ATTRIBUTES

    sd = load_concepts("sd34")
    assert len(sd) == 34 and all(len(ws) == 10 for ws in sd.words)
    toy = load_concepts("toy")
    assert toy.names == tuple(ATTRIBUTES) and toy.words == tuple(tuple(v) for v in ATTRIBUTES.values())
    tok = build_pipeline().tokenizer
    assert word_token_positions(tok, "top left") == [1, 2]
    assert ConceptList.from_dict(toy.to_dict()) == toy


@pytest.mark.slow
def test_sdxl_full_structure_gives_1300_heads_and_a_heatmap(tmp_path):
    from activations.models import build_unet
    from activations.sites import list_sites
    from analysis.plots import hrv_heatmap

    unet = build_unet("sdxl-base", device="meta")
    table = head_table(unet)
    assert len(table) == 1300
    votes = torch.randint(0, 5, (2, 3, 1300))
    hrv = HRV(load_concepts("toy").__class__(("a", "b", "c"), (("x",), ("y",), ("z",))), votes, table, [999, 500])
    hrv.check_model(unet)
    assert torch.allclose(hrv.hrv.sum(1), torch.full((3,), 1300.0))
    res = {s.name: s.resolution for s in list_sites(unet) if s.kind == "head"}
    png = hrv_heatmap(hrv.hrv.numpy(), ["a", "b", "c"], table, res, tmp_path / "h.png")
    assert png.stat().st_size > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_mmdit_word_keys_are_the_keys_its_heads_compute_for_the_word_drawn_alone(family, concepts_file):
    """The text changes from block to block in an MMDiT: a word's keys at a site and step are the
    text keys of its own tokens while the word alone is drawn (written out by hand here)."""
    from activations.generate import sample
    from activations.text import semantic_mask
    from mmdit_helpers import by_hand, capture_inputs

    pipe = build_tiny_pipeline(family)
    concepts = load_concepts(concepts_file)
    bank = encode_words(pipe, concepts, sink=True, steps=2, guidance=5.0)
    site = {"sd3": "transformer_blocks.1.attn", "flux": "single_transformer_blocks.0.attn"}[family]
    rows = [semantic_mask(pipe, [w])[0].nonzero().flatten().tolist() for ws in concepts.words for w in ws]
    attn = pipe.transformer.get_submodule(site)
    k_ShTd = bank.stream_keys[site]
    assert k_ShTd.shape == (2, attn.heads, sum(map(len, rows)) + 1, pipe.transformer.config.attention_head_dim) and bank.num_rows == k_ShTd.shape[2]
    assert bank.embeds_TC is None and set(bank.stream_keys) == {s.name for s in head_sites(pipe)}
    seen = []
    grabbed, handle = capture_inputs(attn)
    hook = attn.register_forward_hook(lambda *_: seen.append(dict(grabbed)))
    word = 3  # "top left" (after red, green, blue): two tokens in every segment
    assert len(rows[word]) == {"sd3": 4, "flux": 2}[family]  # SD3: in the CLIP and in the T5 tokens
    with torch.no_grad():
        sample(pipe, ["top left"], [word], steps=2, guidance=5.0, output_type="latent")  # the bank draws word w with seed w
    handle.remove(), hook.remove()
    start = sum(map(len, rows[:word]))
    for step, inputs in enumerate(seen):
        _, k, _, txt, _ = by_hand(attn, inputs["x"], inputs["ctx"], inputs["rope"], family == "flux", len(semantic_mask(pipe, [""])[0]))
        expected = k[-1][:, txt][:, rows[word]]  # the cond row (SD3 batches [uncond; cond])
        torch.testing.assert_close(k_ShTd[step][:, start: start + len(rows[word])], expected, atol=1e-5, rtol=1e-5)


def test_mmdit_words_need_the_runs_steps_and_guidance(concepts_file):
    with pytest.raises(UsageError, match="needs the run's steps and guidance"):
        encode_words(build_tiny_pipeline("flux"), load_concepts(concepts_file))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_weakening_scales_the_prompt_words_in_every_text_segment(family):
    from activations.text import text_length, word_positions
    from analysis.weakening import token_scales

    pipe = build_tiny_pipeline(family)
    scale_bT = token_scales(pipe, ["a red cat"], factor=-2.0)
    assert scale_bT.shape == (1, text_length(pipe))
    words = sorted(word_positions(pipe, "a red cat", "a") + word_positions(pipe, "a red cat", "red") + word_positions(pipe, "a red cat", "cat"))
    assert (scale_bT[0] == -2.0).nonzero().flatten().tolist() == words
