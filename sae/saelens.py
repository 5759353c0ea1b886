"""Writing an SAE in SAELens' file layout, so that SAELens users (and its dashboards) open ours.

SAELens v6 keeps ``sae_weights.safetensors`` with ``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec``
[d_sae, d_in], ``b_dec`` (+ ``threshold`` for JumpReLU) and a ``cfg.json`` naming the
architecture, ``d_in``, ``d_sae`` and the hook in ``metadata``. Our forward pass is theirs with
``apply_b_dec_to_input``: pre = (x − b_dec) W_enc + b_enc. BatchTopK runs at inference as a
JumpReLU whose threshold is the same for every latent (Bussmann et al. 2024), which is how it is
written. ``sae_lens.SAE.load_from_disk(path)`` loads the folder (tested in the bench extra), and
``SAE.from_pretrained(path)`` loads it back (``to_sparsify``): ``metadata.diffatlas`` holds our
whole cfg.json, so the same architecture and placement come back; another SAELens folder loads by
its own fields (standard -> relu, topk, jumprelu; the hook name as the site).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.errors import UsageError
from sae.config import Placement

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
            "diffatlas": {**sae.cfg.to_dict(int(sae.d_in)), **placed.to_dict()},  # our cfg.json, for loading back
        },
    }
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    if sparsity is not None:
        save_file({"sparsity": sparsity.detach().float().contiguous().cpu()}, str(path / SPARSITY_FILE))
    return path


# SAELens' architecture -> ours (its "standard" SAE is a ReLU SAE)
FROM_LENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
REQUIRED = ("architecture", "d_in", "d_sae", "apply_b_dec_to_input", "normalize_activations")


def to_sparsify(cfg_path: Path, data: dict, tensors: dict[str, torch.Tensor], weights_path: Path):
    """A SAELens folder's cfg.json and tensors as the sparsify-layout config and tensors that
    ``SparseCoder.from_pretrained`` reads; returns (config dict, tensors). A missing field or
    tensor, or a setting our forward pass cannot reproduce, is a UsageError naming the file."""
    for name in REQUIRED:
        if name not in data:
            raise UsageError(f"{cfg_path} has no field {name!r}, which a SAELens SAE's cfg.json holds")
    if data["apply_b_dec_to_input"] is not True:
        raise UsageError(f"{cfg_path}: apply_b_dec_to_input is {data['apply_b_dec_to_input']!r}; diffatlas SAEs subtract "
                         "b_dec from their input (valid: true)")
    if data["normalize_activations"] != "none":
        raise UsageError(f"{cfg_path}: normalize_activations is {data['normalize_activations']!r}; valid: none (diffatlas "
                         "folds its input scale into the weights)")
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise UsageError(f"{cfg_path}: metadata is a {type(meta).__name__}, not a JSON object")
    ours = meta.get("diffatlas") if isinstance(meta.get("diffatlas"), dict) else {}
    if "num_latents" in ours:  # written by diffatlas: its own cfg.json
        out = dict(ours)
    else:
        lens = data["architecture"]
        if lens not in FROM_LENS:
            raise UsageError(f"{cfg_path}: SAELens architecture {lens!r} has no diffatlas counterpart; valid: "
                             f"{', '.join(FROM_LENS)}")
        out = {"architecture": FROM_LENS[lens], "d_in": data["d_in"], "num_latents": data["d_sae"],
               "site": meta.get("hook_name"), "model": meta.get("model_name")}
        if "k" in data:
            out["k"] = data["k"]
        out.update({k: ours[k] for k in Placement.KEYS if k in ours})
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in tensors]
    if missing or tensors["W_enc"].ndim != 2:
        raise UsageError(f"{weights_path} is not a SAELens SAE: it lacks {', '.join(missing) or 'a 2-D W_enc'} "
                         f"(tensors: {', '.join(sorted(tensors))})")
    renamed = {k: v for k, v in tensors.items() if k not in ("W_enc", "b_enc")}
    renamed["encoder.weight"] = tensors["W_enc"].T.contiguous()  # [d_in, d_sae] -> [d_sae, d_in]
    renamed["encoder.bias"] = tensors["b_enc"]
    if out.get("architecture") == "batchtopk" and "threshold" in renamed:
        threshold = renamed["threshold"].reshape(-1)
        if threshold.numel() == 0 or not bool((threshold == threshold[0]).all()):
            raise UsageError(f"{weights_path}: a BatchTopK SAE has one threshold for every latent, the file holds "
                             "different ones")
        renamed["threshold"] = threshold[0].clone()  # written per latent for SAELens' JumpReLU
    return out, renamed
