"""Sparse encoder/decoder kernels that make TopK-style SAEs cost O(batch * k * d) in the backward pass.

A dense autograd graph through ``topk`` scatters the gradient back into a [batch, num_latents]
matrix and then pays two dense matmuls (for W_enc and for the input). Only the selected entries
carry gradient, so we compute the pre-activations once without a graph, pick the entries, and
re-attach gradient to just those entries with custom autograd functions. The decoder is an
``embedding_bag`` (a gather of k decoder rows weighted by the activations), as suggested by
Gao et al. 2024 (Sec. 5 / App. D: sparse kernels for TopK autoencoders).

Both weight gradients have the same shape of work: grad_W[col] += value * dense[row] over the
selected entries, i.e. a sparse [m, n] @ dense [n, d] product. We compute it with a COO
``torch.sparse.mm`` on CPU (no sort: the product accumulates entry by entry). Profiled at 2 threads
(d 256, 4,096 latents, k 32, batch 4,096) this is ~80 ms, where the alternatives cost more:
``embedding_bag``'s own dense backward sorts the nnz indices first (~450-700 ms, the largest single
cost of the step before this kernel replaced it), sparsify's ``index_add_`` of materialised outer
products builds an [n*k, d] tensor (~600 ms), and a dense [n, m] scatter + mm is a full GEMM
(~540 ms). On CUDA the COO product becomes cuSPARSE's SpMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def row_layout(n: int, k: int, device=None) -> tuple[Tensor, Tensor]:
    """rows [n*k] and offsets [n] of a fixed-k flat layout (token-major)."""
    ar = torch.arange(n, device=device)
    # expand + reshape: the same values as repeat_interleave without its generic count path
    return ar.unsqueeze(1).expand(n, k).reshape(-1), ar * k


def rows_of(offsets: Tensor, nnz: int) -> Tensor:
    """Token index of each flat entry from embedding_bag offsets [n] (non-decreasing)."""
    n = offsets.shape[0]
    counts = torch.diff(offsets, append=offsets.new_tensor([nnz]))
    return torch.repeat_interleave(torch.arange(n, device=offsets.device), counts)


def scatter_rows(cols: Tensor, rows: Tensor, values: Tensor, dense: Tensor, num_out: int) -> Tensor:
    """out[cols[r]] += values[r] * dense[rows[r]] for every entry r; out is [num_out, d].

    The weight gradient of both sparse kernels (see the module docstring for why COO spmm)."""
    sparse = torch.sparse_coo_tensor(
        torch.stack([cols, rows]), values.to(dense.dtype), (num_out, dense.shape[0]),
        dtype=dense.dtype, device=dense.device, check_invariants=False,
    )
    return torch.sparse.mm(sparse, dense)


def entry_dots(dense: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor, rows: Tensor) -> Tensor:
    """out[r] = dense[rows[r]] . weight[indices[r]], [nnz]: the per-sample-weight gradient of an
    ``embedding_bag``. ATen's own kernel does it in one pass without materialising the [nnz, d]
    gathers (~50 ms here against ~500 ms for a gather + bmm)."""
    try:
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            dense, weight, indices, offsets, rows, 0, -1  # mode 0 = sum; offset2bag = rows
        )
    except (RuntimeError, AttributeError):  # a build without the private op: same values, more memory
        return (dense[rows] * weight[indices]).sum(-1)


class _GatherPreActs(torch.autograd.Function):
    """values[r] = (x - b_dec)[rows[r]] . W[cols[r]] + b[cols[r]], with sparse gradients.

    Shapes: x_c = x - b_dec [n, d] (no graph); x [n, d]; b_dec [d]; weight [m, d]; bias [m];
    rows, cols [nnz] and offsets [n] (int64); values [nnz].
    """

    @staticmethod
    def forward(ctx, x_c, x, b_dec, weight, bias, rows, cols, offsets, values):
        # values were computed by the caller from the dense, graph-free pre-activations.
        ctx.save_for_backward(x_c, weight, rows, cols, offsets)
        ctx.num_latents = weight.shape[0]
        ctx.x_dtype = x.dtype
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x_c, weight, rows, cols, offsets = ctx.saved_tensors
        m = ctx.num_latents
        grad_values = grad_values.to(weight.dtype)
        _, need_x, need_b_dec, need_w, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_b_dec = grad_w = grad_b = None
        if need_w:
            grad_w = scatter_rows(cols, rows, grad_values, x_c, m)
        per_latent = None
        if need_b or need_b_dec:
            per_latent = weight.new_zeros(m).index_add_(0, cols, grad_values)  # = grad of b_enc
            grad_b = per_latent if need_b else None
        if need_b_dec:
            # d pre / d b_dec = -W[col] for every entry, so the b_dec gradient is -(grad b_enc) @ W:
            # an [m] x [m, d] product instead of an [n, d] embedding_bag followed by a sum over n.
            grad_b_dec = -(per_latent @ weight)
        if need_x:
            # grad_x[row] = sum over the row's entries of g * W[col]: a weighted bag of encoder rows.
            grad_x = F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=grad_values)
            grad_x = grad_x.to(ctx.x_dtype)
        return None, grad_x, grad_b_dec, grad_w, grad_b, None, None, None, None


def gather_pre_acts(
    x: Tensor, b_dec: Tensor, weight: Tensor, bias: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor,
    values: Tensor, x_c: Tensor | None = None,
) -> Tensor:
    """Attach sparse gradients to pre-activation values picked at (rows, cols).

    The pre-activations are ``(x - b_dec) @ weight.T + bias``. Entries are grouped by token:
    ``rows`` is non-decreasing and ``offsets`` [n] gives where each token's entries start.
    ``values`` must equal the pre-activations at (rows, cols), computed without a graph (e.g. the
    values ``topk`` returned); ``x_c`` is ``x - b_dec`` without a graph if the caller has it.
    Gradients flow to x, b_dec, weight and bias.
    """
    if x_c is None:
        with torch.no_grad():
            x_c = x.to(weight.dtype) - b_dec
    return _GatherPreActs.apply(x_c.detach(), x, b_dec, weight, bias, rows, cols, offsets, values.detach())


class _SparseDecode(torch.autograd.Function):
    """out[t] = sum over token t's entries r of values[r] * W[indices[r]], with sparse gradients."""

    @staticmethod
    def forward(ctx, values, weight, indices, offsets, rows):
        ctx.save_for_backward(values, weight, indices, offsets, rows)
        return F.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, weight, indices, offsets, rows = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = entry_dots(grad, weight, indices, offsets, rows)
        if ctx.needs_input_grad[1]:
            # Not embedding_bag's dense backward: it sorts the nnz indices (see the module docstring).
            grad_w = scatter_rows(indices, rows, values, grad, weight.shape[0])
        return grad_values, grad_w, None, None, None


