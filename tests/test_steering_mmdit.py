"""Steering on complete tiny SD3 and FLUX pipelines: recipes (YAML round trip, ``diffatlas steer``)
with head edits at joint attention sites, SAE feature edits at image-stream and text-stream block
sites gated by flow-matching windows, word tokens in each family's text layout, the explorer, and
bad input refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from activations.edits import HeadEdit, Observe, SwapKV
from activations.generate import sample, schedule
from activations.hooks import intervene
from activations.joint_processor import JointHeadProcessor
from activations.models import build_tiny_pipeline
from activations.sites import list_sites
from activations.text import text_length
from activations.timesteps import select_steps
from common.errors import UsageError
from sae.config import Placement, SparseCoderConfig
from sae.registry import get_architecture
from steering import EncodePrompt, FeatureEdit, HeadScale, Recipe, run_recipe, steer
from steering.tokens import resolve_tokens, word_positions

PROMPTS, SEEDS = ["a red cat", "a blue dog on the left"], [0, 1]
# the last image-stream block of each family: what every earlier edit flows into
LAST = {"sd3": "transformer_blocks.2", "flux": "single_transformer_blocks.2"}
SINGLE_HEAD = {"sd3": ["transformer_blocks.1.attn", 1], "flux": ["single_transformer_blocks.1.attn", 1]}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def mmdit(request):
    return request.param, build_tiny_pipeline(request.param)


def latents(pipe, steps=3):
    return sample(pipe, PROMPTS, SEEDS, steps=steps, guidance=4.0, output_type="latent").images


def no_taps(pipe) -> bool:
    return not any(isinstance(getattr(m, "processor", None), JointHeadProcessor) for m in pipe.transformer.modules())


def small_sae(tmp_path, site: str, width: int, stage: str = "block", name: str = "sae"):
    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=32, k=4), width)
    sae.placement = Placement(site=site, stage=stage)
    return sae.save_pretrained(tmp_path / name)


# ---- recipes with head edits ---------------------------------------------------------------


def test_recipe_head_scale__yaml_round_trip_changes_the_image_and_restores_the_model(tmp_path, mmdit):
    family, pipe = mmdit
    plain = latents(pipe)
    recipe = Recipe(model=f"tiny-{family}", prompts=PROMPTS, seeds=SEEDS, steps=3, guidance=4.0, interventions=[
        HeadScale(heads=[0, 1, SINGLE_HEAD[family]], factor=0.0, mask={"box": [0, 0, 0.5, 1]}, when="all")])
    loaded = Recipe.load(recipe.save(tmp_path / "recipe.yaml"))
    assert loaded.to_dict() == recipe.to_dict()
    before, after = run_recipe(loaded, pipe, output_type="latent")
    assert torch.equal(before, plain)
    assert (after - before).abs().max() > 1e-4
    # the edit's heads are the global heads 0, 1 (the first block's attn) and the pair given
    with steer(pipe, *loaded.interventions, prompts=PROMPTS) as tap:
        edited = {n for n, p in tap.processors.items() if p.interventions}
    assert edited == {"transformer_blocks.0.attn", SINGLE_HEAD[family][0]}
    assert no_taps(pipe) and torch.equal(latents(pipe), plain)  # processors and hooks restored


def test_steer_cli__runs_an_mmdit_recipe_and_records_its_denoiser(tmp_path, mmdit):
    import json

    from PIL import Image

    from activations.pipeline import model_fingerprint
    from steering.cli import SteerConfig, steer_recipe

    family, pipe = mmdit
    recipe = Recipe(model=f"tiny-{family}", prompts=PROMPTS[:1], seeds=SEEDS[:1], steps=2, guidance=4.0,
                    interventions=[HeadScale(heads=[0], factor=4.0)])
    path = recipe.save(tmp_path / "r.yaml")
    result = steer_recipe(SteerConfig(recipe=str(path), out=str(tmp_path / "out"), wandb=False, scale=1), pipe=pipe)
    after = np.asarray(Image.open(tmp_path / "out" / "after" / "0000.png"))
    assert after.shape == (16, 16, 3)
    with steer(pipe, *recipe.interventions, prompts=recipe.prompts):
        expected = sample(pipe, recipe.prompts, recipe.seeds, steps=2, guidance=4.0).images[0]
    assert np.array_equal(after, np.asarray(expected))
    assert json.loads(result["run"].read_text())["model_revision"] == model_fingerprint(pipe.transformer)


# ---- another prompt through chosen heads -------------------------------------------------------


def all_heads(pipe) -> list[int]:
    return list(range(sum(s.heads for s in list_sites(pipe) if s.kind == "head")))


def test_encode_prompt__every_head_reading_the_same_prompt_drawn_from_the_same_noise_changes_nothing(mmdit):
    # the recorded draw is seed 0; a generation of that prompt from seed 0 computes the same text
    # keys and values at every head and step, so swapping them all in must leave it as it was
    family, pipe = mmdit
    plain = sample(pipe, PROMPTS[:1], [0], steps=3, guidance=4.0, output_type="latent").images
    with steer(pipe, EncodePrompt(prompt=PROMPTS[0], heads=all_heads(pipe), steps=3, guidance=4.0), prompts=PROMPTS[:1]):
        same = sample(pipe, PROMPTS[:1], [0], steps=3, guidance=4.0, output_type="latent").images
    torch.testing.assert_close(same, plain, atol=1e-4, rtol=1e-4)


def test_encode_prompt__another_prompt_changes_only_the_chosen_heads_within_the_mask(mmdit):
    family, pipe = mmdit
    site = "transformer_blocks.0.attn"
    seen = {}

    def spy(call):  # the first step's per-head outputs, [uncond; cond] rows in SD3, cond only in FLUX
        seen.setdefault(call.step, (call.out.clone(), call.rows("cond")))

    def heads_out(*edits):
        seen.clear()
        with steer(pipe, *edits, Observe(site=site, stage="heads", fn=spy, sees="after"), prompts=PROMPTS[:1]):
            sample(pipe, PROMPTS[:1], [5], steps=3, guidance=4.0, output_type="latent")
        return seen[0]

    plain, _ = heads_out()
    edited, cond = heads_out(EncodePrompt(prompt="a green triangle", heads=[[site, 1]], steps=3, guidance=4.0,
                                          mask={"box": [0, 0, 0.5, 1]}))
    changed = (edited - plain).abs().amax(dim=-1)  # [b, h, N]
    cond = -1 if cond is None else int(torch.as_tensor(cond).reshape(-1)[0])
    assert changed[cond, 1].max() > 1e-4  # the chosen head reads the other prompt
    assert changed[:, 0].max() == 0  # the other head: untouched
    if family == "sd3":
        assert changed[0].max() == 0  # the uncond row: untouched (the edit's branch is cond)
    grid = int(changed.shape[-1] ** 0.5)
    assert changed[cond, 1].reshape(grid, grid)[grid // 2:].max() == 0  # the box is the top half
    assert no_taps(pipe)


def test_encode_prompt__a_generation_at_other_steps_than_recorded_is_refused_in_one_line(mmdit):
    family, pipe = mmdit
    plain = latents(pipe)
    with pytest.raises(UsageError, match=r"recorded at 3 steps .*draw with the steps \(and the image size\) the edit was recorded at") as err:
        with steer(pipe, EncodePrompt(prompt="a blue dog", heads=[0], steps=3, guidance=4.0), prompts=PROMPTS):
            latents(pipe, steps=4)
    assert "\n" not in str(err.value)
    assert no_taps(pipe) and torch.equal(latents(pipe), plain)  # restored after the exception


def test_encode_prompt__in_a_recipe_draws_at_the_recipes_steps_and_refuses_other_steps_before_drawing(tmp_path, mmdit):
    family, pipe = mmdit
    # steps and guidance left out: the other prompt is drawn at the recipe's (3 steps, not the model's default)
    recipe = Recipe(model=f"tiny-{family}", prompts=PROMPTS, seeds=SEEDS, steps=3, guidance=4.0, interventions=[
        EncodePrompt(prompt="a blue dog", heads=[0, 1])])
    loaded = Recipe.load(recipe.save(tmp_path / "recipe.yaml"))
    assert loaded.to_dict() == recipe.to_dict()
    before, after = run_recipe(loaded, pipe, output_type="latent")
    assert (after - before).abs().max() > 1e-4
    same = Recipe(model=f"tiny-{family}", prompts=PROMPTS[:1], seeds=[0], steps=3, guidance=4.0, interventions=[
        EncodePrompt(prompt=PROMPTS[0], heads=all_heads(pipe))])
    before, after = run_recipe(same, pipe, output_type="latent")
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # its own prompt from its own noise: no change
    other = Recipe(model=f"tiny-{family}", prompts=PROMPTS, seeds=SEEDS, steps=3, guidance=4.0, interventions=[
        EncodePrompt(prompt="a blue dog", heads=[0], steps=5)])
    with pytest.raises(UsageError, match=r"^EncodePrompt: steps is 5, but the run draws 3 steps; set steps: 3 or leave it out$"):
        other.check(pipe)
    assert no_taps(pipe)


def test_encode_prompt__bad_steps_and_guidance_refused_in_one_line():
    for field, value in [("steps", 0), ("steps", -2), ("steps", 10**6), ("steps", 2.5), ("guidance", float("nan")),
                         ("guidance", float("inf")), ("guidance", -1.0)]:
        with pytest.raises(UsageError, match=rf"^EncodePrompt: {field} must be .*got {value!r}$"):
            EncodePrompt(prompt="a blue dog", heads=[0], **{field: value})


# ---- SAE feature edits inside their windows ---------------------------------------------------


@pytest.mark.parametrize("where", ["block", "context", "heads"])
def test_feature_edit__changes_the_run_only_from_its_window_on(tmp_path, mmdit, where):
    family, pipe = mmdit
    sites = {s.name: s for s in list_sites(pipe)}
    site = {"block": "transformer_blocks.0", "context": "transformer_blocks.0.context", "heads": "transformer_blocks.0.attn"}[where]
    folder = small_sae(tmp_path, site, sites[site].width, stage="heads" if where == "heads" else "block", name=where)
    steps = 8
    late = select_steps("late", schedule(pipe, steps), pipe.scheduler.config.num_train_timesteps)
    assert late and late[0] > 0  # the window starts after the first step (tau = sigma < 0.2)

    def run(*edits):
        seen = {}
        spy = Observe(site=LAST[family], stage="block", fn=lambda call: seen.setdefault(call.step, call.delta.clone()))
        with steer(pipe, *edits, spy, prompts=PROMPTS):
            out = latents(pipe, steps)
        return out, seen

    plain, seen_plain = run()
    edit = FeatureEdit(sae=str(folder), features=[0, 3], op="add", strength=5.0, when="late")
    steered, seen_edit = run(edit)
    for step in range(steps):
        same = torch.equal(seen_plain[step], seen_edit[step])
        assert same == (step < late[0]), (step, late)  # identical before the window, changed inside it
    assert (steered - plain).abs().max() > 1e-4
    assert no_taps(pipe)


def test_feature_edit__an_sae_of_another_width_or_site_is_refused_naming_the_valid_ones(tmp_path, mmdit):
    family, pipe = mmdit
    wrong = small_sae(tmp_path, "transformer_blocks.0", 24)
    with pytest.raises(UsageError, match="this SAE takes width 24 but site 'transformer_blocks.0'.*has width 16"):
        with steer(pipe, FeatureEdit(sae=str(wrong), features=[0])):
            pass
    unknown = small_sae(tmp_path, "mid_block.attentions.0", 16, name="unet_sae")
    with pytest.raises(UsageError, match="site 'mid_block.attentions.0' is not a block site.*valid sites: transformer_blocks.0,"):
        with steer(pipe, FeatureEdit(sae=str(unknown), features=[0])):
            pass
    assert no_taps(pipe)


# ---- tokens: each family's text layout -------------------------------------------------------


def test_a_word_indexes_each_part_of_the_family_text_sequence(mmdit):
    family, pipe = mmdit
    # the tiny tokenizers are word level with a start token: "red" is token 2 of "a red cat"
    if family == "sd3":  # [CLIP tokens (tokenizer_max_length = 16), T5 tokens]: the word in both
        assert word_positions(pipe, "a red cat", "red") == [2, pipe.tokenizer_max_length + 2]
    else:  # FLUX: T5 tokens only (tokenizer_2); its CLIP tokenizer feeds the pooled vector
        assert word_positions(pipe, "a red cat", "red") == [2]
    with pytest.raises(UsageError, match="token 'green' is not in the prompt 'a red cat'; its tokens: a, red, cat"):
        word_positions(pipe, "a red cat", "green")


def test_an_hrv_edit_by_word_rescales_exactly_the_word_positions_of_the_joint_text(tmp_path, mmdit):
    from analysis.concepts import ConceptList
    from analysis.hrv import HRV
    from activations.sites import head_table
    from steering import HRVEdit

    family, pipe = mmdit
    table = head_table(pipe)
    votes = torch.randint(1, 5, (2, 2, len(table)), generator=torch.Generator().manual_seed(0))
    hrv = HRV(concepts=ConceptList(("color", "shape"), (("red", "blue"), ("cat", "dog"))), votes=votes, head_table=table,
              step_t=[900, 100], meta={"model": f"tiny-{family}"})
    folder = hrv.save(tmp_path / "hrv")
    site = "transformer_blocks.1.attn"
    seen = {}

    def keep(which):
        return lambda x, call: seen.setdefault(which, x.clone())

    spies = [Observe(site=site, stage="probs", fn=keep("before"), sees="before"), Observe(site=site, stage="probs", fn=keep("after"))]
    recipe = Recipe(model=f"tiny-{family}", prompts=["a red cat"], seeds=[0], steps=2, guidance=4.0,
                    interventions=[HRVEdit(hrv=str(folder), concept="color", token="red", branch="both")])
    recipe = Recipe.load(recipe.save(tmp_path / "r.yaml"))  # the word travels through YAML
    with steer(pipe, *recipe.interventions, *spies, prompts=recipe.prompts):
        latents_ = sample(pipe, recipe.prompts, recipe.seeds, steps=2, guidance=4.0, output_type="latent").images
    changed = (seen["after"] != seen["before"]).flatten(0, -2).any(0).nonzero().flatten().tolist()
    assert changed == word_positions(pipe, "a red cat", "red") == {"sd3": [2, 18], "flux": [2]}[family]
    assert seen["before"].shape[-1] == text_length(pipe)
    assert latents_.isfinite().all()


def test_token_indices_are_checked_against_the_joint_text_length(mmdit):
    family, pipe = mmdit
    n = text_length(pipe)  # SD3 16 + 256, FLUX 512: beyond the CLIP tokenizer's 16
    assert resolve_tokens(pipe, ["a red cat"], n - 1) == [[n - 1]]
    with pytest.raises(UsageError, match=f"token index {n} out of range for this model's text of {n} tokens"):
        resolve_tokens(pipe, ["a red cat"], n)
    site = "transformer_blocks.0.attn"
    with intervene(pipe, HeadEdit(site=site, heads=[0], tokens=[n - 1], scale=0.0)):
        pass
    with pytest.raises(UsageError, match=rf"HeadEdit at {site}: token index {n} out of range for {n} tokens \(valid: 0..{n - 1}\)"):
        with intervene(pipe, HeadEdit(site=site, heads=[0], tokens=[n], scale=0.0)):
            pass


# ---- bad input: one line naming the value and the valid choices -------------------------------


def test_bad_edits_are_one_line_naming_the_value_and_the_valid_choices(mmdit):
    family, pipe = mmdit
    heads = sum(s.heads for s in list_sites(pipe) if s.kind == "head")
    cases = [
        (HeadScale(heads=[999], factor=0.0), f"global head 999 out of range for this model's {heads} .*valid: 0..{heads - 1}"),
        (HeadScale(heads=[["transformer_blocks.0.attn2", 0]], factor=0.0), "valid sites: transformer_blocks.0.attn,"),
        (SwapKV(site="transformer_blocks.0.attn", heads=[0], encoder_hidden_states=torch.zeros(4, 8)),
         rf"SwapKV at transformer_blocks.0.attn: text embeddings to project \(encoder_hidden_states\) cannot be read on {family} "
         r"models .*valid families: sd1, sd2, sdxl \(steering.EncodePrompt gives each family what it reads\)"),
        (HeadEdit(site="transformer_blocks.0", heads=[0], scale=0.0),
         "site 'transformer_blocks.0' is a block site; stage 'probs' needs a head site such as 'transformer_blocks.0.attn'"),
    ]
    for edit, message in cases:
        with pytest.raises(UsageError, match=message) as err:
            with steer(pipe, edit, prompts=PROMPTS[:1]):
                pass
        assert "\n" not in str(err.value)
    assert no_taps(pipe)


# ---- the explorer --------------------------------------------------------------------------


def test_explorer__lists_the_head_sites_and_draws_with_and_without_an_edit(tmp_path, mmdit):
    from steering.explorer.session import EditSpec, Explorer
    from sae.sparse_coder import SparseCoder

    family, pipe = mmdit
    sites = list_sites(pipe)
    context = next(s for s in sites if s.name.endswith(".context"))
    sae = SparseCoder.from_pretrained(small_sae(tmp_path, context.name, context.width))
    ex = Explorer(pipe, model=f"tiny-{family}", sae=sae)
    info = ex.info()
    assert [s["name"] for s in info["sites"]] == [s.name for s in sites if s.kind == "head"]
    assert all(s["name"].endswith(".attn") for s in info["sites"]) and info["select_grid"] == [4, 4]
    if family == "flux":
        assert any(s["name"].startswith("single_transformer_blocks.") for s in info["sites"])

    gen = ex.generate("a red cat", seed=3, steps=3, guidance=4.0)
    assert gen.tokens[1:4] == ["a", "red", "cat"] and gen.words == [1, 2, 3]
    for s in ex.sites:
        assert gen.maps[s.name].shape == (3, s.heads, 16, len(gen.tokens))
    assert gen.keys == text_length(pipe) + 16  # the joint softmax runs over text and image keys
    plain = sample(pipe, ["a red cat"], [3], steps=3, guidance=4.0).images[0]
    assert np.array_equal(gen.image, np.asarray(plain.convert("RGB")))  # capturing changes nothing
    assert ex.patch(gen.id, 1, 0.5, 0.5, token=2)["uniform"] == round(1 / gen.keys, 4)

    scaled = ex.edit(EditSpec(gen=gen.id, op="scale", heads=[0, 1], all_patches=True, factor=0.0))
    assert scaled["max_diff"] > 0
    assert "head_edit" in scaled["recipe"]
    # an SAE feature edit at a text-stream site: its grid is (1, text length)
    assert ex.site_grid(context.name) == (1, text_length(pipe))
    feat = ex.edit(EditSpec(gen=gen.id, op="sae", feature=1, mode="inject", value=20.0, all_patches=True))
    assert feat["max_diff"] > 0 and "feature_edit" in feat["recipe"]
    # the heads read another prompt's text keys and values, recorded at this generation's steps
    swapped = ex.edit(EditSpec(gen=gen.id, op="swap", heads=[0, 1], all_patches=True, prompt="a blue dog"))
    assert swapped["max_diff"] > 0 and "swap_kv" in swapped["recipe"] and "text_kv" in swapped["recipe"]
    assert no_taps(pipe)
    assert np.array_equal(np.asarray(sample(pipe, ["a red cat"], [3], steps=3, guidance=4.0).images[0].convert("RGB")), gen.image)


def test_explorer__an_opened_image_is_drawn_from_its_euler_inversion_as_the_recipe_draws_it(tmp_path, mmdit):
    """Flow matching: the page's clean image of an opened image is the `inversion:` recipe's, bit
    for bit (FLUX packs its latents; the sampler is the pipeline's own), and edits apply to it."""
    import io

    from PIL import Image

    from steering.explorer.session import EditSpec, Explorer

    family, pipe = mmdit
    ex = Explorer(pipe, model=f"tiny-{family}", inversions=tmp_path)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    opened = ex.open_image(buf.getvalue(), "x.png", "a red cat", steps=3, guidance=1.0)
    assert opened.inversion.sampler is None
    gen = ex.generate("a red cat", seed=1)
    recipe = Recipe(model=f"tiny-{family}", prompts=["a red cat"], seeds=[], steps=None, guidance=None, interventions=[],
                    inversion=str(opened.folder))
    assert np.array_equal(gen.image, np.asarray(run_recipe(recipe, pipe)[0][0].convert("RGB")))
    edit = ex.edit(EditSpec(gen=gen.id, op="scale", heads=[0, 1], all_patches=True, factor=0.0))
    assert edit["max_diff"] > 0 and f"inversion: {opened.folder}" in edit["recipe"]
