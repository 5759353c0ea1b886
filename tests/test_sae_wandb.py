"""Training logs the documented keys to an offline W&B run, including loss recovered on a U-Net."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
wandb = pytest.importorskip("wandb")

from sae.config import SparseCoderConfig  # noqa: E402
from sae.data import ActivationDataModule  # noqa: E402
from sae.lit import LitSAE, RecoveredConfig  # noqa: E402

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log of 32 KiB blocks
HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version

SITE = "down_blocks.2.attentions.0"  # 4x4 latent patches per image step in the toy model


def read_wandb_records(path: Path):
    """Yield the protobuf Records of a .wandb transaction log (LevelDB log framing: per chunk a
    4-byte checksum, 2-byte little-endian length, 1-byte type 1=full 2=first 3=middle 4=last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def _complete_records(path: Path, timeout: float = 60.0) -> list:
    """The file's records once its 'exit' record is there: wandb's writer process may still be
    flushing for a moment after wandb.finish() returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def logged_keys(run_dir: Path) -> set[str]:
    keys: set[str] = set()
    files = sorted(run_dir.glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline run in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    for f in files:
        for rec in _complete_records(f):
            if rec.WhichOneof("record_type") != "history":
                continue
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                keys.add(key)
                if key.endswith("/_type") and "histogram" in item.value_json:
                    keys.add(key[: -len("/_type")])  # a wandb.Histogram is logged as a nested value
    return keys


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    from activations.config import HarvestConfig, PromptSource
    from activations.harvest import harvest
    from toyworld.model import build_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("harvest") / "store"
    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    cfg = HarvestConfig(model="toy", out=str(root), sites=[SITE],
                        prompts=PromptSource(kind="toyworld", num_prompts=6), num_inference_steps=5,
                        guidance_scale=1.0, batch_size=6, images_per_shard=6)
    harvest(cfg, pipe=pipe)
    return root, pipe


def _fit_logged(tmp_path, toy_store, monkeypatch, **data):
    """Train on the toy store with an offline W&B logger; returns (model, the keys it logged)."""
    from lightning.pytorch.loggers import WandbLogger

    root, pipe = toy_store
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    pl.seed_everything(0)
    dm = ActivationDataModule(str(root), **data, batch_size=32, val_fraction=0.34)
    model = LitSAE(SparseCoderConfig(architecture="topk", expansion_factor=2, k=8, dead_tokens_threshold=64),
                   lr=3e-3, lr_warmup_steps=2, init_samples=256, histogram_every_n_steps=3,
                   recovered=RecoveredConfig(images=2, timesteps=2), save_dir=str(tmp_path / "sae"))
    model.pipeline = pipe
    logger = WandbLogger(project="diffatlas-test", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2,
                         val_check_interval=3, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    wandb.finish()
    keys = logged_keys(tmp_path / "wandb")
    return model, keys


def test_wandb__offline_run_has_losses_metrics_sparsity_and_fraction_recovered(tmp_path, toy_store, monkeypatch):
    model, keys = _fit_logged(tmp_path, toy_store, monkeypatch)
    expected = {
        "losses/mse", "losses/auxk", "losses/total", "metrics/fvu", "metrics/l0", "metrics/mse",
        "sparsity/dead_fraction", "sparsity/dense_fraction", "sparsity/log10_feature_density",
        "sparsity/decoder_norm", "metrics/fraction_recovered", "metrics/fraction_recovered_mean_ablation",
        "metrics/denoising_loss/clean", "metrics/denoising_loss/sae",
    }
    assert expected <= keys, f"missing: {sorted(expected - keys)} in {sorted(keys)}"
    assert any(k.startswith("metrics/fvu/") for k in keys), sorted(keys)  # per timestep window
    rec = model.last_val_metrics
    assert torch.isfinite(torch.tensor(rec["metrics/fraction_recovered"]))
    assert (tmp_path / "sae" / SITE / "sae.safetensors").exists()


def test_wandb__a_run_of_several_saes_logs_each_under_its_own_name(tmp_path, toy_store, monkeypatch):
    model, keys = _fit_logged(tmp_path, toy_store, monkeypatch, window=["early", "late"])
    for name in (f"{SITE}__early", f"{SITE}__late"):
        expected = {f"{name}/{key}" for key in ("losses/total", "metrics/fvu", "sparsity/log10_feature_density",
                                                "metrics/fraction_recovered", "metrics/denoising_loss/sae")}
        assert expected <= keys, f"missing: {sorted(expected - keys)} in {sorted(keys)}"
        assert torch.isfinite(torch.tensor(model.last_val_metrics[f"{name}/metrics/fraction_recovered"]))
        assert (tmp_path / "sae" / name / "sae.safetensors").exists()
    assert "metrics/fvu" not in keys  # nothing logged outside the SAEs' namespaces
