"""Inversion: a real image and its caption to the initial noise from which the pipeline draws it
again, so that every edit that runs during generation applies to a real picture.

The sampler is run backwards with the model's own predictions, each step approximating the
prediction at the next (noisier) point by the one at the current point:

* DDPM-trained U-Nets (``Architecture.objective.kind == "ddpm"``): DDIM inversion (Song et al.,
  2021; Mokady et al., 2023, Section 3) with ``diffusers.DDIMInverseScheduler`` built from the
  pipeline's scheduler config (so v-prediction, zero-terminal-SNR rescaling and trailing spacing
  carry over); the image is drawn again with ``DDIMScheduler`` (eta 0) on the mirrored timesteps,
  which ``Inversion.sampler`` names.
* Flow matching (SD3, FLUX): Euler inversion, x(σ_i) = x(σ_{i+1}) + (σ_i − σ_{i+1}) v(x(σ_{i+1}),
  σ_{i+1}), on the sigmas the pipeline's own Euler sampler uses; the pipeline's scheduler draws it
  again.

Plain inversion drifts under classifier-free guidance (Mokady et al.): invert and draw again with
the same guidance, 1 (no guidance) being the near-exact case; ``guidance`` is recorded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from activations.families import architecture_of, denoiser_of
from common.errors import UsageError


REFINE = 3  # fixed-point refinements per step by default: enough for every attribute of the toy renders
MAX_REFINE = 100  # refinements per step: 3 already reconstruct the toy renders; more is a typo, not a setting
NO_CLIP = {"clip_sample": False}  # DDIM's x0 clipping to [-1, 1] would cut latents, which leave that range


@dataclasses.dataclass
class Inversion:
    """The initial latents of inverted images and how to draw them again."""

    latents: torch.Tensor  # [b, c, h, w]: the noise the sampler starts from
    steps: int
    guidance: float
    sampler: str | None  # the diffusers scheduler class that draws them again (None: the pipeline's own)

    def sample(self, pipe, prompts, **kwargs):
        """Draw the inverted images again (with whatever is attached to the pipeline): the
        pipeline's output (``kwargs``: e.g. ``output_type``)."""
        from activations.pipeline import call_options

        original = pipe.scheduler
        arch, denoiser = architecture_of(pipe), denoiser_of(pipe)
        latents = self.latents.to(device=denoiser.device, dtype=denoiser.dtype)
        if arch.pipeline_latents is not None:
            latents = arch.pipeline_latents(pipe, latents)
        if self.sampler is not None:
            import diffusers

            from activations.hooks import current_tap

            pipe.scheduler = getattr(diffusers, self.sampler).from_config(original.config, **NO_CLIP)
            tap = current_tap(pipe)
            if tap is not None:  # it counts steps from the scheduler it hooked: this call starts a generation
                tap.reset()
        try:
            h, w = self.latents.shape[-2:]
            scale = int(getattr(pipe, "vae_scale_factor", 8))
            return pipe(prompt=list(prompts), num_inference_steps=self.steps, guidance_scale=self.guidance, latents=latents,
                        height=h * scale, width=w * scale, **{**call_options(pipe), **kwargs})
        finally:
            pipe.scheduler = original


