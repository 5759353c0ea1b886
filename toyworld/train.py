"""Train the bundled toy model from scratch: the VAE, a refinement of its decoder, then the text
encoder and U-Net.

    python -m toyworld.train --config configs/toyworld/train.yaml

Every stage is a Lightning fit on scenes drawn from the world's prior. The U-Net stage trains on
VAE latents computed once, with a freshly written caption for every sample (word order varies;
each attribute phrase left out with probability ``drop_prob``, some captions short; a held-out
object description is never named in full: toyworld.prompts.draw_named), 10% empty prompts for
classifier-free guidance, v-prediction on a zero-terminal-SNR schedule (Lin et al., 2024; see
toyworld.model.build_scheduler), token grounding of the cross-attention maps on the world's object
masks (toyworld/grounding.py; TokenCompose, Wang et al., 2024), the text encoder at a fraction of
the U-Net's learning rate (UNetStage.text_lr_scale) and an exponential moving average of the
weights, which is what gets saved. The result is a diffusers folder in float16.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from common.errors import UsageError
from toyworld.grounding import grounding_loss, object_masks, record_cross_attention, token_owners
from toyworld.model import ToyModelConfig, build_pipeline, build_vae
from toyworld.prompts import DROP_PROB, SHORT_PROB, draw_named, scene_to_prompt
from toyworld.render import render
from toyworld.scene import Scene, sample_scene


@dataclass
class VAEStage:
    steps: int = 2500
    """Optimiser steps for the VAE."""
    batch_size: int = 16
    """Images per step."""
    lr: float = 1.5e-3
    """Adam learning rate (cosine decay to 10%)."""
    kl_weight: float = 1e-6
    """Weight of the KL term: tiny, as in SD's VAE, so the latent stays near-deterministic."""
    object_weight: float = 5.0
    """Reconstruction weight of object pixels relative to background ones (objects cover ~10% of
    an image; without it the VAE learns the background first and objects late)."""
    decoder_steps: int = 3000
    """Second phase: steps that refine the decoder alone, on posterior means, with the encoder
    frozen. The latents the U-Net learns do not change, so this phase can run beside the U-Net."""
    decoder_lr: float = 6e-4
    """Adam learning rate of the decoder phase (cosine decay to 10%)."""
    edge_weight: float = 0.0
    """Weight of a gradient-difference loss (L1 between the horizontal and vertical pixel
    differences of reconstruction and image; Mathieu et al., 2016) in the decoder phase: pixel
    losses alone round the corners of small shapes, which then read as circles."""


