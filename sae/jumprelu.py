"""JumpReLU SAE (Rajamanoharan et al. 2024): f_i = pre_i * H(pre_i - theta_i), L0 penalty.

The step function H has zero gradient almost everywhere, so the thresholds are trained with the
paper's straight-through estimators, using a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps:
  d/dtheta JumpReLU(z) = -(theta/eps) K((z - theta)/eps)      d/dz JumpReLU(z) = H(z - theta)
  d/dtheta H(z - theta) = -(1/eps) K((z - theta)/eps)         d/dz H(z - theta) = 0
Loss: mse + l0_coefficient * sum_i H(pre_i - theta_i). ``threshold`` [m] is saved with the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.latents import Latents
from sae.registry import register_architecture
from sae.sparse_coder import SparseCoder, TrainContext, TrainOutput


def _rect(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = (-(theta / eps) * _rect((z - theta) / eps) * grad).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = (-(1.0 / eps) * _rect((z - theta) / eps) * grad).sum(0)
        return torch.zeros_like(z), grad_theta, None


@register_architecture("jumprelu")
class JumpReLUSAE(SparseCoder):
    """Dense JumpReLU codes with a learned per-latent threshold."""

    def __init__(self, cfg, d_in, *, device=None, dtype=torch.float32):
        super().__init__(cfg, d_in, device=device, dtype=dtype)
        self.threshold = nn.Parameter(torch.full((self.num_latents,), cfg.jumprelu_threshold_init,
                                                 device=device, dtype=dtype))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Latents:
        pre = self.pre_acts(x)
        return Latents(self.num_latents, dense=F.relu(pre) * (pre > self.threshold).to(pre.dtype))

    def train_step(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        eps = self.cfg.jumprelu_bandwidth
        pre = F.relu(self.pre_acts(x))  # [n, m]
        acts = _JumpReLU.apply(pre, self.threshold, eps)
        recon = acts @ self.W_dec + self.b_dec
        l0 = _Step.apply(pre, self.threshold, eps).sum(-1).mean()
        losses = {"mse": self._mse(x, recon), "l0": self.cfg.l0_coefficient * l0}
        return TrainOutput(recon=recon, latents=Latents(self.num_latents, dense=acts.detach()), losses=losses)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        # A negative threshold would make every latent fire; keep it at least 0.
        self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def _fold_thresholds(self, scale: float) -> None:
        self.threshold.div_(scale)
