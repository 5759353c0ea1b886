"""SAE architectures: the train-step contract, literature defaults, folding and files."""

from __future__ import annotations

import json

import pytest
import torch

from sae.config import SparseCoderConfig
from sae.registry import available_architectures, get_architecture, register_architecture
from sae.sparse_coder import SAE, SparseCoder, TrainContext, TrainOutput

ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]


def make(arch: str, d: int = 8, m: int = 32, k: int = 3, **kw) -> SparseCoder:
    torch.manual_seed(0)
    return get_architecture(arch)(SparseCoderConfig(architecture=arch, num_latents=m, k=k, **kw), d)


def data(n=64, d=8, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + 0.5


def test_registry__lists_the_four_builtin_architectures():
    assert set(ARCHS) <= set(available_architectures())


def test_registry__unknown_architecture_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'.*batchtopk.*topk"):
        get_architecture("gated")


def test_registry__an_architecture_is_one_registered_class():
    @register_architecture("test_identity_relu")
    class Tiny(SparseCoder):
        def encode(self, x):
            from sae.latents import Latents

            return Latents(self.num_latents, dense=torch.relu(self.pre_acts(x)))

        def train_step(self, x, ctx):
            lat = self.encode(x)
            recon = self.decode(lat)
            return TrainOutput(recon, lat, {"mse": self._mse(x, recon)})

    sae = get_architecture("test_identity_relu")(SparseCoderConfig(architecture="test_identity_relu", num_latents=16), 4)
    out = sae.train_step(torch.randn(5, 4), TrainContext())
    assert set(out.losses) == {"mse"}


@pytest.mark.parametrize("arch", ARCHS)
def test_train_step__returns_named_losses_that_sum_to_the_loss_and_backprop(arch):
    sae = make(arch)
    out = sae.train_step(data(), TrainContext(dead_mask=torch.ones(32, dtype=torch.bool)))
    assert "mse" in out.losses and len(out.losses) >= 2
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    out.loss.backward()
    assert all(p.grad is not None for p in sae.parameters())
    assert out.recon.shape == (64, 8)


def test_init__encoder_is_decoder_transpose_with_unit_norm_rows():
    sae = make("topk")
    torch.testing.assert_close(sae.encoder.weight, sae.W_dec)  # [m, d] both: W_enc = W_dec^T
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))


def test_topk__l0_equals_k():
    sae = make("topk", k=5)
    with torch.no_grad():
        sae.encoder.bias.fill_(10.0)  # every pre-activation positive
    lat = sae.encode(data())
    assert torch.all(lat.l0() == 5)
    assert torch.all(sae.train_step(data(), TrainContext()).latents.l0() == 5)


def test_topk__sparse_gradients_equal_dense_autograd():
    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=48, k=4), 12, dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_()
    x = torch.randn(20, 12, dtype=torch.float64)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[:30] = True
    sae.train_step(x, TrainContext(dead_mask=dead)).loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    # Reference: the same losses through dense tensors and plain autograd.
    pre = (x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
    acts = torch.relu(pre)
    vals, idx = acts.topk(4)
    recon = torch.zeros_like(acts).scatter(1, idx, vals) @ sae.W_dec + sae.b_dec
    mse = (x - recon).pow(2).sum(-1).mean()
    _, aux_idx = pre.detach().masked_fill(~dead, float("-inf")).topk(6)  # k_aux = d/2
    aux = torch.zeros_like(acts).scatter(1, aux_idx, torch.relu(pre.gather(1, aux_idx))) @ sae.W_dec
    (mse + (aux - (x - recon).detach()).pow(2).sum(-1).mean() / 32).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


def test_batchtopk__selects_k_times_batch_entries_and_sets_a_threshold():
    sae = make("batchtopk", k=3)
    out = sae.train_step(data(), TrainContext())
    assert int(out.latents.l0().sum()) == 3 * 64
    assert float(sae.threshold) > 0


def test_jumprelu__threshold_gets_gradient_from_the_l0_penalty():
    sae = make("jumprelu", jumprelu_threshold_init=0.5, jumprelu_bandwidth=1.0)
    sae.train_step(data(), TrainContext()).losses["l0"].backward()
    assert sae.threshold.grad is not None and float(sae.threshold.grad.abs().sum()) > 0


def test_decoder__parallel_gradient_removed_and_rows_renormalised():
    sae = make("topk")
    sae.train_step(data(), TrainContext()).loss.backward()
    sae.before_optimizer_step()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(-1)
    torch.testing.assert_close(parallel, torch.zeros(32), atol=1e-6, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_scale__raw_inputs_reconstruct_like_scaled_inputs(arch):
    sae = make(arch)
    x = data()
    sae.train_step(x * 2.5, TrainContext())  # sets BatchTopK's threshold
    with torch.no_grad():
        sae.encoder.bias.normal_()
        sae.b_dec.normal_()
    scaled = sae(x * 2.5) / 2.5
    sae.fold_input_scale(2.5)
    torch.testing.assert_close(sae(x), scaled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_files__save_and_load_give_the_same_sae(arch, tmp_path):
    sae = make(arch)
    sae.train_step(data(), TrainContext())
    sae.save_pretrained(tmp_path / "site", sparsity=torch.full((32,), -2.0))
    assert {p.name for p in (tmp_path / "site").iterdir()} == {"sae.safetensors", "cfg.json", "sparsity.safetensors"}
    cfg = json.loads((tmp_path / "site" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d_in"] == 8 and cfg["num_latents"] == 32
    loaded = SAE.from_pretrained(tmp_path / "site")
    assert type(loaded) is type(sae)
    torch.testing.assert_close(loaded(data()), sae(data()))
    if arch == "batchtopk":
        torch.testing.assert_close(loaded.threshold, sae.threshold)


def test_files__folder_of_sites_asks_for_a_site(tmp_path):
    make("topk").save_pretrained(tmp_path / "mid_block.attentions.0")
    with pytest.raises(FileNotFoundError, match="mid_block.attentions.0"):
        SAE.from_pretrained(tmp_path)
    assert isinstance(SAE.from_pretrained(tmp_path, site="mid_block.attentions.0"), SparseCoder)


def test_config__bad_k_names_the_valid_range():
    with pytest.raises(ValueError, match=r"k must be in \[1, num_latents=32\].*got 40"):
        make("topk", k=40)