@dataclass
class DenoiserStage:
    """What the text-encoder + denoiser stage of any toy model (U-Net or MMDiT) is trained with."""

    steps: int = 3500
    """Optimiser steps for text encoder + denoiser."""
    batch_size: int = 64
    """Latents per step."""
    lr: float = 6e-4
    """AdamW peak learning rate, after a linear warm-up, then cosine decay to 10%."""
    text_lr_scale: float = 0.1
    """The text encoders' learning rate relative to ``lr``. At the full rate the U-Net model's
    learned, within the first 1,000 steps (before the U-Net could use position words), to give
    "left" and "right" outputs 0.4 apart (token norm 11), and the model then drew left-right
    mirror images."""
    warmup_steps: int = 200
    """Linear warm-up steps."""
    num_scenes: int = 20000
    """Distinct training scenes whose latents are computed once (prompts are re-written per sample)."""
    two_object_prob: float = 0.5
    """Share of two-object scenes."""
    uncond_prob: float = 0.1
    """Share of empty prompts, for classifier-free guidance."""
    drop_prob: float = DROP_PROB
    """Each attribute phrase of a caption is left out with this probability, independently, so the
    noise decides what the caption leaves unsaid (toyworld.prompts.draw_named; 0 names everything,
    as the v1 model was trained)."""
    short_prob: float = SHORT_PROB
    """Share of one-object captions that are short: one or two attributes ("striped", "a red
    circle", "at night")."""
    ema_decay: float = 0.999
    """EMA decay of the weights that get saved."""
    export_every: int = 500
    """Write the EMA pipeline to ``out`` every this many steps, so an interrupted run keeps a model."""
    max_minutes: float | None = None
    """Stop the stage after this many minutes even if ``steps`` are not done (None: no limit)."""
    grounding_weight: float = 0.0
    """Weight of the token-grounding loss on the attention maps of the text (toyworld/grounding.py,
    TokenCompose's L_token): a U-Net's cross-attention, an MMDiT's image-query x text-key slice of
    its joint attention; 0 trains on the denoising loss alone."""
    init_from: str | None = None
    """Warm start: a toy pipeline folder of the same kind (e.g. toyworld/weights) whose text
    encoder(s) and denoiser this stage continues from, instead of random weights (the VAE must be
    the one it was trained with)."""

    def check(self, prefix: str) -> None:
        """Refuse caption rates that are not probabilities (NaN included) and counts or weights out
        of range (0 steps, a negative or infinite learning rate or grounding weight), naming the
        option, before any work."""
        from types import SimpleNamespace

        from common.config import check_counts

        for name in ("two_object_prob", "uncond_prob", "drop_prob", "short_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:  # NaN fails too
                raise UsageError(f"{prefix}.{name} must be a probability in [0, 1], got {value}")
        names = {name: f"{prefix}.{name}" for name in ("steps", "batch_size", "num_scenes", "warmup_steps", "export_every",
                                                       "lr", "text_lr_scale", "ema_decay", "grounding_weight", "max_minutes")}
        check_counts(SimpleNamespace(**{prefix: self}), positive=(names["steps"], names["batch_size"], names["num_scenes"]),
                     non_negative=(names["warmup_steps"], names["export_every"]),
                     numbers={names[n]: 0 for n in ("lr", "text_lr_scale", "ema_decay", "grounding_weight", "max_minutes")},
                     at_most={names["ema_decay"]: 1})


@dataclass
class UNetStage(DenoiserStage):
    min_snr_gamma: float = 5.0
    """γ of min-SNR loss weighting (Hang et al., 2023); ε-prediction schedules only (the bundled
    model predicts v, unweighted)."""


@dataclass
class TrainConfig:
    out: str = "toyworld/weights"
    """Where the diffusers pipeline folder is written."""
    work_dir: str = "outputs/toyworld_train"
    """Scratch folder: Lightning logs, the VAE checkpoint, cached latents."""
    seed: int = 0
    """Seed for scenes, prompts, weights and noise."""
    threads: int = 0
    """torch threads (0: leave torch's default)."""
    stage: str = "all"
    """'all' (vae, decoder, unet in turn), or one of them: 'vae', 'decoder' (needs the VAE),
    'unet' (needs the VAE; exports with the refined decoder once it exists)."""
    vae_from: str | None = None
    """Take the VAE (encoder and refined decoder) from this toy pipeline folder instead of training
    one: the VAE stages are skipped and the exported pipeline carries it unchanged."""
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    """Architecture of the model."""
    vae: VAEStage = field(default_factory=VAEStage)
    """VAE stage."""
    unet: UNetStage = field(default_factory=UNetStage)
    """Text encoder + U-Net stage."""
    guidance_scale: float = 4.0
    """Guidance recorded with the model as its default (see toyworld/weights/diffatlas.json)."""


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1], the range SD's VAE works in."""
    return rearrange(torch.from_numpy(image).float() / 127.5 - 1.0, "h w c -> c h w")


def to_images(decoded: torch.Tensor) -> np.ndarray:
    """The inverse of ``to_tensor`` for a batch: float [b, 3, H, W] in [-1, 1] (a VAE decode) ->
    uint8 [b, H, W, 3], what the pixel oracle reads."""
    pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return rearrange(pixels, "b c h w -> b h w c").cpu().numpy()


class SceneImages(IterableDataset):
    """An endless stream of rendered training scenes: (image [3, H, W], object mask [1, H, W])."""

    def __init__(self, seed: int):
        self.seed = seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            rendered = render(sample_scene(rng))
            yield to_tensor(rendered.image), torch.from_numpy(rendered.masks.any(axis=0))[None].float()


STAGES = ("all", "vae", "decoder", "unet")


