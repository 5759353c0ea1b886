"""TopK SAE (Gao et al. 2024): keep the k largest ReLU pre-activations of each token; AuxK for dead latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.kernels import row_layout, row_topk
from sae.latents import Latents
from sae.registry import register_architecture
from sae.sparse_coder import SparseCoder, TrainContext, TrainOutput


@register_architecture("topk")
class TopKSAE(SparseCoder):
    """f = TopK_k(ReLU(pre)). Loss: mse + auxk. Exactly k entries per token (zeros count as inactive)."""

    @torch.no_grad()
    def encode(self, x: Tensor) -> Latents:
        vals, idx = row_topk(self.pre_acts(x), self.cfg.k)
        n = vals.shape[0]
        _, offsets = row_layout(n, self.cfg.k, vals.device)
        return Latents(self.num_latents, values=F.relu(vals).reshape(-1), indices=idx.reshape(-1), offsets=offsets)

    def train_step(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        n, k = x.shape[0], self.cfg.k
        with torch.no_grad():
            # Dense pre-activations without a graph; gradient is re-attached to the k picks only
            # (Gao et al. 2024, App. D).
            x_c = x.to(self.dtype) - self.b_dec
            pre = F.linear(x_c, self.encoder.weight, self.encoder.bias)
            # TopK before ReLU selects the same positive entries as TopK(ReLU(.)) without a dense
            # ReLU pass; slots whose value is not positive become zeros either way. Its values are
            # the picked pre-activations, so no [n, m] gather is needed afterwards.
            vals, idx = pre.topk(k, dim=-1, sorted=False)
        rows, offsets = row_layout(n, k, x.device)
        return self._sparse_train_output(x, x_c, pre, rows, idx.reshape(-1), offsets, ctx, values=vals.reshape(-1))
