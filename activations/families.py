"""Model families: the one place that knows how each kind of denoiser is laid out.

An ``Architecture`` says, for one kind of denoiser, its attribute on a diffusers pipeline and its
key in a model YAML (``unet`` or ``transformer``), its diffusers class, which ``family:`` values of
``configs/models/*.yaml`` it serves, what its head sites are, and how to walk its blocks in forward
order (``Architecture.blocks`` -> ``Block``). ``activations.sites`` turns blocks into ``Site``s the
same way for every architecture; no client asks which class a denoiser is.

==========  ==========================  ===========================================================
name        denoiser (families)         blocks, in forward order
==========  ==========================  ===========================================================
unet        ``UNet2DConditionModel``    every ``Transformer2DModel`` of the down, mid and up
            (sd1, sd2, sdxl)            blocks; head sites: their ``transformer_blocks.N.attn2``
sd3         ``SD3Transformer2DModel``   ``transformer_blocks.{i}`` (``JointTransformerBlock``);
            (sd3)                       head site ``.attn``, text stream ``.context``
flux        ``FluxTransformer2DModel``  ``transformer_blocks.{i}`` (double stream), then
            (flux)                      ``single_transformer_blocks.{j}`` (one stream over the
                                        text and image tokens); head site ``.attn`` of each
==========  ==========================  ===========================================================

MMDiT token grids: SD3 patchifies the latent with ``patch_size`` (2): a 128 x 128 latent is a
64 x 64 token grid. FLUX's transformer has ``patch_size`` 1, but ``FluxPipeline`` packs 2 x 2
latent cells into one token (``_pack_latents``; 16 channels x 4 = ``in_channels`` 64) before the
transformer sees them, so its grid is the latent halved too. FLUX's config has no sample size; its
default latent is ``FluxPipeline.default_sample_size`` (128, i.e. 1024 px).

Text layout (``Architecture.text_segments``, read through ``activations.text.text_layout``, where
every client finds a word): a U-Net reads one tokenizer's tokens (SDXL's two encoders share the
positions); SD3 reads ``[CLIP tokens (tokenizer_max_length), T5 tokens (max_sequence_length)]``;
FLUX reads T5 tokens only (``tokenizer_2``; its CLIP tokenizer feeds the pooled vector).

The text stream: an MMDiT block's text-token output is a site (``<block>.context``) where a later
block reads it. SD3's last block is ``context_pre_only`` (it returns no text at all); FLUX's single
blocks update the text tokens together with the image tokens (one residual over the concatenated
sequence), and the model reads them in the next single block, except after the last one, whose
text output ``FluxTransformer2DModel`` drops (only image tokens reach ``norm_out``): it gets no
context site, since nothing written there could reach the image.

Training view (``activations.evaluate``): ``Architecture.objective`` is the loss a family was trained
with, built from the pipeline's scheduler: the U-Nets' DDPM noising with an epsilon / v / sample
target, the MMDiTs' flow matching (Esser et al., 2024: sigma = t / num_train_timesteps,
x_t = (1 - sigma) x0 + sigma noise, target noise - x0). ``Architecture.denoise`` is one conditional
denoiser call as the family's pipeline makes it (SDXL's pooled text and size ids, SD3's pooled
projections, FLUX's packed latents, token ids, timestep / 1000 and guidance embedding), in and out
in the latent layout [b, c, H, W]; it reads the pipeline's own ``encode_prompt`` tuple
(``activations.text.encode_prompts(..., full=True)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from common.errors import UsageError


# -- training objectives: scheduler -> (x0, noise, t) -> (x_t, target) ------------------------
# (the function returned carries ``max_timestep``, the largest timestep it noises to, and ``kind``:
# "ddpm" or "flow", which says how activations.invert runs its sampler backwards)


def ddpm_objective(scheduler) -> Callable:
    """DDPM noising (the U-Nets' training): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, target after
    the scheduler's ``prediction_type`` (epsilon, v_prediction, sample). The schedule is the
    training-time one of ``scheduler``'s config: samplers such as DPM-Solver keep no
    ``get_velocity``, and their ``add_noise`` follows their inference steps."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler.config)
    kind = getattr(sched.config, "prediction_type", "epsilon")
    valid = ("epsilon", "v_prediction", "sample")
    if kind not in valid:
        raise UsageError(f"unknown prediction_type {kind!r} in the scheduler config; valid: {', '.join(valid)}")

    def noised(x0, noise, t):
        x_t = sched.add_noise(x0, noise, t)
        if kind == "epsilon":
            return x_t, noise
        return x_t, (sched.get_velocity(x0, noise, t) if kind == "v_prediction" else x0)

    noised.max_timestep = int(sched.config.num_train_timesteps) - 1  # DDPM's alphas are indexed 0 .. N - 1
    noised.kind = "ddpm"  # how an image is inverted to its noise (activations.invert)
    return noised


def flow_matching_objective(scheduler) -> Callable:
    """Rectified flow (Esser et al., 2024; SD3, FLUX): sigma = t / num_train_timesteps,
    x_t = (1 - sigma) x0 + sigma noise, target (velocity) noise - x0; what
    ``FlowMatchEulerDiscreteScheduler.scale_noise`` does at the timestep t = sigma x 1000."""
    n_train = float(scheduler.config.get("num_train_timesteps", 1000))

    def noised(x0, noise, t):
        sigma = (t.double() / n_train).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - sigma) * x0 + sigma * noise, noise - x0

    noised.max_timestep = int(n_train)  # sigma = 1, pure noise: where every flow-matching schedule starts
    noised.kind = "flow"
    return noised


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of a denoiser, as sites see it.

    ``attentions``: (module path, attention module) of the heads that read the text, in forward
    order. ``context``: the name of the block's text-stream site, None where it has none;
    ``text_tokens``: that site's length.
    """

    name: str
    resolution: tuple[int, int]
    width: int
    attentions: tuple[tuple[str, object], ...]
    context: str | None = None
    text_tokens: int = 0
    single_stream: bool = False  # its attention reads the text and image tokens already joined (FLUX's single blocks)


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    denoiser: str  # the pipeline attribute and the model-YAML key: "unet" | "transformer"
    denoiser_class: str  # the diffusers class name
    families: tuple[str, ...]  # the ``family:`` values of configs/models/*.yaml it serves
    attention: str  # what its head modules are, for tables: "cross-attention" | "joint attention"
    walk: Callable  # (denoiser, latent (H, W), text_tokens | None) -> list[Block]
    default_latent: Callable  # denoiser -> latent (H, W) when the run does not say
    default_text_tokens: int = 0  # text length of the pipeline's default call (0: no text stream)
    text_segments: Callable | None = None  # (pipeline, max_sequence_length) -> the text's segments,
    #   [(tokenizer attribute or None, length)] in sequence order: whose tokens sit where in the text the
    #   denoiser reads (None: tokens that carry no words, e.g. SD3's zeros where it has no T5)
    latent_multiple: Callable = lambda denoiser: 1  # denoiser -> what every latent side must be a multiple of
    direct_head_write: bool = True  # a block's heads write into its Δ through fixed weights (U-Net: to_out, proj_out);
    #                                  an MMDiT block gates them by the timestep (AdaLN), so only attribution patching applies
    text_first: bool = False  # the joint sequence puts the text tokens before the image tokens (FLUX), not after (SD3)
    text_stream: bool = False  # the text is a stream that every block changes (MMDiT), not one fixed input (U-Net)
    schedule_args: Callable | None = None  # (scheduler, steps, image tokens) -> the pipeline's extra set_timesteps arguments
    # how ``activations.hooks`` drives it (no hook asks which class a denoiser is):
    processor: str = "cross"  # the head processor: "cross" (processor.HeadProcessor) | "joint" (joint_processor)
    blocks_io: str = "map"  # block sites' I/O: "map" (a Transformer2DModel: [b, c, h, w] in, .sample / [0] out)
    #                         | "streams" (an MMDiT block: image tokens hidden_states and text tokens
    #                           encoder_hidden_states in, (text, image) out)
    timestep_scale: float = 1.0  # the denoiser's ``timestep`` argument x this = the scheduler's timestep
    batched_cfg: bool = True  # guidance batches [uncond; cond] into one call when the pipeline guides
    latent_of: Callable | None = None  # the denoiser call's bound arguments -> latent (H, W) or None
    # the training view (activations.evaluate):
    objective: Callable = ddpm_objective  # the pipeline's scheduler -> (x0, noise, t) -> (x_t, target)
    pipeline_latents: Callable | None = None  # (pipeline, latents [b, c, H, W]) -> its call's ``latents=``
    #                                            argument (None: the same tensor; FLUX packs 2 x 2 cells per token)
    denoise: Callable | None = None  # (pipeline, x_t [b, c, H, W], t [b] in scheduler units, the
    #                                   pipeline's encode_prompt tuple, guidance) -> prediction [b, c, H, W]

    def blocks(self, denoiser, latent_size=None, text_tokens: int | None = None) -> list[Block]:
        latent = self.default_latent(denoiser) if latent_size is None else pair(latent_size)
        return self.walk(denoiser, latent, text_tokens or self.default_text_tokens)

    def denoiser_cls(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class)


def pair(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


# -- U-Nets -----------------------------------------------------------------------------------


def unet_levels(unet, latent: tuple[int, int]) -> list[tuple[str, object, tuple[int, int]]]:
    """(prefix, block, resolution) for down blocks, mid block and up blocks, in forward order.

    ``named_modules()`` lists ``up_blocks`` before ``mid_block`` (diffusers registers them in that
    order), so the order is built explicitly here."""
    h, w = latent
    out, down_sizes = [], []
    for k, block in enumerate(unet.down_blocks):
        down_sizes.append((h, w))
        out.append((f"down_blocks.{k}", block, (h, w)))
        if getattr(block, "downsamplers", None):
            h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 conv with padding 1 rounds up
    if unet.mid_block is not None:
        out.append(("mid_block", unet.mid_block, (h, w)))
    # up block k works at the resolution of the mirrored down block (skip connections match)
    n = len(unet.up_blocks)
    for k, block in enumerate(unet.up_blocks):
        out.append((f"up_blocks.{k}", block, down_sizes[n - 1 - k] if n == len(down_sizes) else (h, w)))
    return out


def num_downsamplings(unet) -> int:
    return sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def _unet_latent(arguments) -> tuple[int, int] | None:
    sample = arguments.get("sample")
    return None if sample is None else tuple(sample.shape[-2:])


def _unet_denoise(pipe, x_t, t, cond, guidance):
    # encode_prompt: SD 1.x / 2.x (embeds, negative); SDXL (embeds, negative, pooled, negative pooled)
    unet = pipe.unet
    kwargs = {}
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and size ids
        pooled = cond[2].to(device=x_t.device, dtype=x_t.dtype)
        size = (x_t.shape[-2] * pipe.vae_scale_factor, x_t.shape[-1] * pipe.vae_scale_factor)
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=x_t.dtype, text_encoder_projection_dim=int(pooled.shape[-1]))
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids.to(x_t.device).repeat(x_t.shape[0], 1)}
    return unet(x_t, t, encoder_hidden_states=cond[0].to(device=x_t.device, dtype=x_t.dtype), **kwargs).sample


def _unet_blocks(unet, latent, text_tokens) -> list[Block]:
    blocks = []
    for prefix, level, res in unet_levels(unet, latent):
        for a, transformer in enumerate(getattr(level, "attentions", None) or []):
            name = f"{prefix}.attentions.{a}"
            attns = tuple(
                (f"{name}.transformer_blocks.{b}.attn2", tblock.attn2)
                for b, tblock in enumerate(getattr(transformer, "transformer_blocks", None) or [])
                if getattr(tblock, "attn2", None) is not None
            )
            width = transformer.config.in_channels if hasattr(transformer, "config") else attns[0][1].to_q.out_features
            blocks.append(Block(name, res, int(width), attns))
    return blocks


# -- MMDiTs -----------------------------------------------------------------------------------


def _grid(latent, patch: int) -> tuple[int, int]:
    return latent[0] // patch, latent[1] // patch


def _sd3_blocks(model, latent, text_tokens) -> list[Block]:
    grid, width = _grid(latent, model.config.patch_size), model.inner_dim
    # attn2 of SD3.5-medium's dual-attention blocks attends over image tokens only: not a head site
    return [
        Block(f"transformer_blocks.{i}", grid, width, ((f"transformer_blocks.{i}.attn", block.attn),),
              None if block.context_pre_only else f"transformer_blocks.{i}.context", text_tokens)
        for i, block in enumerate(model.transformer_blocks)
    ]


def _sd3_latent(arguments) -> tuple[int, int] | None:
    x = arguments.get("hidden_states")  # the latent itself, [b, c, H, W]: the model patchifies it
    return None if x is None else tuple(x.shape[-2:])


def _sd3_denoise(pipe, x_t, t, cond, guidance):
    # encode_prompt: (embeds, negative, pooled, negative pooled); the model patchifies the latent itself
    embeds, _, pooled, _ = cond
    return pipe.transformer(hidden_states=x_t, timestep=t.float(), encoder_hidden_states=embeds.to(device=x_t.device, dtype=x_t.dtype),
                            pooled_projections=pooled.to(device=x_t.device, dtype=x_t.dtype), return_dict=False)[0]


FLUX_PACKING = 2  # FluxPipeline._pack_latents: 2 x 2 latent cells per token
FLUX_TIMESTEP_SCALE = 1000.0  # FluxPipeline passes timestep / 1000; the model multiplies by 1000 inside


def _flux_denoise(pipe, x_t, t, cond, guidance):
    # encode_prompt: (embeds, pooled, text ids); FluxPipeline packs the latent, gives every token its
    # (0, row, col) id and, for a guidance-distilled model (FLUX.1-dev), embeds the guidance scale
    import torch

    embeds, pooled, text_ids = cond
    b, c, h, w = x_t.shape
    model, scale = pipe.transformer, pipe.vae_scale_factor
    packed = pipe._pack_latents(x_t, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // FLUX_PACKING, w // FLUX_PACKING, x_t.device, x_t.dtype)
    g = torch.full((b,), float(guidance), device=x_t.device, dtype=torch.float32) if model.config.get("guidance_embeds") else None
    out = model(hidden_states=packed, timestep=t.float() / FLUX_TIMESTEP_SCALE, guidance=g,
                pooled_projections=pooled.to(device=x_t.device, dtype=x_t.dtype),
                encoder_hidden_states=embeds.to(device=x_t.device, dtype=x_t.dtype),
                txt_ids=text_ids.to(device=x_t.device, dtype=x_t.dtype), img_ids=img_ids, return_dict=False)[0]
    return pipe._unpack_latents(out, h * scale, w * scale, scale)


def _flux_blocks(model, latent, text_tokens) -> list[Block]:
    grid, width = _grid(latent, FLUX_PACKING * model.config.patch_size), model.inner_dim
    out = [
        Block(f"transformer_blocks.{i}", grid, width, ((f"transformer_blocks.{i}.attn", block.attn),),
              f"transformer_blocks.{i}.context", text_tokens)
        for i, block in enumerate(model.transformer_blocks)
    ]
    last = len(model.single_transformer_blocks) - 1
    out += [
        Block(f"single_transformer_blocks.{j}", grid, width, ((f"single_transformer_blocks.{j}.attn", block.attn),),
              f"single_transformer_blocks.{j}.context" if j < last else None, text_tokens, single_stream=True)
        for j, block in enumerate(model.single_transformer_blocks)
    ]
    return out


def _flux_latent(arguments) -> tuple[int, int] | None:
    # the packed tokens carry no grid; FluxPipeline's img_ids hold each token's (0, row, col)
    ids = arguments.get("img_ids")
    if ids is None:
        return None
    ids = ids.reshape(-1, ids.shape[-1])
    rows, cols = int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1
    return rows * FLUX_PACKING, cols * FLUX_PACKING


def _sd3_text(pipe, n: int) -> list:
    # CLIP-L and CLIP-G side by side on channels (the same positions), then n T5 tokens: zeros when
    # the pipeline has no T5 (StableDiffusion3Pipeline._get_t5_prompt_embeds)
    t5 = "tokenizer_3" if getattr(pipe, "text_encoder_3", None) is not None else None
    return [("tokenizer", int(pipe.tokenizer_max_length)), (t5, int(n))]


def _shift(scheduler, tokens: int, max_shift: float, module: str) -> float:
    # the resolution-dependent shift mu of Esser et al. (2024), as the pipeline computes it
    import importlib

    calculate_shift = importlib.import_module(f"diffusers.pipelines.{module}").calculate_shift
    cfg = scheduler.config
    return calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", max_shift))


def _sd3_schedule(scheduler, steps: int, tokens: int) -> dict:
    # StableDiffusion3Pipeline: the scheduler's own sigmas; mu only where it shifts dynamically
    if scheduler.config.get("use_dynamic_shifting", None):
        return {"mu": _shift(scheduler, tokens, 1.16, "stable_diffusion_3.pipeline_stable_diffusion_3")}
    return {}


def _flux_schedule(scheduler, steps: int, tokens: int) -> dict:
    # FluxPipeline: sigmas linspace(1, 1/steps) (none where the scheduler makes flow sigmas itself), and mu
    import numpy as np

    sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
    return {"sigmas": sigmas, "mu": _shift(scheduler, tokens, 1.15, "flux.pipeline_flux")}


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        # every U-Net level halves the latent, and the skip connections only match when each halving is exact
        Architecture("unet", "unet", "UNet2DConditionModel", ("sd1", "sd2", "sdxl"), "cross-attention", _unet_blocks,
                     lambda unet: pair(unet.config.sample_size), latent_of=_unet_latent,
                     # the padded prompt (SDXL: its two encoders' states side by side, the same positions)
                     text_segments=lambda pipe, n: [("tokenizer", int(pipe.tokenizer.model_max_length))],
                     latent_multiple=lambda unet: 2 ** num_downsamplings(unet), denoise=_unet_denoise),
        # StableDiffusion3Pipeline: 77 CLIP tokens + 256 T5 tokens (max_sequence_length) by default
        Architecture("sd3", "transformer", "SD3Transformer2DModel", ("sd3",), "joint attention", _sd3_blocks,
                     lambda model: pair(model.config.sample_size), default_text_tokens=77 + 256,
                     text_segments=_sd3_text,
                     latent_multiple=lambda model: model.config.patch_size, schedule_args=_sd3_schedule,
                     processor="joint", blocks_io="streams", text_stream=True, direct_head_write=False, latent_of=_sd3_latent,
                     objective=flow_matching_objective, denoise=_sd3_denoise),
        # FluxPipeline: 512 T5 tokens (max_sequence_length) by default; default_sample_size 128; it
        # calls the transformer with timestep / 1000 (the model multiplies by 1000 inside) and, FLUX.1
        # being guidance-distilled, with no uncond half in the batch
        Architecture("flux", "transformer", "FluxTransformer2DModel", ("flux",), "joint attention", _flux_blocks,
                     lambda model: (128, 128), default_text_tokens=512,
                     text_segments=lambda pipe, n: [("tokenizer_2", n)],  # T5 tokens only; CLIP gives the pooled vector
                     latent_multiple=lambda model: FLUX_PACKING * model.config.patch_size, schedule_args=_flux_schedule,
                     processor="joint", blocks_io="streams", text_stream=True, direct_head_write=False, text_first=True,
                     timestep_scale=FLUX_TIMESTEP_SCALE,
                     batched_cfg=False, latent_of=_flux_latent, objective=flow_matching_objective, denoise=_flux_denoise,
                     pipeline_latents=lambda pipe, x: pipe._pack_latents(x, *x.shape)),
    )
}

FAMILIES: dict[str, Architecture] = {f: a for a in ARCHITECTURES.values() for f in a.families}


def for_family(family: str) -> Architecture:
    """The architecture of a ``family:`` value (sd1, sd2, sdxl, sd3, flux)."""
    if family not in FAMILIES:
        raise UsageError(f"unknown model family {family!r}; valid families: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _match(obj) -> Architecture | None:
    names = {cls.__name__ for cls in type(obj).__mro__}
    return next((a for a in ARCHITECTURES.values() if a.denoiser_class in names), None)


def architecture_of(model) -> Architecture:
    """The architecture of a denoiser or of a pipeline that holds one."""
    return _match(denoiser_of(model))


def denoiser_of(model):
    """The denoiser of a pipeline (its ``unet`` or ``transformer``), or ``model`` itself if it is one.

    Anything else is a UsageError naming its class and the denoisers known."""
    if _match(model) is not None:
        return model
    for arch in ARCHITECTURES.values():
        inner = getattr(model, arch.denoiser, None)
        if inner is not None and _match(inner) is not None:
            return inner
    known = ", ".join(f"{a.denoiser_class} ({a.name})" for a in ARCHITECTURES.values())
    raise UsageError(f"{type(model).__name__} is neither a known denoiser nor a pipeline holding one; known denoisers: {known}")