def cosine_lr(step: int, total: int, warmup: int = 0) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class LitVAE(L.LightningModule):
    """Phase 1 trains the whole VAE; phase 2 (``decoder_only``) sharpens the decoder on the
    posterior means, which are exactly the latents the U-Net is trained on."""

    def __init__(self, vae, stage: VAEStage, decoder_only: bool = False):
        super().__init__()
        self.vae, self.stage, self.decoder_only = vae, stage, decoder_only
        if decoder_only:
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)

    def training_step(self, batch, _):
        images, objects = batch
        with torch.set_grad_enabled(not self.decoder_only):
            posterior = self.vae.encode(images).latent_dist
        recon = self.vae.decode(posterior.mean if self.decoder_only else posterior.sample()).sample
        weight = 1.0 + (self.stage.object_weight - 1.0) * objects
        l1 = F.l1_loss(recon, images)
        mse = F.mse_loss(recon, images)
        kl = posterior.kl().mean()
        weighted = (weight * ((recon - images).abs() + (recon - images) ** 2)).mean() / weight.mean()
        loss = weighted + self.stage.kl_weight * kl
        if self.decoder_only and self.stage.edge_weight:
            edges = sum(F.l1_loss(torch.diff(recon, dim=d), torch.diff(images, dim=d)) for d in (-1, -2))
            loss = loss + self.stage.edge_weight * edges
            self.log("vae/edges", edges, prog_bar=True)
        self.log_dict({"vae/l1": l1, "vae/mse": mse, "vae/kl": kl}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.vae.parameters() if p.requires_grad]
        lr, steps = (self.stage.decoder_lr, self.stage.decoder_steps) if self.decoder_only else (self.stage.lr, self.stage.steps)
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 50))
        return [opt], [{"scheduler": sched, "interval": "step"}]


class LatentPrompts(IterableDataset):
    """Endless (latent, prompt, token owners, object masks) samples: cached latents and masks, a new
    prompt for every draw (see toyworld/grounding.py for owners and masks)."""

    def __init__(self, latents: torch.Tensor, masks: torch.Tensor, scenes: list[Scene], seed: int,
                 stage: DenoiserStage, num_tokens: int):
        self.latents, self.masks, self.scenes = latents, masks, scenes
        self.seed, self.stage, self.num_tokens = seed, stage, num_tokens

    def __iter__(self):
        rng = np.random.default_rng(self.seed + 1)
        while True:
            k = int(rng.integers(len(self.scenes)))
            scene = self.scenes[k]
            if rng.random() < self.stage.uncond_prob:
                prompt = ""
            else:
                named = draw_named(scene, rng, self.stage.drop_prob, self.stage.short_prob)
                prompt = scene_to_prompt(scene, rng, named)
            yield self.latents[k], prompt, token_owners(prompt, self.num_tokens), self.masks[k]


