"""The toy MMDiT: Stable Diffusion 3 in miniature, the twin of the bundled toy U-Net model.

Same diffusers classes as SD3 (SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler, two
CLIPTextModelWithProjection, StableDiffusion3Pipeline), on the toy world's VAE and tokenizer:

- images 64x64 RGB -> the bundled toy VAE (frozen) -> latents [8, 16, 16] -> 2x2 patches: an
  8x8 grid of 64 image tokens;
- text: the word-level toy tokenizer (40 tokens) into two small CLIP encoders; as in SD3 their
  penultimate hidden states side by side are the 40 text tokens (width 2 x 128 = 256, the
  transformer's joint_attention_dim) and their projected pooled outputs side by side the pooled
  embedding (256). No T5: the pipeline is always called with ``max_sequence_length=0``
  (diffatlas.json's ``call``), so nothing is appended to the 40 CLIP tokens;
- transformer: joint-attention blocks over 40 text + 64 image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toyworld.model import TextEncoderConfig, ToyModelConfig, build_text_encoder, build_vae
from toyworld.tokenizer import build_tokenizer
from toyworld.vocab import IMAGE_SIZE

CALL = {"max_sequence_length": 0}
"""Pipeline-call arguments the toy MMDiT is always run with (recorded in its diffatlas.json)."""


@dataclass
class ToyMMDiTConfig(TextEncoderConfig):
    """Architecture of the toy MMDiT (saved with the weights as the diffusers configs). The text
    fields are those of each of its two CLIP encoders, built as the U-Net model's one."""

    latent_channels: int = 8
    """Channels of the latent image: those of the bundled toy VAE, which this model reuses frozen."""
    patch_size: int = 2
    """Latent cells per token side. 2, as SD3: the 16x16 latent becomes an 8x8 grid of 64 tokens,
    so a quadrant is 4x4 tokens and a latent cell (4 px, one stripe period) a quarter token; at 1
    the 256 image tokens would make attention 4x dearer for little gain at this size."""
    blocks: int = 6
    """Joint transformer blocks (SD3 medium has 24). Six give every token a few rounds of mixing
    text and image while the transformer stays near the U-Net's size (about 3.6 M parameters,
    7 MB in float16, against the U-Net's 2.6 M)."""
    heads: int = 4
    """Attention heads per block, as the U-Net model's attention; 6 blocks x 4 = 24 heads."""
    head_dim: int = 32
    """Width of a head; heads x head_dim (128) is the transformer's width, equal to each text
    encoder's, as the U-Net model's attention works at 128 text channels."""
    pos_embed_max_size: int = 16
    """Side of the fixed sin-cos position grid, in tokens, that the 8x8 grid is cropped from (its
    centre, as SD3 does with 192). 16 leaves room to sample up to 128x128 images."""
    shift: float = 1.0
    """The flow-matching timestep shift (FlowMatchEulerDiscreteScheduler's ``shift``), used both
    for sampling and for training's σ. SD3 shifts by 3.0 at 1024x1024 because a high-resolution
    image keeps its layout readable under more noise (Esser et al., 2024, sect. 5.3.2: the shift
    grows with the square root of the token count, 1 at 256x256's 1024 latent cells). The toy's
    16x16 latent has 256 cells, where that rule gives sqrt(256 / 1024) = 0.5; 1.0 (no shift)
    leaves the logit-normal σ centred at 0.5 and keeps more of the training at high noise, where the
    layout of the toy's large objects is decided."""


def text_width(cfg: ToyMMDiTConfig) -> int:
    """Width of a text token: the two CLIP encoders' penultimate states side by side."""
    return 2 * cfg.text_width


def build_transformer(cfg: ToyMMDiTConfig):
    from diffusers import SD3Transformer2DModel

    width = cfg.heads * cfg.head_dim
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 4,
        patch_size=cfg.patch_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        num_layers=cfg.blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=text_width(cfg),  # no T5: the CLIP pair's width is the joint width
        caption_projection_dim=width,  # the text stream works at the transformer's width, as in SD3
        pooled_projection_dim=text_width(cfg),
        pos_embed_max_size=cfg.pos_embed_max_size,
    )


def build_scheduler(cfg: ToyMMDiTConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def build_mmdit_pipeline(cfg: ToyMMDiTConfig | None = None, seed: int = 0, vae=None):
    """The toy MMDiT pipeline with random weights around a given (trained) VAE, or a random one:
    for tests and training. The VAE gets ``shift_factor`` 0.0 if it has none (SD3's pipeline adds
    it when decoding; the toy latents are near centred already: mean 0.07 at std 1.0)."""
    from diffusers import StableDiffusion3Pipeline

    cfg = cfg or ToyMMDiTConfig()
    torch.manual_seed(seed)
    encoders, tokenizers = [], []
    for _ in range(2):
        tokenizer = build_tokenizer()
        tokenizers.append(tokenizer)
        encoders.append(build_text_encoder(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                           tokenizer.pad_token_id, with_projection=True))
    if vae is None:
        vae = build_vae(ToyModelConfig(latent_channels=cfg.latent_channels))
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=build_transformer(cfg),
        scheduler=build_scheduler(cfg),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}
"""``from_pretrained`` arguments that load a toy MMDiT folder: its model_index.json lists no T5
(``[null, null]``), and diffusers then wants the missing components passed explicitly, as for
SD3 loaded without T5 (``DiffusionPipeline.from_pretrained(folder)`` alone raises "expected ...
but only ... were passed")."""


def load_mmdit_pipeline(folder, **kwargs):
    """A saved toy MMDiT (``StableDiffusion3Pipeline.from_pretrained`` with ``NO_T5``)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder, **NO_T5, **kwargs)


def encode_text(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text tokens [b, 40, 256], pooled [b, 256]) of ``prompts``, with gradients: exactly what
    ``pipe.encode_prompt(prompts, max_sequence_length=0)`` gives without guidance (SD3's
    ``_get_clip_prompt_embeds``: penultimate hidden states and projected pooled outputs of both CLIP
    encoders side by side, padded to joint_attention_dim; tests/test_toy_mmdit.py checks it)."""
    device = pipe.transformer.device
    states, pooled = [], []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    text = torch.cat(states, dim=-1)
    text = torch.nn.functional.pad(text, (0, pipe.transformer.config.joint_attention_dim - text.shape[-1]))
    return text, torch.cat(pooled, dim=-1)
