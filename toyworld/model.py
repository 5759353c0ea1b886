"""The bundled toy text-to-image model: Stable Diffusion 1.x in miniature.

Same diffusers classes as SD 1.x (AutoencoderKL, CLIPTextModel, UNet2DConditionModel, a
scheduler, StableDiffusionPipeline), so everything that works here works on real checkpoints:

- images 64x64 RGB -> VAE (downsampling 4x) -> latents [8, 16, 16];
- text: word-level tokenizer, 40 tokens, CLIP text transformer (causal, like CLIP);
- U-Net: cross-attention in down, mid and up blocks at 16x16, 8x8, 4x4 and 2x2;
  13 cross-attention modules x 4 heads = 52 heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toyworld.tokenizer import MAX_LENGTH, build_tokenizer
from toyworld.vocab import IMAGE_SIZE


@dataclass
class TextEncoderConfig:
    """Architecture of a toy CLIP text encoder (the U-Net model has one, the MMDiT two)."""

    text_width: int = 128
    """Width of the text transformer; also the U-Net's cross_attention_dim."""
    text_layers: int = 3
    """Transformer layers of the text encoder."""
    text_heads: int = 4
    """Attention heads of the text encoder."""
    token_embedding_std: float = 0.1
    """Std of the text encoder's initial token embeddings (CLIP initialises them at 0.02). At
    0.02 a word adds little to its own output next to its context: "left" and "right" in the same
    prompt start 2.5 apart (token norm 11); at 0.1, 7.3 apart."""


@dataclass
class ToyModelConfig(TextEncoderConfig):
    """Architecture of the bundled model (saved with the weights as the diffusers configs)."""

    unet_channels: tuple[int, ...] = (32, 64, 64, 64)
    """U-Net channels per level, from the 16x16 latent down by halves (16, 8, 4, 2 for four
    levels). The 2x2 level is where the four quadrants are single cells, so its cross-attention can
    place "top left" in one step: a U-Net has no positional encoding, and shallower levels learn
    where they are only from the zero padding of their convolutions."""
    unet_layers_per_block: int = 1
    """ResNet + transformer pairs per down block (up blocks get one more, as in SD)."""
    unet_heads: int = 4
    """Cross- and self-attention heads per transformer block."""
    vae_channels: tuple[int, int, int] = (16, 32, 64)
    """VAE channels at 64x64, 32x32 and 16x16 (three levels: downsampling by 4)."""
    latent_channels: int = 8
    """Channels of the latent image. SD uses 4 at 8x downsampling; at 4x, 4 channels blur the
    small objects' shapes (the oracle read 69% of shapes right on such reconstructions), so 8."""


def build_text_encoder(cfg: TextEncoderConfig, vocab_size: int, bos: int, eos: int, pad: int,
                       with_projection: bool = False):
    """A CLIPTextModel (SD 1.x), or with ``with_projection`` a CLIPTextModelWithProjection (SD3's
    two CLIP encoders: its pooled output is the projected end-of-text token)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=cfg.text_width,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=cfg.token_embedding_std)
    return model


def build_unet(cfg: ToyModelConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * len(cfg.unet_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(cfg.unet_channels),
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.unet_heads,  # diffusers' legacy name: SD 1.x passes the head count here
        norm_num_groups=8,
    )


def build_vae(cfg: ToyModelConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    # SD 1.x's betas rescaled to zero terminal SNR, with v-prediction and trailing timesteps
    # (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). SD's own
    # schedule leaves sqrt(alpha_bar) = 0.07 of the image in its noisiest latent; on a 16x16 latent
    # that leak shows where objects are, so a model trained on it places objects where the leak
    # is instead of where the prompt says, and sampling from pure noise then puts them anywhere.
    # DPM-Solver++ samples well in the 25 steps the benchmarks use.
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        steps_offset=1,  # unused by trailing spacing; 1 is what StableDiffusionPipeline expects (else it warns)
    )


def build_pipeline(cfg: ToyModelConfig | None = None, seed: int = 0, vae=None):
    """The toy pipeline with random weights (or a given trained VAE): for tests and training."""
    from diffusers import StableDiffusionPipeline

    cfg = cfg or ToyModelConfig()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(
        cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    pipe = StableDiffusionPipeline(
        vae=vae if vae is not None else build_vae(cfg),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_unet(cfg),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
