"""Steering edits: one-line feature, HRV and head edits through ``steer``, their recipes' YAML,
restoration after errors, and the clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

from activations.hooks import intervene
from activations.intervention import load_interventions, save_interventions
from activations.sites import head_table
from sae.config import Placement, SparseCoderConfig
from sae.registry import get_architecture
from steering import EncodePrompt, FeatureEdit, HeadScale, HRVEdit, steer

SITE = "up_blocks.2.attentions.0"  # 8x8 grid, width 64 in the toy architecture
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def pipe():
    from toyworld.model import build_pipeline

    p = build_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory, pipe):
    from activations.pipeline import model_fingerprint

    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=32, k=4), 64)
    sae.placement = Placement(site=SITE, model="toy", model_revision=model_fingerprint(pipe.unet))
    return sae.save_pretrained(tmp_path_factory.mktemp("sae") / "sae")


@pytest.fixture(scope="module")
def hrv_folder(tmp_path_factory, pipe):
    from analysis.concepts import ConceptList
    from analysis.hrv import HRV

    table = head_table(pipe.unet)
    votes = torch.randint(0, 5, (3, 2, len(table)), generator=torch.Generator().manual_seed(0))
    hrv = HRV(concepts=ConceptList(("color", "shape"), (("red", "blue"), ("circle", "square"))), votes=votes,
              head_table=table, step_t=[900, 500, 100], meta={"model": "toy"})
    return hrv.save(tmp_path_factory.mktemp("hrv") / "hrv")


def latents(pipe, *ivs, prompts=PROMPTS):
    gens = [torch.Generator().manual_seed(s) for s in range(len(prompts))]
    with steer(pipe, *ivs, prompts=prompts):
        return pipe(list(prompts), num_inference_steps=3, guidance_scale=4.0, generator=gens, output_type="latent").images


def test_feature_edit__every_op_and_via_changes_the_image_and_round_trips_yaml(pipe, sae_folder, tmp_path):
    base = latents(pipe)
    ops = [dict(op="inject", strength=2.0), dict(op="add", strength=20.0), dict(op="scale", strength=3.0), dict(op="clamp", strength=5.0),
           dict(op="ablate"), dict(op="spatial", strength=4.0, region={"quadrant": "top left"}),
           dict(op="global", strength=64.0), dict(op="spatial", strength=4.0, region={"box": [0, 0, 0.5, 1]}, via="splice")]
    ivs = [FeatureEdit(sae=str(sae_folder), features=[1, 2], when="early", **kw) for kw in ops]
    for iv in ivs:
        assert not torch.equal(latents(pipe, iv), base), iv.op
    back = load_interventions(save_interventions(tmp_path / "r.yaml", ivs))
    for a, b in zip(ivs, back):
        assert a.to_dict() == b.to_dict()
        assert torch.equal(latents(pipe, a), latents(pipe, b))


@pytest.mark.parametrize("op", [dict(op="spatial", strength=3.0, region={"quadrant": "bottom right"}),
                                dict(op="add", strength=20.0, mask={"quadrant": "top left"})])
def test_feature_edit__add_and_splice_agree(pipe, sae_folder, op):
    kw = dict(sae=str(sae_folder), features=[3], **op)
    a, b = latents(pipe, FeatureEdit(**kw)), latents(pipe, FeatureEdit(via="splice", **kw))
    assert torch.allclose(a, b, atol=1e-4)


def test_feature_edit__mask_limits_the_patches_written(pipe, sae_folder):
    from activations.edits import Observe

    seen = {}
    iv = FeatureEdit(sae=str(sae_folder), features=[0], op="inject", strength=5.0, mask={"quadrant": "top left"})
    grab = Observe(site=SITE, stage="block", sees="before", fn=lambda x, call: seen.setdefault("before", x.clone()))
    after = Observe(site=SITE, stage="block", fn=lambda x, call: seen.setdefault("after", x.clone()))
    latents(pipe, grab, iv, after)
    changed = (seen["after"] - seen["before"]).abs().sum(-1)[0].reshape(8, 8) > 0
    assert changed[:4, :4].all() and not changed[4:].any() and not changed[:, 4:].any()


def test_hrv_edit__strengthening_adjusting_and_uniform_change_the_image_and_round_trip(pipe, hrv_folder, tmp_path):
    base = latents(pipe)
    ivs = [HRVEdit(hrv=str(hrv_folder), concept="color", token=2),
           HRVEdit(hrv=str(hrv_folder), concept="color", undesired="shape", token=2, clamp=2.0),
           HRVEdit(hrv=str(hrv_folder), concept="shape", token=3, uniform=True, when="early")]
    outs = [latents(pipe, iv) for iv in ivs]
    for out in outs:
        assert not torch.equal(out, base)
    back = load_interventions(save_interventions(tmp_path / "h.yaml", ivs))
    assert [b.to_dict() for b in back] == [a.to_dict() for a in ivs]


def test_hrv_edit__controls_keep_the_total_weight_uniform_is_flat_permuted_is_a_shuffle(hrv_folder):
    hrv = HRVEdit(hrv=str(hrv_folder), concept="color", token=2).factors()
    uniform = HRVEdit(hrv=str(hrv_folder), concept="color", token=2, uniform=True).factors()
    permuted = HRVEdit(hrv=str(hrv_folder), concept="color", token=2, permute=3).factors()
    assert torch.allclose(uniform, torch.full_like(hrv, float(hrv.mean())))
    assert torch.allclose(permuted.sort().values, hrv.sort().values) and not torch.equal(permuted, hrv)
    assert torch.equal(permuted, HRVEdit(hrv=str(hrv_folder), concept="color", token=2, permute=3).factors())


def test_hrv_edit__word_token_resolved_per_prompt_equals_the_index(pipe, hrv_folder):
    # "red" is token 2 of "a red circle" and "blue" token 2 of "a blue square": a word per prompt
    by_word = latents(pipe, HRVEdit(hrv=str(hrv_folder), concept="color", token="red"), prompts=["a red circle"])
    by_index = latents(pipe, HRVEdit(hrv=str(hrv_folder), concept="color", token=2), prompts=["a red circle"])
    assert torch.equal(by_word, by_index)


def test_head_edits__scale_and_encode_prompt_on_patches(pipe, tmp_path):
    base = latents(pipe)
    scale = HeadScale(heads=[36, ["up_blocks.2.attentions.1.transformer_blocks.0.attn2", 1]], factor=0.0,
                      mask={"box": [0, 0, 0.5, 0.5]}, when="middle")
    enc = EncodePrompt(prompt="a green triangle", heads=list(range(36, 44)), mask={"quadrant": "top right"})
    for iv in (scale, enc):
        assert not torch.equal(latents(pipe, iv), base)
    back = load_interventions(save_interventions(tmp_path / "e.yaml", [scale, enc]))
    assert torch.equal(latents(pipe, *back), latents(pipe, scale, enc))


def test_steer__composes_and_restores_processors_after_an_exception(pipe, sae_folder, hrv_folder):
    before = dict(pipe.unet.attn_processors)
    hooks = {n: dict(m._forward_hooks) for n, m in pipe.unet.named_modules()}

    class Boom(Exception):
        pass

    ivs = [FeatureEdit(sae=str(sae_folder), features=[1], op="inject"), HRVEdit(hrv=str(hrv_folder), concept="color", token=2),
           HeadScale(heads=[0], factor=2.0)]
    with pytest.raises(Boom):
        with steer(pipe, *ivs, prompts=PROMPTS):
            pipe(PROMPTS, num_inference_steps=2, output_type="latent")
            raise Boom()
    assert dict(pipe.unet.attn_processors) == before
    assert {n: dict(m._forward_hooks) for n, m in pipe.unet.named_modules()} == hooks
    # an error raised by an edit during generation restores them too
    bad = FeatureEdit(sae=str(sae_folder), features=[1], op="spatial", region={"patches": [0], "grid": [3, 3]})
    with pytest.raises(ValueError, match="3x3"):
        latents(pipe, bad)
    assert dict(pipe.unet.attn_processors) == before


def _unet_calls(pipe) -> list:
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("token", [2, "red"])
def test_intervene_and_steer__take_an_hrv_edit_alike(pipe, hrv_folder, token):
    # one resolution step behind both: intervene expands the HRV edit exactly as steer does
    iv = HRVEdit(hrv=str(hrv_folder), concept="color", token=token)
    prompts = ["a red circle"]
    gens = [torch.Generator().manual_seed(0)]
    with intervene(pipe, iv, prompts=prompts):
        by_intervene = pipe(prompts, num_inference_steps=3, guidance_scale=4.0, generator=gens, output_type="latent").images
    assert torch.equal(by_intervene, latents(pipe, iv, prompts=prompts))
    assert not torch.equal(by_intervene, latents(pipe, prompts=prompts))


def test_intervene_and_steer__refuse_alike_before_any_image(pipe, hrv_folder, sae_folder, tmp_path):
    from analysis.hrv import HRV

    full = HRV.load(hrv_folder)
    other = HRV(concepts=full.concepts, votes=full.votes[..., :10], head_table=full.head_table[:10], step_t=full.step_t,
                meta={"model": "other"}).save(tmp_path / "other_hrv")
    narrow = get_architecture("topk")(SparseCoderConfig(num_latents=8, k=2), 32)
    narrow.placement = Placement(site=SITE)
    cases = [(HRVEdit(hrv=str(other), concept="color", token=2), PROMPTS, "HRV built for 10 heads"),
             (HRVEdit(hrv=str(hrv_folder), concept="color", token="red"), None, "token 'red' is a word: give the prompts"),
             (FeatureEdit(sae=narrow.save_pretrained(tmp_path / "narrow"), features=[0]), PROMPTS, "takes width 32"),
             ("not an edit", PROMPTS, "Intervention objects")]
    calls, handle = _unet_calls(pipe)
    try:
        for iv, prompts, message in cases:
            for attach in (intervene, steer):
                with pytest.raises((ValueError, TypeError), match=message), attach(pipe, iv, prompts=prompts):
                    pipe(PROMPTS, num_inference_steps=2, output_type="latent")
        # a composite needs the pipeline's tokenizer: the bare U-Net is refused by name
        with pytest.raises(ValueError, match="HRVEdit needs the pipeline"), intervene(pipe.unet, cases[1][0], prompts=PROMPTS):
            pass
    finally:
        handle.remove()
    assert calls == []  # every refusal came before the first U-Net call


# -- bad input ------------------------------------------------------------------------------


def test_bad_input__feature_out_of_range_names_the_valid_range(sae_folder):
    with pytest.raises(ValueError, match=r"feature 99 out of range .*32 latents \(valid: 0\.\.31\)"):
        FeatureEdit(sae=str(sae_folder), features=[1, 99])


def test_bad_input__sae_of_another_site_width_or_model(pipe, sae_folder, tmp_path):
    with pytest.raises(ValueError, match="trained on site 'up_blocks.2.attentions.0'.*'mid_block.attentions.0'"):
        FeatureEdit(sae=str(sae_folder), site="mid_block.attentions.0", features=[0])
    narrow = get_architecture("topk")(SparseCoderConfig(num_latents=8, k=2), 32)
    narrow.placement = Placement(site=SITE)
    with pytest.raises(ValueError, match="width 32 but site 'up_blocks.2.attentions.0' of this model has width 64"):
        latents(pipe, FeatureEdit(sae=narrow.save_pretrained(tmp_path / "narrow"), features=[0]))
    other = get_architecture("topk")(SparseCoderConfig(num_latents=8, k=2), 64)
    other.placement = Placement(site=SITE, model="sd1", model_revision="deadbeef")
    with pytest.raises(ValueError, match="trained on model 'sd1' \\(weights deadbeef\\)"):
        latents(pipe, FeatureEdit(sae=other.save_pretrained(tmp_path / "other"), features=[0]))


def test_bad_input__steer_refuses_an_sae_of_another_model_before_drawing_or_writing(pipe, tmp_path, monkeypatch):
    import activations.generate
    from steering.cli import SteerConfig, steer_recipe
    from steering.recipe import Recipe

    other = get_architecture("topk")(SparseCoderConfig(num_latents=8, k=2), 64)
    other.placement = Placement(site=SITE, model="sd1", model_revision="deadbeef")
    recipe = Recipe(model="toy", prompts=["a red circle"],
                    interventions=[FeatureEdit(sae=other.save_pretrained(tmp_path / "other"), features=[0])])
    drawn = []
    monkeypatch.setattr(activations.generate, "sample", lambda *a, **k: drawn.append(a))
    cfg = SteerConfig(recipe=str(recipe.save(tmp_path / "r.yaml")), out=str(tmp_path / "out"), wandb=False)
    with pytest.raises(ValueError, match="trained on model 'sd1' \\(weights deadbeef\\)"):
        steer_recipe(cfg, pipe)
    assert not drawn and not (tmp_path / "out").exists()


def test_feature_edit__when_defaults_to_the_saes_window_and_an_explicit_one_wins(pipe, tmp_path):
    from activations.timesteps import All, Window

    sae = get_architecture("topk")(SparseCoderConfig(num_latents=8, k=2), 64)
    sae.placement = Placement(site=SITE, window="early")
    folder = sae.save_pretrained(tmp_path / "early")
    default, everywhere = FeatureEdit(sae=folder, features=[0]), FeatureEdit(sae=folder, features=[0], when="all")
    assert default.when == Window("early") and everywhere.when == All()
    back = load_interventions(save_interventions(tmp_path / "r.yaml", [default, everywhere]))
    assert [b.when for b in back] == [Window("early"), All()]


@pytest.mark.parametrize("when", [{"tau": [0.5, 1.5]}, {"tau": [0.8, 0.2]}])
def test_bad_input__window_outside_unit_interval_or_reversed(sae_folder, when):
    with pytest.raises(ValueError, match="tau"):
        FeatureEdit(sae=str(sae_folder), features=[0], when=when)


def test_bad_input__mask_of_the_wrong_size(pipe, sae_folder):
    iv = FeatureEdit(sae=str(sae_folder), features=[0], mask={"patches": [1, 2], "grid": [4, 4]})
    with pytest.raises(ValueError, match="4x4 grid applied at a 8x8 site"):
        latents(pipe, iv)


def test_bad_input__token_not_in_the_prompt_names_the_prompt_tokens(pipe, hrv_folder):
    with pytest.raises(ValueError, match="token 'green' is not in the prompt 'a red circle'; its tokens: a, red, circle"):
        latents(pipe, HRVEdit(hrv=str(hrv_folder), concept="color", token="green"), prompts=["a red circle"])


def test_bad_input__concept_not_in_the_hrvs_names_the_valid_ones(hrv_folder):
    with pytest.raises(KeyError, match="concept 'texture' is not in these HRVs; valid concepts: color, shape"):
        HRVEdit(hrv=str(hrv_folder), concept="texture", token=2)
    with pytest.raises(KeyError, match="concept 'style'"):
        HRVEdit(hrv=str(hrv_folder), concept="color", undesired="style", token=2)
