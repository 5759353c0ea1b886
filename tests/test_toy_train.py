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
    latents = torch.load(tmp_path / "work" / "latents_s0_p0.5_4.pt")
    masks = torch.load(tmp_path / "work" / "masks_s0_p0.5_4.pt")
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


def test_train__vae_from_skips_the_vae_stages_and_ships_that_vae_unchanged(tmp_path):
    from safetensors.torch import load_file

    first = train(tiny_config(tmp_path / "a"))
    out = train(tiny_config(tmp_path / "b", vae_from=str(first)))
    assert not (tmp_path / "b" / "work" / "vae").exists()  # no VAE was trained
    shipped = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    source = load_file(first / "vae" / "diffusion_pytorch_model.safetensors")
    assert shipped.keys() == source.keys() and all(torch.equal(shipped[k], source[k]) for k in source)
    with pytest.raises(ValueError, match="vae_from"):
        train(tiny_config(tmp_path / "c", vae_from=str(first), stage="vae"))


def test_latent_prompts__captions_leave_attributes_unsaid_at_the_configured_rate():
    import numpy as np

    from toyworld.prompts import read_named
    from toyworld.scene import sample_scene
    from toyworld.train import LatentPrompts

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, num_objects=1) for _ in range(64)]
    stream = LatentPrompts(torch.zeros(64, 1), torch.zeros(64, 1), scenes, 0,
                           UNetStage(uncond_prob=0.0, drop_prob=0.5, short_prob=0.0), num_tokens=40)
    named = [read_named(prompt) for _, (_, prompt, _, _) in zip(range(400), stream)]
    said = [len(objects[0]) + len(scene) for objects, scene in named]
    assert 0.4 < np.mean(said) / 7 < 0.6  # half of the 7 attributes on average
    # drop_prob 0 names everything, but a held-out object still never in full
    from toyworld.scene import is_held_out

    kept = [s for s in scenes if not is_held_out(s.objects[0])]
    everything = LatentPrompts(torch.zeros(len(kept), 1), torch.zeros(len(kept), 1), kept, 0,
                               UNetStage(uncond_prob=0.0, drop_prob=0.0, short_prob=0.0), num_tokens=40)
    assert all(len(read_named(p)[0][0]) == 5 for _, (_, p, _, _) in zip(range(50), everything))


@pytest.mark.parametrize("flag, value, says", [
    ("--unet.drop_prob", "nan", "unet.drop_prob"),  # the parser refuses NaN itself
    ("--unet.short_prob", "-0.1", "unet.short_prob must be a probability in [0, 1], got -0.1"),
    ("--unet.drop_prob", "1.5", "unet.drop_prob must be a probability in [0, 1], got 1.5"),
    ("--vae_from", "no/such/folder", "vae_from 'no/such/folder' holds no VAE"),
    ("--unet.grounding_weight", "-0.1", "--unet.grounding_weight must be a finite number >= 0, got -0.1"),
    ("--unet.grounding_weight", "1e400", "--unet.grounding_weight must be a finite number >= 0, got inf"),
    ("--unet.steps", "0", "--unet.steps must be an integer >= 1, got 0"),
])
def test_main__bad_caption_rates_or_vae_folder_are_one_line_before_any_work(tmp_path, capsys, flag, value, says):
    from toyworld.train import main

    work = tmp_path / "work"
    assert main([flag, value, "--work_dir", str(work), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m toyworld.train: error: ") and says in err and "\n" not in err
    assert not work.exists()


def test_train__nan_caption_rate_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"unet.drop_prob must be a probability in \[0, 1\], got nan"):
        train(tiny_config(tmp_path, unet=UNetStage(drop_prob=float("nan"))))
    assert not (tmp_path / "work").exists()
