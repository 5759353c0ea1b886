"""Train the toy MMDiT (toyworld/model_mmdit.py): two CLIP text encoders and an SD3 transformer
around the bundled toy VAE, which stays frozen.

    python -m toyworld.train_mmdit --config configs/toyworld/train_mmdit.yaml

The twin of toyworld.train's U-Net stage, and built from its parts: VAE latents of fixed scenes
computed once, a freshly written caption for every sample (toyworld.train.LatentPrompts: word
order varies, attribute phrases left out, short captions, empty prompts for classifier-free
guidance), the text encoders at a fraction of the transformer's learning rate, cosine decay after
a warm-up, an exponential moving average of the weights (what gets saved) and a float16 export
every ``export_every`` steps. The objective is SD3's rectified flow (Esser et al., 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"): x_t = (1 - σ) x0 + σ ε,
the transformer predicts v = ε - x0 at timestep 1000 σ, with σ drawn logit-normal (then shifted
as the sampler's schedule is, see ToyMMDiTConfig.shift). The text it trains on is exactly what
``StableDiffusion3Pipeline.encode_prompt(..., max_sequence_length=0)`` gives: the toy MMDiT is
always called with ``max_sequence_length=0`` (recorded in its diffatlas.json's ``call``). The
result is a StableDiffusion3Pipeline folder in float16.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common.errors import UsageError
from toyworld.model_mmdit import CALL, ToyMMDiTConfig, build_mmdit_pipeline, encode_text, load_mmdit_pipeline
from toyworld.train import (DenoiserStage, ExportEMA, LatentPrompts, LitDenoiser, _trainer, latent_scaling, run_cli,
                            save_pipeline, training_latents)


@dataclass
class MMDiTStage(DenoiserStage):
    logit_mean: float = 0.0
    """Mean m of the logit-normal σ density (SD3's rf/lognorm(0.00, 1.00), its best sampler of
    σ): logit(σ) ~ N(m, s²). 0 centres training on σ = 0.5, the middle steps, which are the
    hardest to predict (the ends are near-trivial: v ≈ ε - mean at σ ≈ 1, v ≈ ε - x_t at σ ≈ 0)."""
    logit_std: float = 1.0
    """Std s of the logit-normal σ density."""


@dataclass
class MMDiTTrainConfig:
    out: str = "toyworld/weights_mmdit"
    """Where the StableDiffusion3Pipeline folder is written."""
    work_dir: str = "outputs/toyworld_train_mmdit"
    """Scratch folder: Lightning logs, cached latents."""
    seed: int = 0
    """Seed for scenes, prompts, weights and noise."""
    threads: int = 0
    """torch threads (0: leave torch's default)."""
    vae_from: str = "toyworld/weights"
    """The toy pipeline folder whose VAE this model uses, frozen, and ships unchanged (its latent
    scale is recomputed on the training latents, as toyworld.train does)."""
    model: ToyMMDiTConfig = field(default_factory=ToyMMDiTConfig)
    """Architecture of the model."""
    mmdit: MMDiTStage = field(default_factory=MMDiTStage)
    """Text encoders + transformer stage."""
    guidance_scale: float = 4.0
    """Guidance recorded with the model as its default (diffatlas.json)."""
    num_inference_steps: int = 25
    """Sampling steps recorded with the model as its default (diffatlas.json)."""


def sample_sigmas(n: int, stage: MMDiTStage, shift: float = 1.0, device=None) -> torch.Tensor:
    """σ of ``n`` training samples: logit-normal (``stage.logit_mean``, ``stage.logit_std``), then
    shifted as FlowMatchEulerDiscreteScheduler shifts its schedule, σ' = s σ / (1 + (s - 1) σ)."""
    sigmas = torch.sigmoid(stage.logit_mean + stage.logit_std * torch.randn(n, device=device))
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, target v, timestep) of rectified flow at noise levels ``sigmas`` [b]: x_t = (1 - σ) x0
    + σ ε (FlowMatchEulerDiscreteScheduler.scale_noise), v = dx_t/dσ = ε - x0 (what its Euler
    ``step`` integrates), and timestep = 1000 σ (what StableDiffusion3Pipeline gives the
    transformer)."""
    s = sigmas.view(-1, *([1] * (latents.dim() - 1)))
    return (1 - s) * latents + s * noise, noise - latents, sigmas * 1000


class LitToyMMDiT(LitDenoiser):
    def __init__(self, pipe, stage: MMDiTStage, shift: float = 1.0):
        super().__init__(stage, {"transformer": pipe.transformer},
                         {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2})
        self.tokenizer, self.tokenizer_2, self.shift = pipe.tokenizer, pipe.tokenizer_2, shift

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tokens and pooled embedding of ``prompts``, as the pipeline encodes them."""
        return encode_text(self, prompts)

    def training_step(self, batch, _):
        latents, prompts, owners, masks = batch
        text, pooled = self.encode(list(prompts))
        noise = torch.randn_like(latents)
        sigmas = sample_sigmas(len(latents), self.stage, self.shift, device=self.device)
        noisy, target, timestep = flow_match(latents, noise, sigmas)
        pred = self.forward_denoiser(hidden_states=noisy, encoder_hidden_states=text, pooled_projections=pooled,
                                     timestep=timestep)
        loss = F.mse_loss(pred, target)  # unweighted: the logit-normal density is the weighting (SD3)
        logs = {"mmdit/loss": loss}
        # the text is exactly the 40 CLIP tokens (max_sequence_length=0), so owners index its token axis
        loss = self.grounded(loss, owners, masks, logs, "mmdit")
        self.log_dict(logs, prog_bar=True)
        return loss


