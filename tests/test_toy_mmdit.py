"""The toy MMDiT's training recipe (toyworld/train_mmdit.py), run at a few steps on tiny settings."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toyworld.model_mmdit import CALL, NO_T5, ToyMMDiTConfig, build_mmdit_pipeline, build_scheduler
from toyworld.train import LatentPrompts
from toyworld.train_mmdit import LitToyMMDiT, MMDiTStage, MMDiTTrainConfig, flow_match, sample_sigmas, train

TOY = Path(__file__).resolve().parents[1] / "toyworld" / "weights"  # the bundled U-Net model: its VAE
TINY = ToyMMDiTConfig(text_width=32, text_layers=2, text_heads=2, blocks=2, heads=2, head_dim=16)
PROMPTS = ["a big red plain circle at the center on a gray background, by day", "", "striped",
           "at night, on a black background, a small blue square at the top left and a green cross in the bottom right"]


def tiny_config(tmp_path, **stage) -> MMDiTTrainConfig:
    base = dict(steps=3, batch_size=2, num_scenes=4, warmup_steps=1, export_every=2)
    return MMDiTTrainConfig(out=str(tmp_path / "model"), work_dir=str(tmp_path / "work"), threads=1, vae_from=str(TOY),
                            model=TINY, mmdit=MMDiTStage(**{**base, **stage}))


def test_train__tiny_run_exports_an_sd3_pipeline_that_draws_64px_images_without_t5(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    out = train(tiny_config(tmp_path))
    meta = json.loads((out / "diffatlas.json").read_text())
    assert meta["name"] == "toy-mmdit" and meta["call"] == CALL == {"max_sequence_length": 0}
    assert meta["train_steps"] == 3 and meta["num_inference_steps"] == 25 and meta["train_config"]["model"]["blocks"] == 2
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float16}
    # the VAE is the bundled one, unchanged; only its latent scale is (re)set
    shipped, source = (load_file(f / "vae" / "diffusion_pytorch_model.safetensors") for f in (out, TOY))
    assert shipped.keys() == source.keys() and all(torch.equal(shipped[k], source[k]) for k in source)

    with pytest.raises(ValueError, match="text_encoder_3"):  # diffusers wants the absent T5 passed as None
        StableDiffusion3Pipeline.from_pretrained(out)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, torch_dtype=torch.float32, **NO_T5)
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor == 0.0 and pipe.vae.config.scaling_factor > 0
    images = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=meta["guidance_scale"], output_type="np",
                  generator=torch.Generator().manual_seed(0), **meta["call"]).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()


def test_training_step__loss_is_finite_and_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    pipe = build_mmdit_pipeline(TINY, seed=0)
    lit = LitToyMMDiT(pipe, MMDiTStage(lr=3e-3, warmup_steps=1, steps=30))
    [opt], _ = lit.configure_optimizers()
    batch = (torch.randn(4, 8, 16, 16), PROMPTS, None, None)
    losses = []
    for _ in range(20):
        torch.manual_seed(1)  # the same noise and σ every step: the loss itself must fall
        loss = lit.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.85 * losses[0]


def test_training_step__reads_the_stream_the_unet_stage_reads():
    rng = np.random.default_rng(0)
    from toyworld.scene import sample_scene

    scenes = [sample_scene(rng) for _ in range(3)]
    stream = LatentPrompts(torch.randn(3, 8, 16, 16), torch.zeros(3, 2, 16, 16), scenes, 0, MMDiTStage(), 40)
    batch = next(iter(torch.utils.data.DataLoader(stream, batch_size=2)))
    lit = LitToyMMDiT(build_mmdit_pipeline(TINY, seed=0), MMDiTStage())
    assert torch.isfinite(lit.training_step(batch, 0))


def test_grounding__records_one_map_per_joint_block_and_its_loss_trains_the_transformer():
    from toyworld.grounding import record_cross_attention, token_owners

    torch.manual_seed(0)
    pipe = build_mmdit_pipeline(TINY, seed=0)
    lit = LitToyMMDiT(pipe, MMDiTStage(grounding_weight=0.5))
    prompts = ["a big red circle at the top left", "a small blue square"]
    owners = torch.stack([token_owners(p, 40) for p in prompts])
    masks = torch.zeros(2, 2, 16, 16)
    masks[:, 0, :8, :8] = 1.0  # object 0 fills the top-left quadrant
    batch = (torch.randn(2, 8, 16, 16), prompts, owners, masks)
    text, pooled = lit.encode(prompts)
    args = dict(hidden_states=batch[0], encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([500.0, 500.0]))
    reference = pipe.transformer(**args).sample
    with record_cross_attention(pipe.transformer) as maps:
        recorded = pipe.transformer(**args).sample
    torch.testing.assert_close(recorded, reference, atol=1e-5, rtol=1e-4)
    # one [b, 64 image tokens, 40 text tokens] slice per block, normalised over text and image keys
    assert len(maps) == TINY.blocks and all(m.shape == (2, 64, 40) and m.requires_grad for m in maps)
    assert all(float(m.detach().sum(-1).max()) < 1.0 for m in maps)

    lit.on_fit_start()
    try:
        grounded = lit.training_step(batch, 0)
        assert lit.attention_maps is not None and len(lit.attention_maps) == TINY.blocks
        grounded.backward()
        grad = pipe.transformer.transformer_blocks[0].attn.add_k_proj.weight.grad  # the text keys learn where to go
        assert grad is not None and grad.abs().sum() > 0
    finally:
        lit.on_fit_end()
    assert lit.attention_maps is None
    assert not any("JointHeadProcessor" in type(m.processor).__name__ for m in pipe.transformer.modules() if hasattr(m, "processor"))
    torch.manual_seed(1)
    plain = LitToyMMDiT(pipe, MMDiTStage()).training_step(batch, 0)
    torch.manual_seed(1)
    lit.on_fit_start()
    try:
        with_grounding = lit.training_step(batch, 0)
    finally:
        lit.on_fit_end()
    assert with_grounding > plain  # the same noise and σ: the grounding term is added, weighted


def test_encode__the_training_text_is_the_pipelines_encode_prompt_at_max_sequence_length_0():
    pipe = build_mmdit_pipeline(TINY, seed=0)
    text, pooled = LitToyMMDiT(pipe, MMDiTStage()).encode(PROMPTS)
    ref_text, _, ref_pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                                    do_classifier_free_guidance=False, max_sequence_length=0,
                                                    device=torch.device("cpu"))
    assert text.shape == (len(PROMPTS), 40, 2 * TINY.text_width) and pooled.shape == (len(PROMPTS), 2 * TINY.text_width)
    assert torch.equal(text, ref_text) and torch.equal(pooled, ref_pooled)
    assert text.requires_grad  # the text encoders learn


def test_flow_match__is_the_schedulers_noising_timestep_and_euler_step():
    scheduler = build_scheduler(ToyMMDiTConfig(shift=3.0))
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 8, 16, 16, generator=g), torch.randn(1, 8, 16, 16, generator=g)
    for i in (0, 4, 9):
        t = scheduler.timesteps[i : i + 1]
        noisy, v, timestep = flow_match(x0, noise, scheduler.sigmas[i : i + 1])
        torch.testing.assert_close(timestep, t)
        torch.testing.assert_close(noisy, scheduler.scale_noise(x0, t, noise))
        # the exact v carries x_t along the straight path to the next σ under the Euler sampler
        scheduler._step_index = i
        stepped = scheduler.step(v, t, noisy).prev_sample
        torch.testing.assert_close(stepped, flow_match(x0, noise, scheduler.sigmas[i + 1 : i + 2])[0])


@pytest.mark.parametrize("shift, median", [(1.0, 0.5), (3.0, 0.75)])
def test_sample_sigmas__logit_normal_shifted_as_the_schedule(shift, median):
    torch.manual_seed(0)
    sigmas = sample_sigmas(20000, MMDiTStage(logit_mean=0.0, logit_std=1.0), shift)
    assert 0 < sigmas.min() and sigmas.max() < 1
    assert sigmas.median().item() == pytest.approx(median, abs=0.01)
    # logit-normal(0, 1): 68% of logit(σ) within ±1 before the shift
    unshifted = sigmas / (shift - (shift - 1) * sigmas)
    assert ((torch.logit(unshifted).abs() < 1).float().mean().item()) == pytest.approx(0.683, abs=0.02)


def test_default_model__pipeline_fits_25_mb_in_float16():
    pipe = build_mmdit_pipeline(seed=0)
    params = sum(p.numel() for name in ("transformer", "text_encoder", "text_encoder_2", "vae")
                 for p in getattr(pipe, name).parameters())
    assert 2 * params < 25e6
    assert pipe.transformer.config.joint_attention_dim == pipe.transformer.config.pooled_projection_dim == 256


def test_main__a_missing_vae_folder_is_one_line_before_any_work(tmp_path, capsys):
    from toyworld.train_mmdit import main

    work = tmp_path / "work"
    assert main(["--vae_from", "no/such/folder", "--work_dir", str(work), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m toyworld.train_mmdit: error: vae_from 'no/such/folder' holds no VAE") and "\n" not in err
    assert not work.exists()
    assert main(["--mmdit.drop_prob", "1.5", "--work_dir", str(work)]) == 2
    assert "mmdit.drop_prob must be a probability in [0, 1], got 1.5" in capsys.readouterr().err


def test_shipped_config__parses_and_describes_the_default_model():
    from common.config import parse

    cfg = parse(MMDiTTrainConfig, ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "toyworld" / "train_mmdit.yaml")], "t")
    assert cfg.model == ToyMMDiTConfig() and cfg.out == "toyworld/weights_mmdit" and cfg.vae_from == "toyworld/weights"
    assert cfg.mmdit.steps > 0 and cfg.num_inference_steps == 25


def test_train__init_from_continues_from_an_exported_folder(tmp_path):
    from safetensors.torch import load_file

    first = train(tiny_config(tmp_path / "a"))
    out = train(tiny_config(tmp_path / "b", steps=1, lr=1e-9, init_from=str(first)))
    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        before, after = load_file(first / part), load_file(out / part)
        assert all(torch.allclose(after[k].float(), before[k].float(), atol=1e-3) for k in before)
    with pytest.raises(FileNotFoundError, match="holds no MMDiT"):
        train(tiny_config(tmp_path / "c", init_from=str(TOY)))  # a U-Net folder


@pytest.mark.parametrize("flag, value, says", [
    ("--mmdit.grounding_weight", "-1", "--mmdit.grounding_weight must be a finite number >= 0, got -1.0"),
    ("--mmdit.grounding_weight", "1e400", "--mmdit.grounding_weight must be a finite number >= 0, got inf"),
    ("--mmdit.grounding_weight", "nan", "--mmdit.grounding_weight must be a number, got 'nan'"),  # the parser's own
    ("--mmdit.steps", "0", "--mmdit.steps must be an integer >= 1, got 0"),
    ("--mmdit.steps", "-3", "--mmdit.steps must be an integer >= 1, got -3"),
    ("--mmdit.batch_size", "0", "--mmdit.batch_size must be an integer >= 1, got 0"),
    ("--mmdit.lr", "-0.1", "--mmdit.lr must be a finite number >= 0, got -0.1"),
    ("--mmdit.ema_decay", "2", "--mmdit.ema_decay must be a finite number >= 0 and <= 1, got 2.0"),
    ("--mmdit.two_object_prob", "1.5", "mmdit.two_object_prob must be a probability in [0, 1], got 1.5"),
])
def test_main__numbers_out_of_range_are_one_line_before_any_work(tmp_path, capsys, flag, value, says):
    from toyworld.train_mmdit import main

    work = tmp_path / "work"
    assert main([flag, value, "--work_dir", str(work), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"python -m toyworld.train_mmdit: error: {says}"
    assert not work.exists() and not (tmp_path / "out").exists()
