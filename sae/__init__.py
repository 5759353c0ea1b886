"""sae: sparse autoencoders on denoiser (U-Net and MMDiT) activations.

Public API (imported lazily, so that ``import sae`` does not pay for Lightning):

* ``SAE`` / ``SparseCoder``: the base class; ``SAE.from_pretrained(path_or_hub_id, site=...)``,
  ``save_pretrained``, ``push_to_hub``, ``encode`` / ``decode`` / ``forward``
* ``SparseCoderConfig``: architecture, size and sparsity settings (``cfg.json``)
* ``register_architecture``, ``get_architecture``, ``available_architectures``: the registry
  (built in: relu, topk, batchtopk, jumprelu)
* ``LitSAE``, ``RecoveredConfig``: the LightningModule; ``ActivationDataModule``: the data
* ``train_quick``: train one SAE on a store from Python (for the demo and notebooks)
* ``main``: the ``diffatlas train`` LightningCLI
"""

from __future__ import annotations

from common.lazy import lazy_exports

_EXPORTS = {
    "SAE": "sae.sparse_coder",
    "SparseCoder": "sae.sparse_coder",
    "TrainContext": "sae.sparse_coder",
    "TrainOutput": "sae.sparse_coder",
    "Latents": "sae.latents",
    "SparseCoderConfig": "sae.config",
    "register_architecture": "sae.registry",
    "get_architecture": "sae.registry",
    "available_architectures": "sae.registry",
    "LitSAE": "sae.lit",
    "RecoveredConfig": "sae.lit",
    "ActivationDataModule": "sae.data",
    "train_quick": "sae.quick",
    "main": "sae.cli",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports('sae', _EXPORTS, globals())