class LitDenoiser(L.LightningModule):
    """What training any toy denoiser shares: ``denoiser`` (attribute name -> module) learns at
    ``stage.lr``, ``text`` (the text encoders) at ``stage.lr * stage.text_lr_scale``, both after a
    linear warm-up then cosine decay, and ``self.ema`` keeps an exponential moving average of all of
    them under the same names (what gets exported)."""

    def __init__(self, stage: DenoiserStage, denoiser: dict[str, torch.nn.Module], text: dict[str, torch.nn.Module]):
        super().__init__()
        self.stage = stage
        self._denoiser_names, self._text_names = list(denoiser), list(text)
        for name, module in {**denoiser, **text}.items():
            setattr(self, name, module)
        self.ema = copy.deepcopy(torch.nn.ModuleDict({**denoiser, **text}))
        self.ema.requires_grad_(False)
        self._recording = contextlib.ExitStack()
        self.attention_maps: list[torch.Tensor] | None = None

    def on_fit_start(self):
        if self.stage.grounding_weight:
            denoiser = getattr(self, self._denoiser_names[0])
            self.attention_maps = self._recording.enter_context(record_cross_attention(denoiser))

    def on_fit_end(self):
        self._recording.close()  # the denoiser gets diffusers' processors back
        self.attention_maps = None

    def forward_denoiser(self, *args, **kwargs):
        """The denoiser's prediction, its text attention maps recorded afresh when grounding."""
        if self.attention_maps is not None:
            self.attention_maps.clear()
        return getattr(self, self._denoiser_names[0])(*args, **kwargs).sample

    def grounded(self, loss: torch.Tensor, owners: torch.Tensor, masks: torch.Tensor, logs: dict, prefix: str) -> torch.Tensor:
        """``loss`` plus ``grounding_weight`` x the token-grounding loss of the last forward pass
        (logged as ``<prefix>/grounding``); ``loss`` itself when not grounding."""
        if self.attention_maps is None:
            return loss
        logs[f"{prefix}/grounding"] = grounding_loss(self.attention_maps, owners, masks)
        return loss + self.stage.grounding_weight * logs[f"{prefix}/grounding"]

    def on_train_batch_end(self, *_):
        decay = min(self.stage.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            for name in (*self._denoiser_names, *self._text_names):
                for ema_p, p in zip(self.ema[name].parameters(), getattr(self, name).parameters()):
                    ema_p.lerp_(p, 1 - decay)

    def configure_optimizers(self):
        def params(names):
            return [p for name in names for p in getattr(self, name).parameters()]

        groups = [{"params": params(self._denoiser_names), "lr": self.stage.lr},
                  {"params": params(self._text_names), "lr": self.stage.lr * self.stage.text_lr_scale}]
        opt = torch.optim.AdamW(groups, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_lr(s, self.stage.steps, self.stage.warmup_steps)
        )
        return [opt], [{"scheduler": sched, "interval": "step"}]


class LitToyDiffusion(LitDenoiser):
    def __init__(self, pipe, stage: UNetStage):
        super().__init__(stage, {"unet": pipe.unet}, {"text_encoder": pipe.text_encoder})
        self.tokenizer = pipe.tokenizer
        from diffusers import DDPMScheduler

        self.noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        alphas = self.noise_schedule.alphas_cumprod
        self.register_buffer("snr", alphas / (1 - alphas), persistent=False)

    def training_step(self, batch, _):
        latents, prompts, owners, masks = batch
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt").input_ids
        text = self.text_encoder(ids.to(self.device))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (len(latents),), device=self.device)
        noisy = self.noise_schedule.add_noise(latents, noise, t)
        pred = self.forward_denoiser(noisy, t, text)
        if self.noise_schedule.config.prediction_type == "v_prediction":
            # unweighted v-loss, as SD 2.x: at zero terminal SNR min-SNR-γ's weight min(SNR, γ)/(SNR + 1)
            # would vanish at exactly the noisiest steps, where the layout is decided
            target, weight = self.noise_schedule.get_velocity(latents, noise, t), torch.ones_like(self.snr[t])
        else:
            # min-SNR-γ weighting for ε-prediction: w(t) = min(SNR(t), γ) / SNR(t)   (Hang et al., 2023)
            snr = self.snr[t]
            target, weight = noise, torch.clamp(snr, max=self.stage.min_snr_gamma) / snr
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        logs = {"unet/loss": loss, "unet/mse": per_sample.mean()}
        loss = self.grounded(loss, owners, masks, logs, "unet")
        self.log_dict(logs, prog_bar=True)
        return loss


class StepLog(L.Callback):
    """One plain line per ``every`` steps (logs are files here, not terminals)."""

    def __init__(self, every: int = 50):
        self.every, self.started = every, time.time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0:
            metrics = " ".join(f"{k}={float(v):.4f}" for k, v in trainer.callback_metrics.items())
            rate = step / max(1e-9, time.time() - self.started)
            print(f"step {step}/{trainer.max_steps} {rate:.2f} steps/s {metrics}", flush=True)


class ExportEMA(L.Callback):
    """Write the EMA weights as a diffusers folder every ``every`` steps and at the end."""

    def __init__(self, export, every: int):
        self.export, self.every = export, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0:
            self.export(module)

    def on_train_end(self, trainer, module):
        self.export(module)