def _predict(pipe, arch, x, t, cond, uncond, guidance: float):
    """The model's prediction at (x, t) as the pipeline's sampler combines it: guided by
    [uncond; cond] where the family batches guidance, else one call that embeds the scale. ``t``:
    a DDPM timestep (int) or a flow-matching one (float, sigma x 1000, as the pipeline passes it)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if isinstance(t, int) else torch.float32)
    out = arch.denoise(pipe, x, tt, cond, guidance)
    if uncond is not None and guidance > 1:
        free = arch.denoise(pipe, x, tt, uncond, guidance)
        out = free + guidance * (out - free)
    return out


@torch.no_grad()
def invert(pipe, pixels: list[np.ndarray], captions: list[str], steps: int, guidance: float = 1.0,
           refine: int = REFINE) -> Inversion:
    """The initial latents from which ``pipe`` draws ``pixels`` (uint8 [H, W, 3] each) with
    ``captions`` in ``steps`` steps at ``guidance``.

    Each backward step starts from the plain inversion step and is refined ``refine`` times by the
    fixed point of the sampler's own forward step (Pan et al., ICCV 2023, "Effective Real Image
    Editing with Accelerated Iterative Diffusion Inversion"): y <- y + (x - F(y)), F the sampler's
    step from y back to the current latent x, so that drawing again lands on x. 0 gives plain
    DDIM / Euler inversion (see docs/findings.md for the measured reconstruction)."""
    from activations.evaluate import vae_latents
    from activations.generate import scheduler_for
    from activations.text import encode_prompts

    if len(pixels) != len(captions) or not pixels:
        raise UsageError(f"invert: one caption per image, got {len(captions)} for {len(pixels)} images")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise UsageError(f"invert: refine must be a whole number >= 0, got {refine!r}")
    arch, denoiser = architecture_of(pipe), denoiser_of(pipe)
    x = torch.stack([torch.from_numpy(np.array(p)) for p in pixels]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    latents = vae_latents(pipe.vae, x.to(device=denoiser.device, dtype=pipe.vae.dtype)).to(denoiser.dtype)
    cond = encode_prompts(pipe, list(captions), full=True)
    uncond = encode_prompts(pipe, [""] * len(captions), full=True) if arch.batched_cfg and guidance > 1 else None
    kind = arch.objective(pipe.scheduler).kind

    def predict(y, t):
        return _predict(pipe, arch, y, t, cond, uncond, guidance)

    if kind == "ddpm":
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        # no clipping of the predicted x0 (DDIM's default clips it to [-1, 1], which latents leave)
        forward = DDIMScheduler.from_config(pipe.scheduler.config, **NO_CLIP)
        forward.set_timesteps(steps)
        inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config, **NO_CLIP)
        inverse.set_timesteps(steps)
        for t in inverse.timesteps.tolist():  # ascending: the forward timesteps mirrored
            y = inverse.step(predict(latents, t), t, latents).prev_sample
            for _ in range(refine):
                y = y + (latents - forward.step(predict(y, t), t, y).prev_sample)
            latents = y
        return Inversion(latents, steps, float(guidance), "DDIMScheduler")
    if kind == "flow":
        sched = scheduler_for(pipe, steps, tuple(latents.shape[-2:]))
        sigmas, timesteps = sched.sigmas.tolist(), sched.timesteps.tolist() + [0.0]  # descending, ending at 0
        for i in range(steps - 1, -1, -1):  # the Euler step sigma_i -> sigma_{i+1}, backwards
            y = latents + (sigmas[i] - sigmas[i + 1]) * predict(latents, timesteps[i + 1])
            for _ in range(refine):
                y = y + (latents - (y + (sigmas[i + 1] - sigmas[i]) * predict(y, timesteps[i])))
            latents = y
        return Inversion(latents, steps, float(guidance), None)
    raise UsageError(f"invert: no inversion for a {kind!r} objective; valid: ddpm, flow")


# -- inputs, files and the command ----------------------------------------------------------------

def image_size(pipe) -> tuple[int, int]:
    """(H, W): the pixels of the pipeline's images, the only size it inverts (its latents' size)."""
    from activations.sites import latent_size

    return tuple(x * int(getattr(pipe, "vae_scale_factor", 8)) for x in latent_size(pipe))


def check_size(pipe, pixels: np.ndarray, name: str, model: str) -> None:
    """Refuse an image (uint8 [H, W, 3]) of another size than the model's, naming both sizes."""
    size = image_size(pipe)
    if pixels.shape[:2] != size:
        raise UsageError(f"image {name} is {pixels.shape[1]} x {pixels.shape[0]} pixels; model {model!r} takes "
                         f"{size[1]} x {size[0]}")


def inversion_record(pipe, model: str, captions: list[str], images: list[str], refine: int) -> dict:
    """What ``save`` records beside the latents: the model and its weights' fingerprint (recipes
    refuse another model's inversion), the captions and where the images came from."""
    from activations.pipeline import model_fingerprint

    return {"model": model, "model_revision": model_fingerprint(denoiser_of(pipe)), "captions": list(captions),
            "images": list(images), "refine": refine}


LATENTS, RECORD = "inversion.safetensors", "inversion.json"


