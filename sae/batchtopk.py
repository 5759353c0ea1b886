"""BatchTopK SAE (Bussmann et al. 2024): keep the k * batch largest ReLU pre-activations of the batch.

Training selects over the *global* batch: under DDP every rank sends its own top (k * global batch)
candidate values to the others (one all_gather), all ranks take the same global cut-off t (the
(k * global batch)-th largest value) and keep their local entries >= t. The result is exactly the
single-process selection over the concatenated batch (ties at t aside). Cost: k * B_global floats
per rank per step.

Inference uses a fixed threshold theta (before the first training step, which sets it, per-token TopK) (saved as ``threshold`` in sae.safetensors): f = pre * 1[pre > theta].
During training theta is an exponential moving average (``threshold_momentum``) of the smallest
selected positive activation of each batch (used by validation); at the end of training
``calibrate`` replaces it by the average of that minimum over fresh batches with the final weights,
which is Bussmann et al.'s estimate (an EMA lags behind the weights on short runs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from sae.latents import Latents
from sae.registry import register_architecture
from sae.sparse_coder import SparseCoder, TrainContext, TrainOutput


def _flat_layout(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """rows, cols [nnz] (row-major) and offsets [n] of the True entries of mask [n, m]."""
    rows, cols = mask.nonzero(as_tuple=True)
    counts = mask.sum(-1)
    offsets = torch.cumsum(counts, 0) - counts
    return rows, cols, offsets


def _global_cutoff(acts: Tensor, budget: int, group) -> Tensor:
    """Value of the budget-th largest entry of acts over all ranks (scalar tensor)."""
    flat = acts.reshape(-1)
    local = flat.topk(min(budget, flat.numel()), sorted=False).values
    if group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        world = dist.get_world_size(group)
        # Ranks may hold different batch sizes: pad every candidate list to the same length.
        size = torch.tensor([local.numel()], device=acts.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        longest = int(max(s.item() for s in sizes))
        padded = torch.full((longest,), float("-inf"), device=acts.device, dtype=acts.dtype)
        padded[: local.numel()] = local
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        local = torch.cat(gathered)
    return local.topk(min(budget, local.numel()), sorted=False).values.min()


@register_architecture("batchtopk")
class BatchTopKSAE(SparseCoder):
    """f = ReLU(pre) restricted to the batch's top k*B entries; inference: pre * 1[pre > threshold]."""

    def __init__(self, cfg, d_in, *, device=None, dtype=torch.float32):
        super().__init__(cfg, d_in, device=device, dtype=dtype)
        # -1 marks "not estimated yet"; the first training batch sets it.
        self.register_buffer("threshold", torch.tensor(-1.0, device=device, dtype=dtype))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Latents:
        acts = F.relu(self.pre_acts(x))
        if float(self.threshold) < 0:
            # Not trained yet (e.g. Lightning's sanity validation): per-token TopK stands in.
            mask = torch.zeros_like(acts, dtype=torch.bool).scatter_(1, acts.topk(self.cfg.k, dim=-1).indices, True)
            mask &= acts > 0
        else:
            mask = acts > self.threshold
        rows, cols, offsets = _flat_layout(mask)
        return Latents(self.num_latents, values=acts[rows, cols], indices=cols, offsets=offsets)

    def train_step(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        n = x.shape[0]
        with torch.no_grad():
            # graph-free pre-activations; the sparse kernels re-attach gradient to the picks only
            x_c = x.to(self.dtype) - self.b_dec
            pre = F.linear(x_c, self.encoder.weight, self.encoder.bias)
            acts = F.relu(pre)
            group = ctx.process_group
            world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
            cutoff = _global_cutoff(acts, self.cfg.k * n * world, group)
            # Only positive activations count: a cut-off of 0 would select every inactive latent.
            mask = (acts >= cutoff) & (acts > 0)
            rows, cols, offsets = _flat_layout(mask)
            if cutoff > 0:
                m = self.cfg.threshold_momentum
                new = cutoff.to(self.threshold.dtype)
                self.threshold.copy_(new if self.threshold < 0 else m * self.threshold + (1 - m) * new)
        return self._sparse_train_output(x, x_c, pre, rows, cols, offsets, ctx)

    @torch.no_grad()
    def calibrate(self, x: Tensor, batch_size: int) -> None:
        """Set the inference threshold to the mean batch cut-off over batches of ``x`` [n, d]
        (normalised inputs) of ``batch_size`` rows, with the current weights (Bussmann et al. 2024)."""
        cutoffs = []
        for lo in range(0, x.shape[0] - batch_size + 1, batch_size):
            acts = F.relu(self.pre_acts(x[lo : lo + batch_size]))
            cutoff = _global_cutoff(acts, self.cfg.k * batch_size, None)
            if cutoff > 0:
                cutoffs.append(float(cutoff))
        if cutoffs:
            self.threshold.fill_(sum(cutoffs) / len(cutoffs))

    @torch.no_grad()
    def _fold_thresholds(self, scale: float) -> None:
        if self.threshold >= 0:
            self.threshold.div_(scale)
