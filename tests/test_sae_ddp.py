"""Two-process CPU DDP: BatchTopK selects over the global batch, and a DDP run equals one process
training on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae.batchtopk import BatchTopKSAE
from sae.config import SparseCoderConfig
from sae.sparse_coder import SAE, TrainContext
from sae.synthetic import write_sparse_store

REPO = Path(__file__).resolve().parent.parent


def _selection_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        sae = BatchTopKSAE(SparseCoderConfig(architecture="batchtopk", num_latents=32, k=3), 8)
        x = torch.randn(2 * 16, 8, generator=torch.Generator().manual_seed(1))
        local = x[rank * 16 : (rank + 1) * 16]
        out = sae.train_step(local, TrainContext(process_group=dist.group.WORLD))
        torch.save({"dense": out.latents.to_dense(), "threshold": sae.threshold.clone()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batchtopk__ddp_selection_equals_global_batch_selection(tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_selection_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    sae = BatchTopKSAE(SparseCoderConfig(architecture="batchtopk", num_latents=32, k=3), 8)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    ref = sae.train_step(x, TrainContext()).latents.to_dense()
    got = torch.cat([torch.load(tmp_path / f"rank{r}.pt")["dense"] for r in range(2)])
    torch.testing.assert_close(got, ref)
    assert int((ref > 0).sum()) == 3 * 32  # k per token on average over the global batch
    torch.testing.assert_close(torch.load(tmp_path / "rank0.pt")["threshold"], sae.threshold)


def _train(tmp_path: Path, name: str, store: Path, *, devices: int, batch: int, site: str = "null",
           strategy: str = "ddp", ok: bool = True) -> Path | str:
    out = tmp_path / name
    cmd = [
        sys.executable, "-m", "sae.cli",
        "--config", str(REPO / "configs/sae/batchtopk.yaml"),
        "--data.store", str(store), "--data.batch_size", str(batch), "--data.branch", "null", "--data.site", site,
        "--model.sae.num_latents", "32", "--model.sae.k", "4", "--model.sae.dead_tokens_threshold", "512",
        "--model.lr", "0.01", "--model.lr_warmup_steps", "2", "--model.init_samples", "512",
        "--model.recovered.images", "0", "--model.save_dir", str(out / "sae"),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        "--trainer.strategy", strategy if devices > 1 else "auto",
        "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
        "--trainer.max_epochs", "1", "--trainer.val_check_interval", "null", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if not ok:
        assert proc.returncode != 0
        return proc.stderr
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "sae"


def test_ddp__two_cpu_processes_train_like_one_process_on_the_global_batch(tmp_path):
    store = tmp_path / "store"
    write_sparse_store(store, n=1024, d=8, images=8)
    ddp = SAE.from_pretrained(_train(tmp_path, "ddp", store, devices=2, batch=32) / "mid_block.attentions.0")
    single = SAE.from_pretrained(_train(tmp_path, "single", store, devices=1, batch=64) / "mid_block.attentions.0")
    for (name, a), (_, b) in zip(ddp.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name}: DDP differs from one process")


def test_ddp__a_run_of_several_saes_trains_each_like_one_process(tmp_path):
    store = tmp_path / "store"
    write_sparse_store(store, site="a", n=1024, d=8, images=8, seed=1)
    write_sparse_store(store, site="b", n=512, d=8, images=8, seed=2)
    ddp = _train(tmp_path, "ddp", store, devices=2, batch=32, site="[a, b]", strategy="ddp_find_unused_parameters_true")
    single = _train(tmp_path, "single", store, devices=1, batch=64, site="[a, b]")
    for site in ("a", "b"):
        got, want = SAE.from_pretrained(ddp / site), SAE.from_pretrained(single / site)
        for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{site} {name}: DDP differs from one process")
    # plain ddp would hang or fail on the SAEs a batch does not train: refused in one line
    err = _train(tmp_path, "plain", store, devices=2, batch=32, site="[a, b]", ok=False)
    assert "needs --trainer.strategy ddp_find_unused_parameters_true" in err
