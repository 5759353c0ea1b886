"""Sparse TopK kernels (sae/kernels.py): values and gradients equal dense autograd."""

from __future__ import annotations

import pytest
import torch

from sae.config import SparseCoderConfig
from sae.kernels import gather_pre_acts, row_layout, sparse_decode
from sae.registry import get_architecture
from sae.sparse_coder import TrainContext


def _picks(n=10, m=24, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    rows, offsets = row_layout(n, k)
    return idx, rows, offsets


def test_row_layout__matches_repeat_interleave():
    rows, offsets = row_layout(5, 3)
    torch.testing.assert_close(rows, torch.arange(5).repeat_interleave(3))
    torch.testing.assert_close(offsets, torch.arange(0, 15, 3))


def test_gather_pre_acts__gradients_equal_dense_autograd():
    torch.manual_seed(0)
    n, m, d, k = 10, 24, 6, 3
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b_dec, b = torch.randn(d, dtype=torch.float64, requires_grad=True), torch.randn(m, dtype=torch.float64, requires_grad=True)
    w = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    idx, rows, offsets = _picks(n, m, k)
    dense = (x - b_dec) @ w.T + b
    upstream = torch.randn(n * k, dtype=torch.float64)
    got_vals = gather_pre_acts(x, b_dec, w, b, rows, idx.reshape(-1), offsets, dense.detach().gather(1, idx).reshape(-1))
    got = torch.autograd.grad((got_vals * upstream).sum(), (x, b_dec, w, b))
    want = torch.autograd.grad((dense.gather(1, idx).reshape(-1) * upstream).sum(), (x, b_dec, w, b))
    for name, g1, g2 in zip(("x", "b_dec", "W", "b"), got, want):
        torch.testing.assert_close(g1, g2, msg=name)


@pytest.mark.parametrize("flat", [True, False])
def test_sparse_decode__values_and_gradients_equal_dense(flat):
    torch.manual_seed(0)
    n, m, d, k = 10, 24, 6, 3
    w = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    vals = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    idx, rows, offsets = _picks(n, m, k)
    got = sparse_decode(vals.reshape(-1), idx.reshape(-1), w, offsets) if flat else sparse_decode(vals, idx, w)
    want = torch.zeros(n, m, dtype=torch.float64).scatter(1, idx, vals) @ w
    torch.testing.assert_close(got, want)
    upstream = torch.randn(n, d, dtype=torch.float64)
    g_got = torch.autograd.grad((got * upstream).sum(), (vals, w))
    g_want = torch.autograd.grad((want * upstream).sum(), (vals, w))
    for g1, g2 in zip(g_got, g_want):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("num_dead", [0, 5, 40])
def test_topk__auxk_gradients_equal_dense_autograd_for_few_and_many_dead_latents(num_dead):
    # 5 of 48 dead takes the column-subset top-k path, 40 of 48 the masked one, 0 skips AuxK.
    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=48, k=4), 12, dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_()
    x = torch.randn(20, 12, dtype=torch.float64)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48)[:num_dead]] = True
    out = sae.train_step(x, TrainContext(dead_mask=dead))
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
    acts = torch.relu(pre)
    vals, idx = acts.topk(4)
    recon = torch.zeros_like(acts).scatter(1, idx, vals) @ sae.W_dec + sae.b_dec
    loss = (x - recon).pow(2).sum(-1).mean()
    if num_dead:
        k_aux = min(6, num_dead)
        _, aux_idx = pre.detach().masked_fill(~dead, float("-inf")).topk(k_aux)
        aux = torch.zeros_like(acts).scatter(1, aux_idx, torch.relu(pre.gather(1, aux_idx))) @ sae.W_dec
        loss = loss + (aux - (x - recon).detach()).pow(2).sum(-1).mean() / 32
    else:
        assert float(out.losses["auxk"]) == 0.0
    loss.backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


def test_batchtopk__sparse_gradients_equal_dense_autograd():
    torch.manual_seed(0)
    sae = get_architecture("batchtopk")(SparseCoderConfig(architecture="batchtopk", num_latents=48, k=4), 12,
                                        dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_()
    x = torch.randn(20, 12, dtype=torch.float64)
    sae.train_step(x, TrainContext()).losses["mse"].backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    acts = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    cutoff = acts.detach().flatten().topk(4 * 20).values.min()
    keep = (acts.detach() >= cutoff) & (acts.detach() > 0)
    recon = (acts * keep) @ sae.W_dec + sae.b_dec
    (x - recon).pow(2).sum(-1).mean().backward()
    for name, g in got.items():
        torch.testing.assert_close(g, dict(sae.named_parameters())[name].grad, msg=name)


@pytest.mark.parametrize("m,k", [(512, 16), (4096, 32), (96, 8), (100, 5)])
def test_row_topk__picks_the_same_entries_as_topk(m, k):
    from sae.kernels import row_topk

    pre = torch.randn(300, m, generator=torch.Generator().manual_seed(m + k))
    pre[0] = 0.0  # an all-tie row still gives k entries of the top value
    vals, idx = row_topk(pre, k)
    ref_vals, ref_idx = pre.topk(k, dim=1, sorted=False)
    assert torch.equal(vals.sort(1).values, ref_vals.sort(1).values)
    assert torch.equal(idx[1:].sort(1).values, ref_idx[1:].sort(1).values)
    assert torch.equal(pre.gather(1, idx), vals) and len(set(idx[0].tolist())) == k
