"""Feature statistics from the training run: `diffatlas train` saves, next to the SAE, exactly what a
separate `compute_feature_stats` pass with the saved weights computes over the same rows, and
`diffatlas analyze features` reuses them only when they match."""

from __future__ import annotations

import pytest
import torch

from common.errors import UsageError
from sae import stats as S
from sae.quick import train_quick
from sae.sparse_coder import SAE
from sae.synthetic import write_sparse_store


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, with NaN equal to NaN at the same places (a branch with no rows is NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        nan = torch.isnan(a)
        return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])
    return torch.equal(a, b)


def assert_stats_equal(got: S.FeatureStats, ref: S.FeatureStats) -> None:
    for name in S._TENSOR_FIELDS:
        assert bit_equal(getattr(got, name), getattr(ref, name)), name
    assert set(got.top_meta) == set(ref.top_meta)
    for name in ref.top_meta:
        assert bit_equal(got.top_meta[name], ref.top_meta[name]), f"top_meta.{name}"


@pytest.fixture
def store(tmp_path):
    return write_sparse_store(tmp_path / "store", n=1536, d=16, images=8, seed=3)


def _train(store, out, architecture="topk", epochs=2):
    folder, _ = train_quick(str(store.dir.parent), out=str(out), architecture=architecture, expansion_factor=4, k=4,
                            batch_size=128, epochs=epochs, wandb=False, recovered_images=0)
    return folder


@pytest.mark.parametrize("architecture, dense_max", [("topk", S.DENSE_COOC_MAX), ("batchtopk", 1)])
def test_training_stats__equal_a_separate_pass_with_the_saved_weights(store, tmp_path, monkeypatch, architecture,
                                                                      dense_max):
    # batchtopk: its threshold is calibrated after the last epoch; dense_max 1: sparse co-firing counts
    monkeypatch.setattr(S, "DENSE_COOC_MAX", dense_max)
    folder = _train(store, tmp_path / "sae", architecture)
    got = S.FeatureStats.load(folder / S.SAE_STATS_DIR)
    sae = SAE.from_pretrained(folder)
    ref = S.compute_feature_stats(sae, store, progress=False, store_root=str(store.dir.parent))
    assert got.info["rows"] == store.num_rows == ref.info["rows"]  # every row of the site
    assert got.info["cooc_method"] == ref.info["cooc_method"] == ("dense" if dense_max > 1 else "sparse")
    assert got.info["from"] == "training" and got.info["sae_weights"] == ref.info["sae_weights"]
    assert (got.density > 0).any() and (got.cooc_count > 0).any() and (got.top_row >= 0).any()
    assert_stats_equal(got, ref)
    # and `diffatlas analyze features` accepts them as its own
    assert S.stats_match(got, sae, store, store_root=store.dir.parent) is None


def test_analyze_features__reuses_matching_training_stats_and_recomputes_otherwise(store, tmp_path, monkeypatch):
    import analysis.features as F
    from analysis.feature_report import FeaturesConfig, build_report, saved_stats

    folder = _train(store, tmp_path / "sae", epochs=1)
    root = store.dir.parent
    sae = SAE.from_pretrained(folder)
    got = saved_stats(sae, store, root, top_k=16)
    assert got is not None and got.info["sae"] == str(folder)
    assert_stats_equal(got, S.compute_feature_stats(sae, store, progress=False))
    # another top_k, another store (other rows), other weights: not reused
    assert saved_stats(sae, store, root, top_k=8) is None
    other = write_sparse_store(tmp_path / "other", n=1024, d=16, images=8, seed=3)
    assert saved_stats(sae, other, other.dir.parent, top_k=16) is None
    changed = SAE.from_pretrained(folder)
    with torch.no_grad():
        changed.encoder.bias[0] += 1e-3
    assert saved_stats(changed, store, root, top_k=16) is None
    assert "sae_weights" in S.stats_match(got, changed, store, store_root=root)

    # `diffatlas analyze features` starts from them: no separate pass
    def no_pass(*args, **kwargs):
        raise AssertionError("the separate statistics pass ran")

    monkeypatch.setattr(F, "compute_feature_stats", no_pass)
    cfg = FeaturesConfig(sae=str(folder), store=str(root), out=str(tmp_path / "feat"), features=2, examples=0,
                         wandb=False, html=False, progress=False)
    build_report(cfg)
    assert_stats_equal(S.FeatureStats.load(tmp_path / "feat" / "stats"), got)
    # without them (an SAE trained elsewhere) it computes them as before
    import shutil

    shutil.rmtree(folder / S.SAE_STATS_DIR)
    with pytest.raises(AssertionError, match="separate statistics pass ran"):
        build_report(cfg)


def test_training_stats__bad_settings_are_one_line_errors():
    from sae.lit import LitSAE

    for bad in (0, -1, "8", True):
        with pytest.raises(UsageError, match=r"^feature_stats_top_k must be an int >= 1, got .+$"):
            LitSAE(feature_stats_top_k=bad)
    with pytest.raises(UsageError, match=r"^feature_stats_cooc_top must be an int >= 1, got 0$"):
        LitSAE(feature_stats_cooc_top=0)
    with pytest.raises(UsageError, match=r"^feature_stats_rows must be site or trained, got 'all'$"):
        LitSAE(feature_stats_rows="all")


def test_training_stats__over_each_saes_own_rows_equal_a_separate_pass_and_are_reused_for_them(tmp_path, monkeypatch):
    import analysis.features as F
    from analysis.feature_report import FeaturesConfig, build_report
    from tests.test_sae_many import _fit

    root = tmp_path / "store"
    write_sparse_store(root, site="a", n=1024, d=8, images=8, seed=1)
    model = _fit(root, tmp_path / "run", site="a", window=["early", "late"], feature_stats=True,
                 feature_stats_rows="trained")
    from activations.store import ActivationStore

    reader = ActivationStore(root).site("a")
    for path in model.saved:
        sae = SAE.from_pretrained(path)
        got = S.FeatureStats.load(path / S.SAE_STATS_DIR)
        rows, rows_of = S.trained_rows(reader, sae.placement)
        assert got.info["rows"] == len(rows) < reader.num_rows and got.info["rows_of"] == rows_of != S.ROWS_SITE
        assert_stats_equal(got, S.compute_feature_stats(sae, reader, rows=rows, progress=False))
    # analyze features reuses them for --rows trained, and computes its own over every row otherwise
    calls = []
    real = F.compute_feature_stats
    monkeypatch.setattr(F, "compute_feature_stats", lambda *a, **k: calls.append(k.get("rows_of")) or real(*a, **k))
    for rows_opt in ("trained", "site"):
        build_report(FeaturesConfig(sae=str(model.saved[0]), store=str(root), out=str(tmp_path / f"feat_{rows_opt}"),
                                    features=2, examples=0, wandb=False, html=False, progress=False, rows=rows_opt))
    assert calls == ["site"]
    assert S.FeatureStats.load(tmp_path / "feat_site" / "stats").info["rows"] == reader.num_rows
