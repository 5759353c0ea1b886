"""ReLU SAE with an L1 penalty (Bricken et al. 2023, with Anthropic's April 2024 training update).

f = ReLU(pre). Loss: mse + lambda(t) * sum_i f_i * ||W_dec,i||. Weighting the penalty by decoder row
norms makes it invariant to trading latent scale for decoder scale; with unit-norm rows (the
default) it is the plain L1. lambda ramps linearly from 0 over ``l1_warmup_fraction`` of training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.latents import Latents
from sae.registry import register_architecture
from sae.sparse_coder import SparseCoder, TrainContext, TrainOutput


@register_architecture("relu")
class ReLUSAE(SparseCoder):
    """Dense ReLU codes; sparsity comes from the L1 penalty."""

    @torch.no_grad()
    def encode(self, x: Tensor) -> Latents:
        return Latents(self.num_latents, dense=F.relu(self.pre_acts(x)))

    def l1_coefficient(self, progress: float) -> float:
        warm = self.cfg.l1_warmup_fraction
        return self.cfg.l1_coefficient * (min(1.0, progress / warm) if warm > 0 else 1.0)

    def train_step(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        acts = F.relu(self.pre_acts(x))  # [n, m]
        recon = acts @ self.W_dec + self.b_dec
        dec_norms = self.W_dec.norm(dim=-1)  # [m]
        l1 = (acts * dec_norms).sum(-1).mean()
        losses = {"mse": self._mse(x, recon), "l1": self.l1_coefficient(ctx.progress) * l1}
        return TrainOutput(recon=recon, latents=Latents(self.num_latents, dense=acts.detach()), losses=losses)
