"""`sae.train_quick`: one call trains, saves and reports (what `diffatlas demo` uses)."""

from __future__ import annotations

from sae import SAE, train_quick
from sae.synthetic import write_sparse_store


def test_train_quick__saves_a_loadable_sae_and_returns_validation_metrics(tmp_path):
    write_sparse_store(tmp_path / "store", n=1024, d=8, images=8)
    path, metrics = train_quick(str(tmp_path / "store"), out=str(tmp_path / "out"), k=4, expansion_factor=4,
                                batch_size=128, epochs=1, wandb=False, recovered_images=0)
    assert path == tmp_path / "out" / "mid_block.attentions.0"
    assert SAE.from_pretrained(path).num_latents == 32
    assert 0 <= metrics["metrics/fvu"] < 2 and metrics["metrics/l0"] <= 4
