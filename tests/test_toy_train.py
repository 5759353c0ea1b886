"""The toy model's training recipe (toyworld/train.py), run at a few steps on tiny settings."""

import json

import pytest
import torch
from safetensors import safe_open

from toyworld.model import ToyModelConfig, build_pipeline
from toyworld.train import STAGES, LitToyDiffusion, TrainConfig, UNetStage, VAEStage, train


def tiny_config(tmp_path, **kw) -> TrainConfig:
    base = dict(
        out=str(tmp_path / "model"),
        work_dir=str(tmp_path / "work"),
        threads=1,
        vae=VAEStage(steps=2, batch_size=2, decoder_steps=2),
        unet=UNetStage(steps=2, batch_size=2, num_scenes=4, warmup_steps=1, grounding_weight=0.1, export_every=0),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_train__tiny_run_writes_a_loadable_pipeline_and_caches_latents_with_masks(tmp_path):
    from activations.pipeline import load_pipeline

    cfg = tiny_config(tmp_path)
    out = train(cfg)
    meta = json.loads((out / "diffatlas.json").read_text())
    assert meta["train_steps"] == 2 and meta["train_config"]["unet"]["num_scenes"] == 4
    assert load_pipeline(str(out)).vae.config.scaling_factor > 0
    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    latents = torch.load(tmp_path / "work" / "latents_4.pt")
    masks = torch.load(tmp_path / "work" / "masks_4.pt")
    assert latents.shape == (4, cfg.model.latent_channels, 16, 16)
    assert masks.shape == (4, 2, 16, 16) and masks.sum(dim=(1, 2, 3)).gt(0).all()  # every scene has an object


def test_train__unet_stage_without_a_vae_says_which_stage_to_run_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="run stage 'vae'"):
        train(tiny_config(tmp_path, stage="unet"))


def test_train__unknown_stage_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="'vea'.*" + ", ".join(STAGES)):
        train(tiny_config(tmp_path, stage="vea"))


def test_unet_stage__text_encoder_learns_at_its_scaled_rate():
    pipe = build_pipeline(seed=0)
    [opt], _ = LitToyDiffusion(pipe, UNetStage(lr=1e-3, text_lr_scale=0.1)).configure_optimizers()
    unet_group, text_group = opt.param_groups
    assert text_group["initial_lr"] == pytest.approx(0.1 * unet_group["initial_lr"])
    assert {id(p) for p in text_group["params"]} == {id(p) for p in pipe.text_encoder.parameters()}


def test_text_encoder__token_embeddings_start_at_the_configured_std():
    for std in (0.02, 0.1):
        weight = build_pipeline(ToyModelConfig(token_embedding_std=std), seed=0).text_encoder.get_input_embeddings().weight
        assert weight.std().item() == pytest.approx(std, rel=0.1)