def sparse_decode(values: Tensor, indices: Tensor, w_dec: Tensor, offsets: Tensor | None = None,
                  rows: Tensor | None = None) -> Tensor:
    """sum_j values[., j] * w_dec[indices[., j]] per token, without a dense latent matrix.

    values, indices: [n, k] (then ``offsets`` is None) or flat [nnz] with ``offsets`` [n] marking
    where each token's entries start (``rows`` [nnz], the token of each entry, if the caller has
    it). w_dec: [m, d]. Returns [n, d].
    """
    values = values.to(w_dec.dtype)
    if offsets is None:
        n, k = indices.shape
        rows, offsets = row_layout(n, k, indices.device)
        values, indices = values.reshape(-1), indices.reshape(-1)
    elif rows is None:
        rows = rows_of(offsets, indices.shape[0])
    if not (torch.is_grad_enabled() and (values.requires_grad or w_dec.requires_grad)):
        return F.embedding_bag(indices, w_dec, offsets, mode="sum", per_sample_weights=values)
    return _SparseDecode.apply(values, w_dec, indices, offsets, rows)


def row_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [n, k] of each row's k largest entries (unsorted), as ``pre.topk(k, dim=1,
    sorted=False)`` up to the order of ties.

    On CPU a full ``topk`` over many latents costs several times the encoder's matmul. Instead: split
    each row into 2k equal groups and take the k-th largest group maximum as a threshold t; the k
    groups above it each hold an entry >= t, so the row's top k are all >= t, while only a few
    entries beyond k are (a cheap pass over [n, m]). Those candidates are packed into a narrow
    [n, c] table (c = the most candidates of any row) and ``topk`` runs over that. Exact: it picks
    from a set that contains the top k. Falls back to ``topk`` on accelerators, where it is fast,
    and when the latents do not split into 2k groups of >= 4.
    """
    n, m = pre.shape
    groups = 2 * k
    if pre.device.type != "cpu" or m % groups or m // groups < 4 or n == 0:
        return pre.topk(k, dim=1, sorted=False)
    group_max = pre.view(n, groups, m // groups).amax(-1)
    thr = group_max.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
    rows, cols = (pre >= thr).nonzero(as_tuple=True)  # row-major: grouped by row
    counts = torch.bincount(rows, minlength=n)
    slot = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[rows]
    width = int(counts.max())
    table_v = torch.full((n, width), float("-inf"), dtype=pre.dtype)
    table_i = torch.zeros((n, width), dtype=torch.long)
    table_v[rows, slot] = pre[rows, cols]
    table_i[rows, slot] = cols
    vals, pos = table_v.topk(k, dim=1, sorted=False)
    return vals, table_i.gather(1, pos)
