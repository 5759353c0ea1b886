"""Interoperability with EleutherAI's sparsify (`pip install eai-sparsify`, in the `bench` extra):
a TopK SAE saved by diffatlas loads there with the same latents, and one saved there loads here."""

from __future__ import annotations

import pytest
import torch

sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is in the bench extra")

from sae.config import SparseCoderConfig  # noqa: E402
from sae.sparse_coder import SAE, TrainContext  # noqa: E402
from sae.topk import TopKSAE  # noqa: E402


def _dense(acts, indices, m):
    return torch.zeros(acts.shape[0], m).scatter(1, indices, acts)


def test_sparsify__loads_a_diffatlas_topk_sae_with_the_same_latents(tmp_path):
    torch.manual_seed(0)
    ours = TopKSAE(SparseCoderConfig(num_latents=64, k=6), 16)
    x = torch.randn(40, 16) + 1.0
    ours.train_step(x, TrainContext()).loss.backward()
    with torch.no_grad():  # move away from the init so the check is not trivial
        for p in ours.parameters():
            p -= 0.05 * p.grad
    ours.fold_input_scale(1.7)
    ours.save_pretrained(tmp_path / "mid_block.attentions.0")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "mid_block.attentions.0")
    enc = theirs.encode(x)
    torch.testing.assert_close(_dense(enc.top_acts, enc.top_indices, 64), ours.encode_dense(x))
    torch.testing.assert_close(theirs.decode(enc.top_acts, enc.top_indices), ours(x), rtol=1e-5, atol=1e-5)


def test_sparsify__a_sparsify_sae_loads_in_diffatlas_with_the_same_latents(tmp_path):
    from sparsify.config import SparseCoderConfig as TheirConfig

    torch.manual_seed(0)
    theirs = sparsify.SparseCoder(16, TheirConfig(num_latents=48, k=5))
    with torch.no_grad():
        theirs.b_dec.normal_()
        theirs.encoder.bias.normal_()
    theirs.save_to_disk(tmp_path / "site")
    ours = SAE.from_pretrained(tmp_path / "site")
    assert isinstance(ours, TopKSAE) and ours.num_latents == 48 and ours.cfg.k == 5
    x = torch.randn(30, 16)
    enc = theirs.encode(x)
    torch.testing.assert_close(ours.encode_dense(x), _dense(enc.top_acts, enc.top_indices, 48))