def _trainer(steps: int, work_dir: Path, name: str, max_minutes: float | None = None,
             callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        max_time={"minutes": max_minutes} if max_minutes else None,
        callbacks=[StepLog(), *(callbacks or [])],
        enable_progress_bar=False,
        accelerator="auto",
        devices=1,
        precision="32-true",
        gradient_clip_val=1.0,
        logger=L.pytorch.loggers.CSVLogger(work_dir, name=name),
        enable_checkpointing=False,
        log_every_n_steps=25,
    )


@torch.no_grad()
def encode_scenes(vae, scenes: list[Scene], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """From one render per scene: the posterior means, [n, latent_channels, g, g] (unscaled), and
    the objects' coverage of the same latent grid, [n, 2, g, g] (toyworld.grounding.object_masks)."""
    latents, masks = [], []
    for start in tqdm(range(0, len(scenes), batch_size), desc="encode latents and masks", unit="batch"):
        renders = [render(s) for s in scenes[start : start + batch_size]]
        latent = vae.encode(torch.stack([to_tensor(r.image) for r in renders])).latent_dist.mean
        latents.append(latent)
        masks += [object_masks(r, latent.shape[-1]) for r in renders]
    return torch.cat(latents), torch.stack(masks)


def training_latents(vae, seed: int, stage: DenoiserStage, work_dir: Path) -> tuple[list[Scene], torch.Tensor, torch.Tensor]:
    """The stage's fixed training scenes (``stage.num_scenes`` drawn with ``seed``) with their VAE
    posterior means (unscaled) and object masks, cached in ``work_dir`` (see ``encode_scenes``)."""
    rng = np.random.default_rng(seed + 2)
    scenes = [sample_scene(rng, two_object_prob=stage.two_object_prob) for _ in range(stage.num_scenes)]
    # the cache is keyed by what draws the scenes, so a run with another seed never reuses them
    key = f"s{seed}_p{stage.two_object_prob:g}_{stage.num_scenes}"
    latents_path, masks_path = work_dir / f"latents_{key}.pt", work_dir / f"masks_{key}.pt"
    if latents_path.exists() and masks_path.exists():
        latents, masks = torch.load(latents_path), torch.load(masks_path)
    else:
        latents, masks = encode_scenes(vae, scenes)
        torch.save(masks, masks_path)
        torch.save(latents, latents_path)
    return scenes, latents, masks


def latent_scaling(latents: torch.Tensor) -> float:
    """SD's convention: the factor that scales the training latents to unit variance (stored in
    the VAE config as ``scaling_factor``)."""
    return float(1.0 / latents.flatten().std())


def save_pipeline(pipe, out: Path, meta: dict) -> None:
    """Save ``pipe`` in float16 as a standard diffusers folder with ``meta`` as its diffatlas.json,
    written aside and then swapped in, so ``out`` always holds a whole model."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    (tmp / "diffatlas.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def train(cfg: TrainConfig) -> Path:
    """Run both stages and write the float16 diffusers folder to ``cfg.out``."""
    if cfg.stage not in STAGES:
        raise UsageError(f"unknown stage {cfg.stage!r}; valid stages: {', '.join(STAGES)}")
    cfg.unet.check("unet")
    if cfg.vae_from and not (Path(cfg.vae_from) / "vae" / "config.json").exists():
        raise FileNotFoundError(f"vae_from {cfg.vae_from!r} holds no VAE (no vae/config.json); "
                                "give a toy pipeline folder such as toyworld/weights")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    from diffusers import AutoencoderKL

    # Stage 1: the VAE (skipped when a finished one is in the work dir, or taken from ``vae_from``).
    vae_path, decoder_path = work_dir / "vae", work_dir / "vae_decoder"
    if cfg.vae_from:
        if cfg.stage in ("vae", "decoder"):
            raise UsageError(f"stage {cfg.stage!r} trains a VAE, but vae_from={cfg.vae_from!r} takes one; "
                             "drop one of them")
        vae = AutoencoderKL.from_pretrained(Path(cfg.vae_from) / "vae", torch_dtype=torch.float32)
        vae.save_pretrained(decoder_path)  # encoder and refined decoder in one: what export ships
    elif (vae_path / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(vae_path)
    elif cfg.stage in ("decoder", "unet"):
        raise FileNotFoundError(f"stage {cfg.stage!r} needs a trained VAE in {vae_path}; run stage 'vae' or 'all' first")
    else:
        L.seed_everything(cfg.seed)
        lit_vae = LitVAE(build_vae(cfg.model), cfg.vae)
        loader = DataLoader(SceneImages(cfg.seed), batch_size=cfg.vae.batch_size)
        _trainer(cfg.vae.steps, work_dir, "vae").fit(lit_vae, loader)
        vae = lit_vae.vae
        vae.save_pretrained(vae_path)
    if cfg.stage == "vae":
        return vae_path

    # Stage 2: sharpen the decoder on the frozen encoder's means (the U-Net's latents stay the same).
    if cfg.stage in ("all", "decoder") and cfg.vae.decoder_steps and not (decoder_path / "config.json").exists() \
            and not cfg.vae_from:
        L.seed_everything(cfg.seed + 1)
        lit_vae = LitVAE(copy.deepcopy(vae), cfg.vae, decoder_only=True)
        loader = DataLoader(SceneImages(cfg.seed + 1), batch_size=cfg.vae.batch_size)
        _trainer(cfg.vae.decoder_steps, work_dir, "vae_decoder").fit(lit_vae, loader)
        lit_vae.vae.save_pretrained(decoder_path)
    if cfg.stage == "decoder":
        return decoder_path
    vae.eval().requires_grad_(False)

    # Stage 3: latents and object masks of fixed training scenes, then text encoder + U-Net.
    L.seed_everything(cfg.seed)
    scenes, latents, masks = training_latents(vae, cfg.seed, cfg.unet, work_dir)
    scaling_factor = latent_scaling(latents)
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor

    pipe = build_pipeline(cfg.model, seed=cfg.seed, vae=vae)
    if cfg.unet.init_from:
        from diffusers import DiffusionPipeline

        start = DiffusionPipeline.from_pretrained(cfg.unet.init_from, dtype=torch.float32)
        pipe.unet.load_state_dict(start.unet.state_dict())
        pipe.text_encoder.load_state_dict(start.text_encoder.state_dict())
    lit = LitToyDiffusion(pipe, cfg.unet)
    out = Path(cfg.out)

    def export(module: LitToyDiffusion) -> None:
        """Save the EMA weights in float16 as a standard diffusers folder (written aside, then swapped in)."""
        # the refined decoder when stage 2 has finished (its encoder is the frozen one of stage 1)
        final_vae = AutoencoderKL.from_pretrained(decoder_path) if (decoder_path / "config.json").exists() else copy.deepcopy(vae)
        final_vae.register_to_config(scaling_factor=scaling_factor)
        snapshot = build_pipeline(cfg.model, seed=cfg.seed, vae=final_vae)
        snapshot.unet.load_state_dict(module.ema["unet"].state_dict())
        snapshot.text_encoder.load_state_dict(module.ema["text_encoder"].state_dict())
        meta = {
            "name": "toy",
            "guidance_scale": cfg.guidance_scale,
            "num_inference_steps": 25,
            "train_steps": module.global_step,
            "train_seconds": round(time.time() - started, 1),
            "train_config": asdict(cfg),
        }
        save_pipeline(snapshot, out, meta)
        print(f"wrote the toy pipeline ({module.global_step} steps, {meta['train_seconds']:.0f} s) to {out}", flush=True)

    num_tokens = pipe.tokenizer.model_max_length
    loader = DataLoader(LatentPrompts(latents, masks, scenes, cfg.seed, cfg.unet, num_tokens),
                        batch_size=cfg.unet.batch_size)
    trainer = _trainer(cfg.unet.steps, work_dir, "unet", cfg.unet.max_minutes,
                       [ExportEMA(export, cfg.unet.export_every)])
    trainer.fit(lit, loader)
    return out


def run_cli(config: type, run, prog: str, description: str, argv: list[str] | None = None) -> int:
    """Parse ``argv`` (and any ``--config`` YAML) into ``config`` and ``run`` it; bad input is one
    line, ``<prog>: error: <message>``, exit code 2."""
    import sys

    from common.config import parse
    from common.errors import is_user_error, one_line

    try:
        run(parse(config, argv, prog, description))
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(TrainConfig, train, "python -m toyworld.train", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
