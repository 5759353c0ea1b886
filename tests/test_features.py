"""Feature statistics of an SAE over a store: streaming results equal a dense reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import features as F
from sae.config import SparseCoderConfig
from sae.registry import get_architecture
from sae.synthetic import write_sparse_store


def tiny_sae(d=16, m=48, k=4, seed=0):
    torch.manual_seed(seed)
    return get_architecture("topk")(SparseCoderConfig(num_latents=m, k=k), d)


@pytest.fixture
def store(tmp_path):
    return write_sparse_store(tmp_path / "store", n=1500, d=16, images=6, seed=1)


def dense_reference(sae, reader):
    acts, meta = reader.read(np.arange(reader.num_rows))
    with torch.no_grad():
        z = sae.encode(acts.float()).to_dense().clamp(min=0)
    return z, meta


def test_feature_stats__match_dense_reference(store):
    sae = tiny_sae()
    st = F.compute_feature_stats(sae, store, chunk_rows=256, top_k=5, progress=False)
    z, meta = dense_reference(sae, store)
    torch.testing.assert_close(st.density, (z > 0).float().mean(0))
    torch.testing.assert_close(st.mean, z.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st.max, z.max(0).values)
    ref_top = z.topk(5, dim=0).values.T
    torch.testing.assert_close(st.top_act.clamp(min=0), ref_top.clamp(min=0))
    # top rows point at rows holding those activations
    f = int(st.density.argmax())
    ex = st.top_examples(f)
    assert [e["activation"] for e in ex] == sorted([e["activation"] for e in ex], reverse=True)
    assert ex[0]["image"] == int(meta["image"][ex[0]["row"]]) and ex[0]["i"] == int(meta["i"][ex[0]["row"]])
    # spatial profile at one position, tau profile at one tau (cond branch)
    pos = meta["i"].astype(int) * store.grid[1] + meta["j"].astype(int)
    sel = pos == 0
    torch.testing.assert_close(st.spatial[0], z[torch.from_numpy(sel)].mean(0), rtol=1e-4, atol=1e-5)
    t0 = float(st.taus[0])
    sel = np.isclose(meta["tau"], t0)
    torch.testing.assert_close(st.tau_profile[1, 0], z[torch.from_numpy(sel)].mean(0), rtol=1e-4, atol=1e-5)
    assert torch.isnan(st.tau_profile[0]).all()  # no uncond rows
    assert st.taus[0] > st.taus[-1]  # tau descending: noise first


@pytest.mark.parametrize("dense_max", [4096, 1])
def test_feature_stats__cooccurrence_dense_and_sparse_agree(store, monkeypatch, dense_max):
    from sae import stats as S

    monkeypatch.setattr(S, "DENSE_COOC_MAX", dense_max)
    sae = tiny_sae()
    st = F.compute_feature_stats(sae, store, chunk_rows=300, cooc_top=3, progress=False)
    assert st.info["cooc_method"] == ("dense" if dense_max > 48 else "sparse")
    z, _ = dense_reference(sae, store)
    b = (z > 0).float()
    c = (b.T @ b).long()
    c.fill_diagonal_(0)
    ref = c.topk(3, dim=1).values
    torch.testing.assert_close(st.cooc_count, ref)
    for f in range(5):
        for j in range(3):
            if st.cooc_count[f, j] > 0:
                assert c[f, st.cooc_idx[f, j]] == st.cooc_count[f, j]


def test_feature_stats__save_load_roundtrip(store, tmp_path):
    st = F.compute_feature_stats(tiny_sae(), store, progress=False)
    st.save(tmp_path / "fs")
    back = F.FeatureStats.load(tmp_path / "fs")
    torch.testing.assert_close(back.top_act, st.top_act)
    torch.testing.assert_close(back.top_meta["image"], st.top_meta["image"])
    assert back.info["site"] == store.name and back.grid == store.grid


def test_feature_stats__load_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature statistics"):
        F.FeatureStats.load(tmp_path / "nothing")


def test_feature_stats__width_mismatch_refused(store):
    with pytest.raises(ValueError, match="width"):
        F.compute_feature_stats(tiny_sae(d=8), store, progress=False)


def test_feature_pictures__top_images_strip_and_profile_are_pngs(store, tmp_path):
    from PIL import Image

    from analysis.feature_plots import feature_heatmap, step_strip_png, tau_profile_png, top_images_png

    sae = tiny_sae()
    st = F.compute_feature_stats(sae, store, progress=False)
    f = int(st.density.argmax())
    ex = st.top_examples(f)[0]
    heat = feature_heatmap(sae, store, f, ex["image"], ex["step"])
    assert heat.shape == store.grid
    assert np.isnan(heat).any() and np.nanmax(heat) == pytest.approx(ex["activation"], rel=1e-3)  # unharvested = NaN
    for png in (top_images_png(st, sae, store, f, tmp_path / "top.png", n=3),
                step_strip_png(sae, store, f, ex["image"], tmp_path / "strip.png"),
                tau_profile_png(st, f, tmp_path / "tau.png")):
        assert Image.open(png).size[0] > 100


def test_auroc__matches_pairwise_definition_with_ties():
    from analysis.auroc import auroc, sparse_auroc

    rng = np.random.default_rng(0)
    n = 200
    s = np.where(rng.random((n, 3)) < 0.7, 0.0, rng.integers(1, 5, (n, 3)).astype(float))  # sparse, tied
    y = rng.random((n, 2)) < 0.3
    ref = np.array([[np.mean([(a > b) + 0.5 * (a == b) for a in s[y[:, v], f] for b in s[~y[:, v], f]])
                     for v in range(2)] for f in range(3)])
    np.testing.assert_allclose(auroc(s, y), ref)
    r, f = np.nonzero(s)
    np.testing.assert_allclose(sparse_auroc(r, f, s[r, f], 3, y), ref)
    assert auroc(np.arange(4.0), np.array([0, 0, 1, 1]))[0, 0] == 1.0


def test_analyze_features__missing_arguments_and_bad_sae_are_one_line_errors(store, capsys):
    from diffatlas.cli import main

    assert main(["analyze", "features"]) == 2
    assert "give the SAE folder and the store" in capsys.readouterr().err
    assert main(["analyze", "features", "/nonexistent/sae", str(store.dir.parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffatlas analyze features: error:") and "/nonexistent/sae" in err and err.count("\n") == 1
