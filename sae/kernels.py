"""Sparse encoder/decoder kernels that make TopK-style SAEs cost O(batch * k * d) in the backward pass.

A dense autograd graph through ``topk`` scatters the gradient back into a [batch, num_latents]
matrix and then pays two dense matmuls (for W_enc and for the input). Only the selected entries
carry gradient, so we compute the pre-activations once without a graph, pick the entries, and
re-attach gradient to just those entries with a custom autograd function. The decoder is an
``embedding_bag`` (a gather of k decoder rows weighted by the activations), as suggested by
Gao et al. 2024 (Sec. 5 / App. D: sparse kernels for TopK autoencoders).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _GatherPreActs(torch.autograd.Function):
    """values[r] = x[rows[r]] . W[cols[r]] + b[cols[r]], with sparse gradients.

    Shapes: x [n, d]; weight [m, d]; bias [m]; rows, cols [nnz] and offsets [n] (int64); values [nnz].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rows, cols, offsets, values):
        # values were computed by the caller from the dense, graph-free pre-activations.
        ctx.save_for_backward(x, weight, rows, cols, offsets)
        ctx.num_latents = weight.shape[0]
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, weight, rows, cols, offsets = ctx.saved_tensors
        n, d = x.shape
        m = ctx.num_latents
        grad_values = grad_values.to(weight.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # grad_x[row] = sum over the row's entries of g * W[col]: a weighted bag of encoder rows.
            grad_x = F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=grad_values).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # grad_W[col] += g * x[row] as one sparse [m, n] @ dense [n, d] product.
            sparse = torch.sparse_coo_tensor(
                torch.stack([cols, rows]), grad_values, (m, n), dtype=weight.dtype, device=weight.device,
                check_invariants=False,
            )
            grad_w = torch.sparse.mm(sparse, x.to(weight.dtype))
        if ctx.needs_input_grad[2]:
            grad_b = weight.new_zeros(m).index_add_(0, cols, grad_values)
        return grad_x, grad_w, grad_b, None, None, None, None


def gather_pre_acts(
    x: Tensor, weight: Tensor, bias: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor, values: Tensor
) -> Tensor:
    """Attach sparse gradients to pre-activation values picked at (rows, cols).

    Entries are grouped by token: ``rows`` is non-decreasing and ``offsets`` [n] gives where each
    token's entries start. ``values`` must equal ``(x @ weight.T + bias)[rows, cols]``, computed
    without a graph.
    """
    return _GatherPreActs.apply(x, weight, bias, rows, cols, offsets, values)


def sparse_decode(values: Tensor, indices: Tensor, w_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """sum_j values[., j] * w_dec[indices[., j]] per token, without a dense latent matrix.

    values, indices: [n, k] (then ``offsets`` is None) or flat [nnz] with ``offsets`` [n] marking
    where each token's entries start. w_dec: [m, d]. Returns [n, d].
    """
    return F.embedding_bag(indices, w_dec, offsets=offsets, mode="sum", per_sample_weights=values.to(w_dec.dtype))
