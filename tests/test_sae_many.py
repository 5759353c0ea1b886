"""Many SAEs from one read of the store: `diffatlas train` with lists of sites, windows and branches
trains one SAE per combination, reads each site once, and each SAE equals the same SAE trained
alone; resume, statistics and bad input work as for one SAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from activations.store import write_synthetic_store  # noqa: E402
from common.errors import UsageError  # noqa: E402
from sae import stats as S  # noqa: E402
from sae.config import SparseCoderConfig  # noqa: E402
from sae.data import ActivationDataModule  # noqa: E402
from sae.lit import LitSAE, RecoveredConfig  # noqa: E402
from sae.sparse_coder import SAE  # noqa: E402
from sae.synthetic import sparse_activations, write_sparse_store  # noqa: E402
from tests.test_sae_train_stats import assert_stats_equal  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def two_sites(tmp_path):
    """Sites a (1024 rows) and b (640 rows, another width) at tau 0.999, 0.5 and 0.1."""
    root = tmp_path / "store"
    write_sparse_store(root, site="a", n=1024, d=8, images=8, seed=1)
    write_sparse_store(root, site="b", n=640, d=12, images=8, seed=2)
    return root


def _fit(store, root, *, kill_at=None, ckpt_path=None, feature_stats=False, feature_stats_rows="site", **data):
    pl.seed_everything(0)
    dm = ActivationDataModule(str(store), batch_size=64, seed=0, **data)
    model = LitSAE(SparseCoderConfig(num_latents=32, k=4, dead_tokens_threshold=256), lr=1e-2, lr_warmup_steps=3,
                   init_samples=256, histogram_every_n_steps=4, recovered=RecoveredConfig(images=0),
                   save_dir=str(root / "sae"), feature_stats=feature_stats,
                   feature_stats_rows=feature_stats_rows)
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=5, save_top_k=-1,
                                              filename="{step}")]
    if kill_at:
        class Kill(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == kill_at:
                    raise RuntimeError("killed")
        callbacks.append(Kill())
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=2, default_root_dir=root)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def _same_weights(a: SAE, b: SAE) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


def test_many__a_grid_trains_one_sae_per_combination_each_in_its_place(two_sites, tmp_path):
    torch.set_num_threads(1)
    model = _fit(two_sites, tmp_path / "run", site=["a", "b"], window=["early", "late"])
    names = sorted(p.name for p in model.saved)
    assert names == ["a__early", "a__late", "b__early", "b__late"]
    for path in model.saved:
        sae = SAE.from_pretrained(path)
        site, window = path.name.split("__")
        assert sae.placement.site == site and sae.placement.window == window
        assert sae.d_in == (8 if site == "a" else 12)
        cfg = json.loads((path / "cfg.json").read_text())
        assert cfg["trained_tokens"] > 0 and cfg["store"] == str(two_sites)
        assert cfg["training"]["saes_in_run"] == 4 and cfg["training"]["steps"] > 0 and cfg["training"]["lr"] == 1e-2
    # each SAE saw only its window's rows: early rows of a, counted over 2 epochs
    early_a = next(p for p in model.saved if p.name == "a__early")
    reader = ActivationDataModule(str(two_sites), site="a", window="early", batch_size=64)
    reader.setup()
    tokens = json.loads((early_a / "cfg.json").read_text())["trained_tokens"]
    assert tokens <= 2 * len(reader.train_ids) and tokens >= len(reader.train_ids)
    # metrics have a namespace per SAE
    assert "a__early/metrics/fvu" in model.last_val_metrics and "b__late/metrics/fvu" in model.last_val_metrics


def test_many__each_site_is_read_once_and_each_row_goes_to_the_saes_it_belongs_to(two_sites):
    dm = ActivationDataModule(str(two_sites), site=["a", "b"], window=["early", None], batch_size=64, val_fraction=0.25)
    dm.setup()
    seen: dict[str, list] = {"a": [], "b": []}
    per_part: dict[int, list] = {k: [] for k in range(len(dm.parts))}
    sites_in_order = []
    for batch in dm.train_dataloader():
        rows = batch["rows"].numpy()
        seen[batch["site"]].append(rows)
        sites_in_order.append(batch["site"])
        for k, idx in batch["parts"].items():
            assert dm.parts[k].site == batch["site"]
            per_part[k].append(rows if idx is None else rows[idx.numpy()])
    for site, chunks in seen.items():
        rows = np.concatenate(chunks)
        assert len(rows) == len(np.unique(rows)), f"a row of {site} was read twice in one epoch"
        assert len(rows) == dm.site_batches()[site] * 64
    for k, part in enumerate(dm.parts):
        got = np.concatenate(per_part[k])
        want = dm.part_rows(k, "train")
        assert np.isin(got, want).all()  # only its own window's rows
        if part.window is None:
            assert len(got) == dm.site_batches()[part.site] * 64  # the pooled SAE takes every row read
        else:
            taus = dm.site_reader(part.site).meta_column("tau")[got]
            assert np.all(taus >= 0.6)
    # the sites take turns through the epoch (b's batches are not all at the end)
    b_at = [i for i, s in enumerate(sites_in_order) if s == "b"]
    assert b_at[0] < len(sites_in_order) // 2 < b_at[-1]


def test_many__an_sae_of_a_grid_equals_the_same_sae_trained_alone(two_sites, tmp_path):
    torch.set_num_threads(1)
    grid = _fit(two_sites, tmp_path / "grid", site=["a", "b"])
    alone = _fit(two_sites, tmp_path / "alone", site="b")
    assert [p.name for p in grid.saved] == ["a", "b"]
    _same_weights(SAE.from_pretrained(grid.saved[1]), SAE.from_pretrained(alone.saved[0]))


def test_many__resumed_mid_epoch_a_grid_reaches_the_uninterrupted_weights(two_sites, tmp_path):
    torch.set_num_threads(1)
    grid = {"site": ["a", "b"], "window": ["early", None]}
    full = _fit(two_sites, tmp_path / "full", **grid)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(two_sites, tmp_path / "part", kill_at=22, **grid)
    ckpt = tmp_path / "part" / "ckpt" / "step=20.ckpt"  # in the second epoch
    resumed = _fit(two_sites, tmp_path / "resumed", ckpt_path=str(ckpt), **grid)
    for a, b in zip(full.saved, resumed.saved):
        _same_weights(SAE.from_pretrained(a), SAE.from_pretrained(b))
    # a checkpoint of another grid is refused, naming both
    with pytest.raises(UsageError, match=r"the checkpoint trains the SAEs a__early, a, b__early, b; this command "
                                         r"trains a, b"):
        _fit(two_sites, tmp_path / "other", ckpt_path=str(ckpt), site=["a", "b"])


def test_many__training_statistics_of_each_sae_equal_a_separate_pass(two_sites, tmp_path):
    torch.set_num_threads(1)
    model = _fit(two_sites, tmp_path / "run", site=["a", "b"], window=["early", "late"], feature_stats=True)
    for path in model.saved:
        sae = SAE.from_pretrained(path)
        reader = ActivationDataModule(str(two_sites), site=sae.placement.site).reader
        got = S.FeatureStats.load(path / S.SAE_STATS_DIR)
        assert_stats_equal(got, S.compute_feature_stats(sae, reader, progress=False))


def _branch_store(root: Path, sites: list[str]) -> None:
    n = 3 * 2 * 4 * 16  # 3 steps x 2 branches x 4 positions x 16 images
    grid = np.indices((16, 3, 2, 4)).reshape(4, -1)
    meta = {"image": grid[0], "step": grid[1], "t": np.array([999, 500, 1])[grid[1]],
            "branch": np.array(["uncond", "cond"])[grid[2]], "i": grid[3] // 2, "j": grid[3] % 2}
    for s, site in enumerate(sites):
        write_synthetic_store(root, site, sparse_activations(n, 8, seed=s), meta, grid=(2, 2))


def test_many__the_shipped_tinaz_grid_trains_18_saes(tmp_path):
    import yaml

    from sae.cli import main

    cfg = yaml.safe_load((REPO / "configs/sae/tinaz-grid.yaml").read_text())
    _branch_store(tmp_path / "store", cfg["data"]["site"])
    rc = main(["--config", str(REPO / "configs/sae/tinaz-grid.yaml"), "--data.store", str(tmp_path / "store"),
               "--data.batch_size", "16", "--model.sae.num_latents", "16", "--model.sae.k", "2",
               "--model.init_samples", "64", "--model.recovered.images", "0", "--model.feature_stats", "false",
               "--trainer.logger", "false", "--trainer.max_epochs", "1", "--trainer.callbacks", "[]",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run")])
    assert rc == 0
    folders = sorted((tmp_path / "run" / "sae").iterdir())
    assert len(folders) == 18
    placed = {(s.placement.site, s.placement.window, s.placement.branch)
              for s in (SAE.from_pretrained(f) for f in folders)}
    assert len(placed) == 18 and {b for *_, b in placed} == {"cond", "uncond"}
    # one SAE of the folder by its site, window and branch; site and window alone are ambiguous
    site = cfg["data"]["site"][1]
    one = SAE.from_pretrained(tmp_path / "run" / "sae", site=site, window="late", branch="uncond")
    assert (one.placement.site, one.placement.window, one.placement.branch) == (site, "late", "uncond")
    with pytest.raises(FileNotFoundError, match="several SAEs match .*pick one by site, window and branch"):
        SAE.from_pretrained(tmp_path / "run" / "sae", site=site, window="late")


@pytest.mark.parametrize("data, message", [
    ({"site": "a", "saes": [{"site": "b"}]}, r"either as --data.saes or as --data.site"),
    ({"saes": []}, r"saes must be a non-empty list"),
    ({"saes": [{"site": "a", "layer": 3}]}, r"keys site, window, branch; got \{'site': 'a', 'layer': 3\}"),
    ({"site": ["a", "a"]}, r"lists the SAE a twice"),
    ({"site": ["a", "b"], "window": ["early", "dawn"]}, r"unknown timestep window 'dawn'"),
    ({"site": ["a", "c"]}, r"site 'c' is not in store .*valid sites: a, b"),
    ({"site": []}, r"site is an empty list"),
    ({"branch": ["cond", "both"], "site": "a"}, r"unknown branch 'both'; valid branches: uncond, cond"),
    ({"site": "a", "max_val_rows": 0}, r"max_val_rows must be an int >= 1, got 0"),
    ({"site": "a", "max_val_rows": -5}, r"max_val_rows must be an int >= 1, got -5"),
])
def test_bad_input__a_bad_grid_is_refused_in_one_line_before_any_work(two_sites, data, message):
    with pytest.raises(UsageError, match=message):
        ActivationDataModule(str(two_sites), **data).setup()


def test_bad_input__one_sae_attributes_of_a_grid_say_there_are_several(two_sites):
    dm = ActivationDataModule(str(two_sites), site=["a", "b"])
    with pytest.raises(UsageError, match=r"this run trains 2 SAEs \(a, b\)"):
        dm.reader  # noqa: B018


@pytest.mark.parametrize("argv, message", [
    (["analyze", "features", "x", "y", "--rows", "all"], "diffatlas analyze features: error: --rows must be one of site, trained, got 'all'"),
])
def test_bad_input__analyze_features_rows_names_the_valid_choices(argv, message, capsys):
    from diffatlas.cli import main

    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == message