def check(cfg: MMDiTTrainConfig) -> None:
    cfg.mmdit.check("mmdit")
    if not (Path(cfg.vae_from) / "vae" / "config.json").exists():
        raise FileNotFoundError(f"vae_from {cfg.vae_from!r} holds no VAE (no vae/config.json); "
                                "give a toy pipeline folder such as toyworld/weights")
    if cfg.mmdit.init_from and not (Path(cfg.mmdit.init_from) / "transformer" / "config.json").exists():
        raise FileNotFoundError(f"init_from {cfg.mmdit.init_from!r} holds no MMDiT (no transformer/config.json); "
                                "give a toy MMDiT folder such as toyworld/weights_mmdit")


def train(cfg: MMDiTTrainConfig) -> Path:
    """Train text encoders + transformer and write the float16 StableDiffusion3Pipeline folder to ``cfg.out``."""
    check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(cfg.vae_from) / "vae", torch_dtype=torch.float32)
    if vae.config.latent_channels != cfg.model.latent_channels:
        raise UsageError(f"model.latent_channels is {cfg.model.latent_channels}, but the VAE of {cfg.vae_from} "
                         f"has {vae.config.latent_channels}")
    vae.eval().requires_grad_(False)
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    L.seed_everything(cfg.seed)
    scenes, latents, masks = training_latents(vae, cfg.seed, cfg.mmdit, work_dir)
    vae.register_to_config(scaling_factor=latent_scaling(latents), shift_factor=0.0)
    # SD3's convention: x0 = (latent - shift_factor) * scaling_factor (the pipeline decodes x0 / scale + shift)
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor

    pipe = build_mmdit_pipeline(cfg.model, seed=cfg.seed, vae=vae)
    if cfg.mmdit.init_from:
        start = load_mmdit_pipeline(cfg.mmdit.init_from, torch_dtype=torch.float32)
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            getattr(pipe, name).load_state_dict(getattr(start, name).state_dict())
        del start
    lit = LitToyMMDiT(pipe, cfg.mmdit, cfg.model.shift)
    out = Path(cfg.out)

    def export(module: LitToyMMDiT) -> None:
        """Save the EMA weights in float16 as a StableDiffusion3Pipeline folder."""
        with torch.random.fork_rng():  # building reseeds torch; training's noise must not restart
            snapshot = build_mmdit_pipeline(cfg.model, seed=cfg.seed, vae=copy.deepcopy(vae))
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            getattr(snapshot, name).load_state_dict(module.ema[name].state_dict())
        meta = {
            "name": "toy-mmdit",
            "guidance_scale": cfg.guidance_scale,
            "num_inference_steps": cfg.num_inference_steps,
            "call": dict(CALL),
            "train_steps": module.global_step,
            "train_seconds": round(time.time() - started, 1),
            "train_config": asdict(cfg),
        }
        save_pipeline(snapshot, out, meta)
        print(f"wrote the toy MMDiT ({module.global_step} steps, {meta['train_seconds']:.0f} s) to {out}", flush=True)

    loader = DataLoader(LatentPrompts(latents, masks, scenes, cfg.seed, cfg.mmdit, pipe.tokenizer.model_max_length),
                        batch_size=cfg.mmdit.batch_size)
    trainer = _trainer(cfg.mmdit.steps, work_dir, "mmdit", cfg.mmdit.max_minutes,
                       [ExportEMA(export, cfg.mmdit.export_every)])
    trainer.fit(lit, loader)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(MMDiTTrainConfig, train, "python -m toyworld.train_mmdit", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
