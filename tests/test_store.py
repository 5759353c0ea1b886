"""The activation store: safe writes, checksums, filters, shuffled batches, feature maps."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
from harvest_helpers import synthetic_rows

from activations import store as store_mod
from activations.store import (
    ActivationStore,
    ConfigMismatchError,
    CorruptShardError,
    SiteWriter,
    StoreError,
    StoreWriteError,
    make_meta,
    write_synthetic_store,
)

SITE = "mid_block.attentions.0"


@pytest.fixture
def synthetic(tmp_path):
    acts, meta = synthetic_rows(n_images=6, branches=(0, 1))
    reader = write_synthetic_store(tmp_path, SITE, acts, meta, grid=(4, 4), rows_per_shard=100)
    return tmp_path, acts, meta, reader


def test_rows_read_back_in_requested_order_with_their_meta(synthetic):
    root, acts, meta, _ = synthetic
    site = ActivationStore(root).site(SITE)
    idx = np.array([17, 3, 250, 99, 100, 575])
    x, m = site.read(idx)
    assert x.dtype == torch.float16 and x.shape == (6, 8)
    np.testing.assert_allclose(x.float().numpy(), acts[idx], atol=2e-3)
    for field in ("image", "step", "t", "branch", "i", "j"):
        np.testing.assert_array_equal(m[field], meta[field][idx])
    np.testing.assert_allclose(m["tau"], meta["t"][idx] / 1000, rtol=1e-6)


def test_manifest_records_shards_rows_and_checksums(synthetic):
    root, acts, _, reader = synthetic
    man = json.loads((root / SITE / "manifest.json").read_text())
    assert man["site"] == SITE and man["width"] == 8 and man["grid"] == [4, 4] and man["dtype"] == "float16"
    assert sum(s["rows"] for s in man["shards"]) == len(acts) == reader.num_rows
    assert all(len(s["sha256"]["acts"]) == 64 for s in man["shards"])
    assert not list((root / SITE).glob("*.tmp*"))


def test_select_filters_by_window_branch_images_and_steps(synthetic):
    _, _, meta, site = synthetic
    t, br, img = meta["t"], meta["branch"], meta["image"]
    np.testing.assert_array_equal(site.select(window="early"), np.flatnonzero(t >= 600))
    np.testing.assert_array_equal(site.select(window="middle"), np.flatnonzero((t >= 200) & (t < 600)))
    np.testing.assert_array_equal(site.select(window="late"), np.flatnonzero(t < 200))
    np.testing.assert_array_equal(site.select(window={"tau": [0.4, 1.0]}, branch="uncond"), np.flatnonzero((t >= 400) & (br == 0)))
    np.testing.assert_array_equal(site.select(images=[1, 4], steps=[2]), np.flatnonzero(np.isin(img, [1, 4]) & (meta["step"] == 2)))


def test_window_boundaries_follow_the_design():
    acts = np.zeros((4, 2), np.float32)
    meta = {"t": np.array([1000, 600, 599, 200])}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        site = write_synthetic_store(d, "s", acts, meta)
        assert site.select(window="early").tolist() == [0, 1]
        assert site.select(window="middle").tolist() == [2, 3]
        assert site.select(window="late").tolist() == []


def test_unknown_window_and_branch_name_the_valid_choices(synthetic):
    site = synthetic[3]
    with pytest.raises(ValueError, match="early, middle, late"):
        site.select(window="earli")
    with pytest.raises(ValueError, match="uncond, cond"):
        site.select(branch="conditional")


def test_iter_batches_yields_every_row_once_and_mixes_images(synthetic):
    _, acts, meta, site = synthetic
    seen, first_batch_images = [], None
    for x, m in site.iter_batches(32, shuffle_buffer=200, seed=1, chunk_rows=16):
        assert x.shape[1] == 8 and x.dtype == torch.float16
        if first_batch_images is None:
            first_batch_images = set(m["image"].tolist())
        seen.append(np.stack([m["image"], m["step"], m["branch"], m["i"], m["j"]], 1))
    seen = np.concatenate(seen)
    assert len(seen) == len(acts)
    assert len(np.unique(seen, axis=0)) == len(acts)
    assert len(first_batch_images) > 1  # a batch is not one image's correlated tokens


def test_iter_batches_on_a_selection_without_shuffle_keeps_store_order(synthetic):
    site = synthetic[3]
    sel = site.select(branch="cond")
    got = np.concatenate([m["branch"] for _, m in site.iter_batches(50, indices=sel, shuffle_buffer=0)])
    assert len(got) == len(sel) and (got == 1).all()
    x, _ = next(site.iter_batches(len(sel), indices=sel, shuffle_buffer=0))
    torch.testing.assert_close(x, site.read(sel)[0])


def test_ranks_get_disjoint_equal_shares(synthetic):
    site = synthetic[3]
    n = site.num_rows
    shares = []
    for rank in range(3):
        batches = list(site.iter_batches(10, rank=rank, world_size=3, drop_last=True, shuffle_buffer=64, seed=5))
        assert all(len(x) == 10 for x, _ in batches)
        shares.append(np.concatenate([np.stack([m["image"], m["step"], m["branch"], m["i"], m["j"]], 1) for _, m in batches]))
    assert len({len(s) for s in shares}) == 1
    allrows = np.concatenate(shares)
    assert len(np.unique(allrows, axis=0)) == len(allrows) <= n


def test_feature_map_rebuilds_the_spatial_map(synthetic):
    _, acts, meta, site = synthetic
    fm = site.feature_map(image=2, step=1, branch="cond")
    assert fm.shape == (4, 4, 8)
    rows = np.flatnonzero((meta["image"] == 2) & (meta["step"] == 1) & (meta["branch"] == 1))
    expect = acts[rows].reshape(4, 4, 8)
    np.testing.assert_allclose(fm.float().numpy(), expect, atol=2e-3)
    with pytest.raises(KeyError, match="no rows"):
        site.feature_map(image=99, step=0)


def test_feature_map_marks_unharvested_positions_nan(tmp_path):
    acts = np.ones((2, 3), np.float32)
    site = write_synthetic_store(tmp_path, "s", acts, {"image": [0, 0], "i": [0, 1], "j": [1, 0]}, grid=(2, 2))
    fm = site.feature_map(0, 0)
    assert torch.isnan(fm[0, 0]).all() and torch.isnan(fm[1, 1]).all() and (fm[0, 1] == 1).all()


def test_unknown_site_lists_valid_sites_and_closest(synthetic):
    root = synthetic[0]
    with pytest.raises(KeyError) as err:
        ActivationStore(root).site("mid_block.attention.0")
    assert "Closest: mid_block.attentions.0" in str(err.value) and "Valid sites" in str(err.value)


def test_corrupted_shard_is_detected_by_checksum_and_named(synthetic):
    root = synthetic[0]
    path = root / SITE / "shard-000002.acts.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="shard-000002"):
        ActivationStore(root, verify=True)
    ActivationStore(root).site(SITE).read([0])  # other shards stay readable


def test_truncated_shard_is_named_on_read(synthetic):
    root = synthetic[0]
    path = root / SITE / "shard-000001.meta.npy"
    path.write_bytes(path.read_bytes()[:200])
    site = ActivationStore(root).site(SITE)
    with pytest.raises(CorruptShardError, match="shard-000001"):
        site.read([150])


def test_different_config_is_refused_naming_the_fields(tmp_path):
    hdr = {"model": "toy", "config": {"steps": 20, "branch": "cond", "seed": 0}}
    SiteWriter(tmp_path, SITE, width=4, grid=(2, 2), header=hdr)
    SiteWriter(tmp_path, SITE, width=4, grid=(2, 2), header=hdr)  # same config: resumes
    bad = {"model": "toy", "config": {"steps": 10, "branch": "both", "seed": 0}}
    with pytest.raises(ConfigMismatchError) as err:
        SiteWriter(tmp_path, SITE, width=4, grid=(2, 2), header=bad)
    assert "steps: 20 -> 10" in str(err.value) and "branch: 'cond' -> 'both'" in str(err.value)
    assert "seed" not in str(err.value)
    with pytest.raises(ConfigMismatchError, match="model: 'toy' -> 'sd-1.4'"):
        SiteWriter(tmp_path, SITE, width=4, grid=(2, 2), header={**hdr, "model": "sd-1.4"})


def test_a_finished_shard_is_never_written_twice(tmp_path):
    w = SiteWriter(tmp_path, SITE, width=2, grid=(1, 1))
    w.write_shard(0, np.zeros((3, 2)), make_meta(3))
    assert w.finished() == {0}
    with pytest.raises(StoreError, match="already finished"):
        w.write_shard(0, np.zeros((3, 2)), make_meta(3))


def test_full_disk_keeps_finished_shards_and_leaves_no_partial_files(tmp_path, monkeypatch):
    w = SiteWriter(tmp_path, SITE, width=2, grid=(1, 1))
    w.write_shard(0, np.ones((3, 2)), make_meta(3))
    real = store_mod._save_npy

    def full(path, array):
        real(path, array[:1])  # something reached the disk before it filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "_save_npy", full)
    with pytest.raises(StoreWriteError, match="disk is full") as err:
        w.write_shard(1, np.ones((3, 2)), make_meta(3))
    assert "shard-000001" in str(err.value)
    monkeypatch.setattr(store_mod, "_save_npy", real)
    assert not list((tmp_path / SITE).glob("*.tmp*"))
    site = ActivationStore(tmp_path, verify=True).site(SITE)
    assert site.num_rows == 3
    w.write_shard(1, np.ones((3, 2)), make_meta(3))  # after freeing space: resumes
    assert ActivationStore(tmp_path, verify=True).site(SITE).num_rows == 6


def test_files_not_in_the_manifest_are_invisible(tmp_path):
    w = SiteWriter(tmp_path, SITE, width=2, grid=(1, 1))
    w.write_shard(0, np.ones((3, 2)), make_meta(3))
    # a crash after the rename but before the manifest update leaves files without a record
    (tmp_path / SITE / "shard-000001.acts.npy").write_bytes(b"junk")
    assert ActivationStore(tmp_path).site(SITE).num_rows == 3
    w.write_shard(1, np.ones((2, 2)), make_meta(2))  # a rerun rewrites it
    assert ActivationStore(tmp_path, verify=True).site(SITE).num_rows == 5


def test_wrong_shapes_are_rejected_with_the_expected_shape(tmp_path):
    w = SiteWriter(tmp_path, SITE, width=4, grid=(1, 1))
    with pytest.raises(ValueError, match=r"\[rows, 4\]"):
        w.write_shard(0, np.zeros((3, 5)), make_meta(3))
    with pytest.raises(ValueError, match="unknown meta field"):
        make_meta(3, {"imgae": [0, 1, 2]})


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no activation store"):
        ActivationStore(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ActivationStore(tmp_path)


def flip_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_refused_on_read_by_default_naming_the_shard(synthetic):
    root = synthetic[0]
    flip_byte(root / SITE / "shard-000002.acts.npy")
    site = ActivationStore(root).site(SITE)  # the default checks each shard before its first use
    with pytest.raises(CorruptShardError) as err:
        site.read([250])
    assert "shard-000002.acts.npy" in str(err.value) and "rerun" in str(err.value)
    site.read([0])  # other shards stay readable
    ActivationStore(root, verify="never").site(SITE).read([250])  # skipping is explicit only
    with pytest.raises(CorruptShardError, match="shard-000002"):
        ActivationStore(root, verify=False).site(SITE).read([250])  # False no longer means "never"


def test_verified_shards_are_not_hashed_again_in_the_same_process(synthetic, monkeypatch):
    root = synthetic[0]
    ActivationStore(root).site(SITE).read([0])
    calls = []
    monkeypatch.setattr(store_mod, "sha256_file", lambda p, *a: calls.append(p) or "x")
    ActivationStore(root).site(SITE).read([1])
    assert calls == []


def test_bad_verify_mode_names_the_choices(synthetic):
    with pytest.raises(ValueError, match="lazy, eager, never"):
        ActivationStore(synthetic[0], verify="sometimes")


def test_a_late_writer_of_a_finished_shard_leaves_its_files_untouched(tmp_path, monkeypatch):
    a = SiteWriter(tmp_path, SITE, width=2, grid=(1, 1))
    b = SiteWriter(tmp_path, SITE, width=2, grid=(1, 1))
    # b checked before a recorded the shard: its early check passes, the locked one must not
    monkeypatch.setattr(b, "finished", lambda: set())
    a.write_shard(0, np.ones((3, 2)), make_meta(3))
    with pytest.raises(StoreError, match="finished by another writer"):
        b.write_shard(0, np.full((3, 2), 7.0), make_meta(3))
    ActivationStore(tmp_path, verify="eager").site(SITE)  # a's files still match their sha256
    assert not list((tmp_path / SITE).glob("*.tmp*"))


def test_read_only_manifest_is_one_clear_store_write_error(tmp_path, monkeypatch):
    w = SiteWriter(tmp_path, SITE, width=2, grid=(1, 1))

    def read_only(path, obj):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(store_mod, "_write_json_atomic", read_only)
    with pytest.raises(StoreWriteError, match="Permission denied.*rerun the same command") as err:
        w.write_shard(0, np.ones((3, 2)), make_meta(3))
    assert "shard-000000" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StoreWriteError, match="Permission denied"):
        SiteWriter(tmp_path, "other.site", width=2, grid=(1, 1))


def test_to_dataset_holds_every_row_and_metadata_column(synthetic, tmp_path):
    import datasets

    root, acts, meta, _ = synthetic
    site = ActivationStore(root).site(SITE)
    ds = site.to_dataset()
    assert isinstance(ds, datasets.Dataset) and len(ds) == len(acts)
    # the act column wraps the memory-mapped shard: no copy in RAM
    assert ds.data.table["act"].chunks[0].values.buffers()[1].address == site.acts_shard(0).ctypes.data
    assert ds.column_names == ["act", "image", "prompt", "seed", "step", "t", "tau", "branch", "i", "j"]
    assert ds.features["act"].feature.dtype == "float16" and ds.features["act"].length == 8
    table = ds.data.table
    np.testing.assert_allclose(np.stack(table["act"].to_numpy(zero_copy_only=False)), acts, atol=2e-3)
    for field in ("image", "step", "t", "branch", "i", "j"):
        np.testing.assert_array_equal(table[field].to_numpy(), meta[field])
    ds.save_to_disk(str(tmp_path / "saved"))
    back = datasets.load_from_disk(str(tmp_path / "saved"))
    assert back.data.table.equals(table)


def test_to_dataset_of_a_corrupted_shard_is_refused(synthetic):
    root = synthetic[0]
    flip_byte(root / SITE / "shard-000001.acts.npy")
    with pytest.raises(CorruptShardError, match="shard-000001"):
        ActivationStore(root).site(SITE).to_dataset()


def test_export_writes_the_folder_push_to_hub_uploads(synthetic, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    root, acts, meta, _ = synthetic
    out = ActivationStore(root).export(tmp_path / "exported")
    back = datasets.load_dataset(str(out), name=SITE, split="train", cache_dir=str(tmp_path / "cache"))
    assert len(back) == len(acts) and back.column_names[0] == "act"
    np.testing.assert_array_equal(np.array(back["image"]), meta["image"])

    uploaded = {}

    def upload_folder(self, repo_id, folder_path, repo_type):
        from pathlib import Path

        uploaded.update(repo_id=repo_id, repo_type=repo_type, files=sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()))
        return "https://huggingface.co/datasets/me/acts/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    ActivationStore(root).push_to_hub("me/acts")
    assert uploaded == {"repo_id": "me/acts", "repo_type": "dataset", "files": ["README.md", f"{SITE}/train-00000-of-00001.parquet"]}


def test_train_on_a_corrupted_shard__refused_naming_the_shard(tmp_path, capsys):
    from sae.cli import main
    from sae.synthetic import write_sparse_store

    write_sparse_store(tmp_path / "store", n=512, d=8, images=8)
    shard = sorted((tmp_path / "store" / SITE).glob("shard-*.acts.npy"))[0]
    flip_byte(shard)
    args = ["--data.store", str(tmp_path / "store"), "--data.batch_size", "64", "--data.branch", "cond",
            "--model.sae.num_latents", "32", "--model.sae.k", "4", "--model.init_samples", "256",
            "--model.recovered.images", "0", "--model.save_dir", str(tmp_path / "out"),
            "--trainer.logger", "false", "--trainer.max_steps", "2", "--trainer.val_check_interval", "null",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.callbacks", "[]"]
    try:
        rc = main(args)
    except CorruptShardError as e:  # however the CLI reports it, the shard is named and nothing trains
        message = str(e)
    else:
        assert rc != 0
        message = capsys.readouterr().err
    assert shard.name in message
    assert not (tmp_path / "out" / SITE).exists()


def test_store_without_store_json_but_with_sites__refused(tmp_path):
    from activations.store import check_store_record, store_record

    SiteWriter(tmp_path, SITE, width=2, grid=(1, 1))  # an older harvest's site
    with pytest.raises(ConfigMismatchError, match="no store.json"):
        check_store_record(tmp_path, store_record({"seed": 0, "sites": [SITE]}, "rev", {"threads": 1}))


def test_store_record_is_written_once_and_checked_after(tmp_path):
    from activations.store import check_store_record, store_record

    record = store_record({"seed": 0, "sites": ["a"]}, "rev", {"threads": 1})
    check_store_record(tmp_path, record, saved_config="seed: 0\n")
    check_store_record(tmp_path, store_record({"seed": 0, "sites": ["b"]}, "rev", {"threads": 1}))  # sites may differ
    with pytest.raises(ConfigMismatchError, match=r"seed: 0 -> 5.*numerics.threads: 1 -> 2"):
        check_store_record(tmp_path, store_record({"seed": 5, "sites": ["a"]}, "rev", {"threads": 2}))
    assert (tmp_path / "harvest.yaml").read_text() == "seed: 0\n"


def test_store_record__read_through_the_store_and_empty_without_one(synthetic):
    from activations.store import store_record

    root = synthetic[0]
    assert ActivationStore(root).record() == {}  # a synthetic store has no harvest config
    record = store_record({"seed": 0, "sites": [SITE]}, "rev", {"threads": 1})
    (root / "store.json").write_text(json.dumps(record))
    assert ActivationStore(root).record() == record
    (root / "store.json").write_text("{")
    with pytest.raises(StoreError, match="store.json is not valid JSON"):
        ActivationStore(root).record()
