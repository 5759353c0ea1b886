"""Load a text-to-image pipeline (a registered model name (``toy``), a local diffusers folder, or a hub id),
set its scheduler, and fingerprint its U-Net weights (what harvests, SAEs and steering compare)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from common import plugins
from common.errors import UsageError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """The model is neither bundled, nor a local folder, nor reachable on the hub."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _not_found(name: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r} could not be found offline ({why}). Download it on a machine with access, "
        f"e.g. `huggingface-cli download {name} --local-dir /path/to/model`, then pass the local "
        f"folder: load_pipeline('/path/to/model'). Registered models: {', '.join(plugins.names(plugins.MODELS)) or 'none'}."
    )


def resolve_model(name_or_path: str | os.PathLike) -> Path | str:
    """Map a model name to a local folder, or return the hub id unchanged (registered names are
    loaded by their plugin, see ``load_pipeline``)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        raise ModelNotFoundError(
            f"model {name!r} is neither a registered model ({', '.join(plugins.names(plugins.MODELS)) or 'none'}), "
            f"nor a diffusers folder, nor a hub id like 'org/name' (registered models come from common.plugins)"
        )
    return name


def load_pipeline(name_or_path: str | os.PathLike = "toy", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None):
    """Load a diffusers text-to-image pipeline.

    ``name_or_path``: a registered model name (``toy``, the bundled model; see
    ``common.plugins``), a local diffusers folder, or a hub id (read from the local cache;
    downloaded only when the hub is reachable). ``device`` defaults to CUDA when available,
    ``dtype`` to float16 on CUDA and float32 on the CPU.
    """
    from diffusers import DiffusionPipeline

    from common.quiet import quiet_libraries

    quiet_libraries()  # no loading bars or set-up notices, also when called from Python
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    plugin = plugins.model_plugin(str(name_or_path)) if not isinstance(name_or_path, Path) else None
    if plugin is not None:
        return plugin.load(device=device, dtype=dtype)
    source = resolve_model(name_or_path)
    kwargs = {"dtype": dtype}
    if isinstance(source, str):  # a hub id: the cache first, the network only if it answers
        try:
            pipe = DiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
        except (OSError, ValueError) as cached_error:
            if _offline():
                raise _not_found(source, "HF_HUB_OFFLINE is set and it is not in the local cache") from cached_error
            if not _hub_reachable():
                raise _not_found(source, "not in the local cache and the hub cannot be reached") from cached_error
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    else:
        pipe = DiffusionPipeline.from_pretrained(source, **absent_components(source), **kwargs)
    return pipe.to(device)


def absent_components(folder: str | os.PathLike) -> dict:
    """{name: None} for each component a saved pipeline lists as ``[null, null]`` (e.g. an SD3
    folder without T5): diffusers loads such a folder only when they are passed explicitly."""
    index = Path(folder) / "model_index.json"
    if not index.exists():
        return {}
    listed = json.loads(index.read_text())
    return {name: None for name, value in listed.items()
            if not name.startswith("_") and isinstance(value, list) and value == [None, None]}


def _shipped(pipe) -> dict:
    """The diffatlas.json a model folder ships with (the toy models'), or {}."""
    folder = Path(getattr(pipe, "config", {}).get("_name_or_path", "") or "")
    meta = folder / "diffatlas.json"
    return json.loads(meta.read_text()) if meta.exists() else {}


def model_defaults(pipe) -> dict:
    """Sampling defaults a model ships with (the toy's diffatlas.json), else SD's usual ones."""
    data = _shipped(pipe)
    if data:
        return {"guidance_scale": data["guidance_scale"], "num_inference_steps": data["num_inference_steps"]}
    return {"guidance_scale": 7.5, "num_inference_steps": 50}


def call_options(pipe) -> dict:
    """Keyword arguments every call of ``pipe`` (generation and ``encode_prompt``) takes, beyond
    prompts, steps and guidance: ``max_sequence_length`` where the pipeline has one (SD3, FLUX),
    from the model's diffatlas.json ``"call"`` (the toy MMDiT: 0, no T5 tokens), else the
    pipeline's own default (SD3 256, FLUX 512). The one place that decides an MMDiT's text length."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    options = {}
    if "max_sequence_length" in params:
        options["max_sequence_length"] = params["max_sequence_length"].default
    options.update(_shipped(pipe).get("call", {}))
    return options


def model_fingerprint(unet) -> str:
    """A short hash of the U-Net's first weights: tells retrained or different weights apart."""
    first = next(unet.parameters()).detach().float().cpu().contiguous()
    return hashlib.sha256(first.numpy().tobytes()).hexdigest()[:16]


def set_scheduler(pipe, name: str | None) -> None:
    """Replace the pipeline's scheduler by the diffusers class ``name`` (None keeps it), with the same config."""
    if name is None:
        return
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        valid = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise UsageError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(valid)}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
