"""Writing an SAE in SAELens' file layout, so that SAELens users (and its dashboards) open ours.

SAELens v6 keeps ``sae_weights.safetensors`` with ``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec``
[d_sae, d_in], ``b_dec`` (+ ``threshold`` for JumpReLU) and a ``cfg.json`` naming the
architecture, ``d_in``, ``d_sae`` and the hook in ``metadata``. Our forward pass is theirs with
``apply_b_dec_to_input``: pre = (x − b_dec) W_enc + b_enc. BatchTopK runs at inference as a
JumpReLU whose threshold is the same for every latent (Bussmann et al. 2024), which is how it is
written. ``sae_lens.SAE.load_from_disk(path)`` loads the folder (tested in the bench extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
CONFIG_FILE = "cfg.json"


def save_saelens(sae, path: str | Path, *, sparsity: torch.Tensor | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arch = sae.cfg.architecture
    tensors = {
        "W_enc": sae.encoder.weight.detach().T.contiguous().cpu(),
        "b_enc": sae.encoder.bias.detach().contiguous().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().contiguous().cpu(),
    }
    extra: dict = {}
    if arch == "topk":
        lens_arch, extra["k"] = "topk", int(sae.cfg.k)
    elif arch == "relu":
        lens_arch = "standard"
    elif arch in ("jumprelu", "batchtopk"):
        lens_arch = "jumprelu"
        threshold = sae.threshold.detach().cpu()
        tensors["threshold"] = (threshold.expand(sae.num_latents) if threshold.numel() == 1 else threshold).contiguous().clone()
    else:
        raise ValueError(f"no SAELens layout for architecture {arch!r}; valid: topk, relu, jumprelu, batchtopk")
    save_file(tensors, str(path / WEIGHTS_FILE))
    placed = sae.placement
    cfg = {
        "architecture": lens_arch,
        "d_in": int(sae.d_in),
        "d_sae": int(sae.num_latents),
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # our normaliser is folded into the weights
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "sae_lens_version": "6.0.0",  # the layout version written here (SAELens reads older ones differently)
            "model_name": placed.model,
            "hook_name": placed.site,
            "diffatlas": {"architecture": arch, **placed.to_dict()},
        },
    }
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    if sparsity is not None:
        save_file({"sparsity": sparsity.detach().float().contiguous().cpu()}, str(path / SPARSITY_FILE))
    return path