def save(inversion: Inversion, folder, record: dict) -> Path:
    """Write ``inversion`` to ``folder`` (latents and a JSON record with ``record``), each file
    atomically."""
    import json

    from safetensors.torch import save_file

    from common.files import write_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / LATENTS, lambda p: save_file({"latents": inversion.latents.float().cpu().contiguous()}, str(p)))
    meta = {**record, "steps": inversion.steps, "guidance": inversion.guidance, "sampler": inversion.sampler,
            "shape": list(inversion.latents.shape)}
    write_atomic(folder / RECORD, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return folder


def load(folder) -> tuple[Inversion, dict]:
    """An inversion written by ``save`` (``diffatlas invert``) and its record; a missing, truncated
    or inconsistent file is a UsageError naming it."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (LATENTS, RECORD):
        if not (folder / name).is_file():
            raise UsageError(f"{folder / name} does not exist: give a folder written by `diffatlas invert`")
    try:
        meta = json.loads((folder / RECORD).read_text())
        latents = load_file(str(folder / LATENTS))["latents"]
        fields = {k: meta[k] for k in ("steps", "guidance", "sampler", "shape", "model_revision", "captions")}
    except (json.JSONDecodeError, SafetensorError, KeyError, OSError) as e:
        raise UsageError(f"{folder}: not a readable inversion ({type(e).__name__}: {e}); invert the images again") from None
    if list(latents.shape) != fields["shape"]:
        raise UsageError(f"{folder / LATENTS} holds latents of shape {list(latents.shape)}, its record says {fields['shape']}")
    return Inversion(latents, int(fields["steps"]), float(fields["guidance"]), fields["sampler"]), meta


@dataclasses.dataclass
class InvertConfig:
    """Invert real images: the noise their model draws them again from, for steering them."""

    images: list[str] = dataclasses.field(default_factory=list)
    """image files (png, jpg, ...) of the model's image size"""
    captions: list[str] = dataclasses.field(default_factory=list)
    """one caption per image ("" for none)"""
    model: str = "toy"
    """'toy', a registered model, a local diffusers folder or a hub id"""
    steps: Optional[int] = None
    """sampling steps (None: the model's default)"""
    guidance: float = 1.0
    """guidance of the inversion and of every drawing from it (1: none, the near-exact case)"""
    refine: int = REFINE
    """fixed-point refinements per step (0: plain DDIM / Euler inversion)"""
    out: str = "outputs/invert"
    """folder for inversion.safetensors, inversion.json and reconstruction.png (a new or empty folder, or this run's)"""
    device: Optional[str] = None
    """torch device (default: CUDA when available)"""


def run(cfg: InvertConfig) -> Path:
    """Invert ``cfg.images``, write the inversion and a reconstruction grid (inputs over redrawn)."""
    from PIL import Image

    from activations.generate import check_prompts
    from activations.images import read_pixels
    from activations.pipeline import load_pipeline, model_defaults
    from common.config import MAX_STEPS, check_counts
    from common.files import claim_folder, out_folder
    from common.images import before_after_grid

    if not cfg.images:
        raise UsageError("--images is empty; give image files, e.g. --images '[a.png]'")
    if len(cfg.captions) != len(cfg.images):
        raise UsageError(f"--captions needs one caption per image: {len(cfg.images)} images, {len(cfg.captions)} captions")
    check_counts(cfg, positive=("steps",), numbers={"guidance": 0.0, "refine": 0.0}, at_most={"steps": MAX_STEPS, "refine": MAX_REFINE})
    check_prompts(cfg.model, [c for c in cfg.captions if c])
    out_folder(cfg.out)
    pixels = [read_pixels(path, path) for path in cfg.images]
    pipe = load_pipeline(cfg.model, device=cfg.device)
    pipe.set_progress_bar_config(disable=True)
    for path, p in zip(cfg.images, pixels):
        check_size(pipe, p, path, cfg.model)
    steps = cfg.steps if cfg.steps is not None else model_defaults(pipe)["num_inference_steps"]
    record = inversion_record(pipe, cfg.model, cfg.captions, [str(Path(p).resolve()) for p in cfg.images], cfg.refine)
    claim_folder(cfg.out, {**record, "steps": steps, "guidance": cfg.guidance}, name="invert_args.json")
    inversion = invert(pipe, pixels, list(cfg.captions), steps, cfg.guidance, refine=int(cfg.refine))
    folder = save(inversion, cfg.out, record)
    redrawn = inversion.sample(pipe, cfg.captions).images
    grid = before_after_grid([Image.fromarray(p) for p in pixels], redrawn, scale=4 if pixels[0].shape[0] <= 128 else 1)
    grid.save(folder / "reconstruction.png")
    return folder


def main(argv: list[str] | None = None) -> int:
    from common.config import parse

    cfg = parse(InvertConfig, argv, "diffatlas invert", InvertConfig.__doc__)
    folder = run(cfg)
    print(f"inverted {len(cfg.images)} images: {folder / LATENTS}; redrawn beside the inputs in {folder / 'reconstruction.png'}")
    print(f"steer them with a recipe that sets  inversion: {folder}")
    return 0
