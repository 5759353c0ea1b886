"""Model architectures without weights: the shipped configs (configs/models/) and tiny in-process models.

``build_denoiser(name)`` instantiates the denoiser of a known model (a U-Net, or an MMDiT
transformer of SD3 / SD3.5 / FLUX.1) with random weights, of the class its family declares
(``activations.families``): for structural tests (``device="meta"`` builds one without allocating
memory) and for speed measurements; ``build_unet`` is the same for U-Net models only.
``build_tiny_pipeline(family)`` builds a complete, tiny, randomly initialised pipeline of each
U-Net family (SD 1.x, SD 2.x, SDXL) in-process, so that tests exercise every family's quirks
offline; ``build_tiny_transformer(family)`` builds a tiny MMDiT (sd3, flux) denoiser alone.
Real weights are ``activations.pipeline.load_pipeline``'s job.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import yaml

from activations import families
from common import bundled, plugins
from common.errors import UsageError

FAMILIES = tuple(families.FAMILIES)  # every model family: sd1, sd2, sdxl, sd3, flux
UNET_FAMILIES = families.ARCHITECTURES["unet"].families
MMDIT_FAMILIES = tuple(f for f in FAMILIES if f not in UNET_FAMILIES)


def _available() -> dict:
    """name -> YAML file of the shipped model configs (package data: an installed wheel has them too)."""
    return bundled.configs("models")


def _aliases() -> dict[str, str]:
    """Alternative spellings: hub ids and names without dashes/dots (sd14, sd1.4, sdxl, ...)."""
    out = {}
    for stem, path in _available().items():
        cfg = yaml.safe_load(path.read_text())
        out[cfg.get("hub_id", stem).lower()] = stem
        out[stem.replace("-", "").replace(".", "")] = stem
        out[stem.replace("-", "")] = stem
    out["sdxl"] = "sdxl-base"
    out["sd3"] = "sd-3-medium"  # the family names, for the model people mean by them
    out["flux"] = "flux-1-dev"
    return out


MODEL_CONFIGS = tuple(_available())


def model_config(name: str | Path) -> dict:
    """The architecture config for a model name (``sd-1.4``, ``sd-2.1``, ``sdxl-base``, a hub id
    among those, or a path to such a YAML file)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return yaml.safe_load(path.read_text())
    available = _available()
    key = str(name).lower()
    stem = key if key in available else _aliases().get(key)
    if stem is None:
        close = difflib.get_close_matches(key, list(available) + list(_aliases()), n=3, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise UsageError(f"unknown model config {name!r}.{hint} Valid: {', '.join(available)}, a registered model ({', '.join(plugins.names(plugins.MODELS))}), or a path to a YAML file")
    return yaml.safe_load(available[stem].read_text())


def build_denoiser(name: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                   seed: int = 0):
    """The denoiser of a known architecture (a U-Net or an MMDiT transformer) with random weights.

    ``name``: a config of configs/models/ (see ``model_config``; its ``family`` decides the class and
    the config key, ``unet`` or ``transformer``) or a registered model name (``"toy"``: the bundled
    toy model's architecture, see ``common.plugins``). ``device="meta"`` gives the structure without
    allocating weights.
    """
    plugin = plugins.model_plugin(str(name))
    if plugin is not None and plugin.build_denoiser is not None:  # a registered model (e.g. toy, toy-mmdit)
        unet = plugin.build_denoiser(seed=seed)
        if dtype is not None:
            unet = unet.to(dtype=dtype)
        if device not in (None, "meta"):
            unet = unet.to(device)
        return unet.eval().requires_grad_(False)
    cfg = model_config(name)
    arch = families.for_family(cfg.get("family", ""))
    cls = arch.denoiser_cls()
    torch.manual_seed(seed)
    if str(device) == "meta":
        with torch.device("meta"):
            model = cls(**cfg[arch.denoiser])
    else:
        model = cls(**cfg[arch.denoiser])
        if dtype is not None:
            model = model.to(dtype=dtype)
        if device is not None:
            model = model.to(device)
    return model.eval().requires_grad_(False)


def build_unet(name: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, seed: int = 0):
    """A UNet2DConditionModel of a known architecture with random weights (``build_denoiser`` for
    U-Net models; an MMDiT model is a UsageError naming the U-Net models)."""
    if plugins.model_plugin(str(name)) is None:
        family = model_config(name).get("family", "")
        if family not in UNET_FAMILIES:
            unets = [n for n, p in _available().items() if yaml.safe_load(p.read_text()).get("family") in UNET_FAMILIES]
            raise UsageError(f"{name!r} is a {family} model without a U-Net (use build_denoiser); U-Net models: {', '.join(unets)}")
    return build_denoiser(name, device=device, dtype=dtype, seed=seed)


# --------------------------------------------------------------------------------------------
# tiny pipelines of each family, for tests and quick experiments

TINY_WORDS = (
    "a an the of on in with and photo painting drawing red green blue yellow black white big small "
    "cat dog horse bird car house tree flower sky sea mountain city person face unicorn circle square "
    "triangle star left right top bottom style sketch"
).split()


def tiny_tokenizer(max_length: int = 16, words=TINY_WORDS):
    """A word-level tokenizer built in memory (no files, no network), CLIP-style special tokens."""
    from activations.tokenizer import word_tokenizer

    return word_tokenizer(words, max_length)


def _tiny_text_encoder(hidden: int, vocab_size: int, max_length: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        vocab_size=vocab_size,
        projection_dim=hidden,
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def tiny_unet_config(family: str) -> dict:
    """A tiny U-Net config of ``family`` that keeps the family's structural quirks."""
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8)
    if family == "sd1":
        return {
            **common,
            "block_out_channels": (16, 32),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 2,  # heads, everywhere (SD 1.x naming)
            "cross_attention_dim": 32,
        }
    if family == "sd2":
        return {
            **common,
            "block_out_channels": (16, 32),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": (2, 4),  # heads per block
            "use_linear_projection": True,
            "upcast_attention": True,
            "cross_attention_dim": 32,
        }
    if family == "sdxl":
        return {
            **common,
            "block_out_channels": (16, 32, 32),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (2, 2, 4),
            "transformer_layers_per_block": (1, 1, 2),
            "use_linear_projection": True,
            "cross_attention_dim": 64,  # two 32-wide text encoders, concatenated
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
        }
    raise UsageError(f"unknown U-Net family {family!r}; valid families: {', '.join(UNET_FAMILIES)}")


def build_tiny_unet(family: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(family)).eval()


def _tiny_vae(seed: int, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        **extra,
    ).eval()


def _tiny_t5(width: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def build_tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A complete tiny pipeline of ``family`` with random weights (8x8 latents, 16x16 images).

    MMDiTs keep their text layout: SD3 = two CLIP encoders (16 tokens, 16 + 16 channels) then a T5
    (``max_sequence_length`` tokens, 256 by default); FLUX = a CLIP's pooled output and a T5's
    tokens (512 by default). Both VAEs carry ``shift_factor`` as SD3's and FLUX's do."""
    if family in MMDIT_FAMILIES:
        return _build_tiny_mmdit_pipeline(family, seed)
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = build_tiny_unet(family, seed)
    vae = _tiny_vae(seed + 1)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    max_length = 16
    tokenizer = tiny_tokenizer(max_length)
    torch.manual_seed(seed + 2)
    if family == "sdxl":
        text_encoder = _tiny_text_encoder(32, len(tokenizer), max_length)
        text_encoder_2 = _tiny_text_encoder(32, len(tokenizer), max_length, with_projection=True)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tiny_tokenizer(max_length),
            unet=unet,
            scheduler=scheduler,
        )
    else:
        text_encoder = _tiny_text_encoder(32, len(tokenizer), max_length)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_tiny_mmdit_pipeline(family: str, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    transformer = build_tiny_transformer(family, seed)
    vae = _tiny_vae(seed + 1, shift_factor=0.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0 if family == "sd3" else 1.0)
    max_length = 16
    torch.manual_seed(seed + 2)
    width = transformer.config.joint_attention_dim
    if family == "sd3":
        half = width // 2  # CLIP-L and CLIP-G's states are concatenated on channels, then padded to T5's width
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae,
            text_encoder=_tiny_text_encoder(half, len(tiny_tokenizer(max_length)), max_length, with_projection=True),
            tokenizer=tiny_tokenizer(max_length),
            text_encoder_2=_tiny_text_encoder(half, len(tiny_tokenizer(max_length)), max_length, with_projection=True),
            tokenizer_2=tiny_tokenizer(max_length),
            text_encoder_3=_tiny_t5(width, len(tiny_tokenizer(max_length))), tokenizer_3=tiny_tokenizer(512),
        )
    else:
        pipe = FluxPipeline(
            transformer=transformer, scheduler=scheduler, vae=vae,
            text_encoder=_tiny_text_encoder(transformer.config.pooled_projection_dim, len(tiny_tokenizer(max_length)), max_length),
            tokenizer=tiny_tokenizer(max_length),
            text_encoder_2=_tiny_t5(width, len(tiny_tokenizer(max_length))), tokenizer_2=tiny_tokenizer(512),
        )
        pipe.default_sample_size = 8  # FluxPipeline fixes 128 (1024 px); the tiny VAE makes 16 px images of 8 x 8 latents
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_transformer_config(family: str) -> dict:
    """A tiny MMDiT config of ``family`` (sd3, flux): 2 heads of dim 8, a 4 x 4 token grid, and the
    family's structural quirks (SD3: the last block ``context_pre_only``; FLUX: double then single
    blocks, guidance embedding)."""
    common = dict(num_attention_heads=2, attention_head_dim=8, joint_attention_dim=32, pooled_projection_dim=32)
    if family == "sd3":
        return {**common, "sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 3,
                "caption_projection_dim": 16, "pos_embed_max_size": 8}
    if family == "flux":
        # 4 latent channels packed 2 x 2 (FluxPipeline) -> 16 input channels; RoPE axes sum to the head dim
        return {**common, "patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 3,
                "guidance_embeds": True, "axes_dims_rope": (2, 2, 4)}
    raise UsageError(f"unknown MMDiT family {family!r}; valid families: {', '.join(MMDIT_FAMILIES)}")


def build_tiny_transformer(family: str = "sd3", seed: int = 0):
    """A tiny MMDiT denoiser of ``family`` (sd3, flux) with random weights, of the class its family declares."""
    torch.manual_seed(seed)
    return families.for_family(family).denoiser_cls()(**tiny_transformer_config(family)).eval()
