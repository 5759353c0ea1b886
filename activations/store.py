"""The on-disk activation store: writing shards safely and reading them memory-mapped.

Layout of one harvest folder::

    <root>/prompts.jsonl                 one line per image: image, prompt index, prompt text, seed
    <root>/images/<image>.png            final images (plus <image>.json ground truth for toyworld)
    <root>/<site>/manifest.json          header + finished shards (the only source of truth)
    <root>/<site>/shard-000007.acts.npy  float16 [rows, width]
    <root>/<site>/shard-000007.meta.npy  structured [rows] with META_DTYPE

A row is one token: one spatial position (i, j) of one site at one step of one image and branch.

Safety rules, in the order they happen when a shard is written:
  1. both files are written under ``.tmp`` names, their sha256 computed while writing;
  2. under the site's file lock: the shard is checked not to be finished (by another writer
     meanwhile), its files are renamed to their final names, and its record (rows, checksums) is
     appended to ``manifest.json`` by writing a temporary manifest (fsynced) and renaming it over
     the old one. Doing all three under one lock means a late writer can never replace files whose
     sha256 another writer has recorded.
A shard that is not in the manifest does not exist for readers, so a crash at any point leaves the
store readable and a rerun rewrites exactly the unfinished shards. Several processes (ranks) may
write shards of the same site at once; the lock serialises their manifest updates.

The store as a whole has one configuration: ``<root>/store.json`` holds the harvest config minus
its list of sites, its hash, the model revision and the numerics (device, dtype, threads, library
versions); ``<root>/harvest.yaml`` is the config that created the store (what to rerun to rebuild a
shard). Every later harvest into the folder is checked against store.json (``check_store_record``).

Reading verifies each shard's sha256 once per process, on its first use (``verify="lazy"``, the
default; the verdict is cached by path, size and mtime); ``verify="eager"`` (or True) checks every
shard when the store is opened; only ``verify="never"`` skips the check.

Writing a store from arbitrary arrays (for tests of code that reads stores)::

    from activations.store import write_synthetic_store
    reader = write_synthetic_store(root, "mid_block.attentions.0", acts,          # [n, width]
                                   meta={"image": img_ids, "step": steps, "t": ts,
                                         "i": ii, "j": jj}, grid=(8, 8))
    # missing meta fields get defaults: image=arange(n), prompt=image, seed=0, step=0, t=0,
    # tau=t/num_train_timesteps, branch="cond", i=j=0. Returns a SiteReader.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import hashlib
import json
import math
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activations.timesteps import BRANCHES, branch_code, parse_when
from common.errors import ReportedError, UnknownNameError, UsageError

FORMAT_VERSION = 2  # 2: one store config (store.json), manifests hold it without sites, numerics
ACT_DTYPE = np.float16
META_DTYPE = np.dtype(
    [
        ("image", "<i8"),
        ("prompt", "<i8"),
        ("seed", "<i8"),
        ("step", "<i4"),
        ("t", "<i4"),
        ("tau", "<f4"),
        ("branch", "i1"),  # index into BRANCHES: 0 = uncond, 1 = cond
        ("i", "<i4"),
        ("j", "<i4"),
    ]
)
META_FIELDS = META_DTYPE.names
MANIFEST = "manifest.json"
STORE_RECORD = "store.json"
HARVEST_CONFIG = "harvest.yaml"
VERIFY_MODES = ("lazy", "eager", "never")
_HOST = socket.gethostname().replace("-", "_")


def _tmp_suffix() -> str:
    """Temporary-file suffix naming the host and writer pid (so dead writers' files can be found)."""
    return f".tmp-{_HOST}-{os.getpid()}"


class StoreError(ReportedError, RuntimeError):
    """Base class of store errors."""


class ConfigMismatchError(StoreError):
    """A writer's header differs from the manifest already on disk."""


class CorruptShardError(StoreError):
    """A shard's bytes do not match the checksum recorded in the manifest."""


class StoreWriteError(StoreError):
    """Writing a shard failed (e.g. the disk is full); finished shards are untouched."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


# --------------------------------------------------------------------------------------------
# small file helpers


class _HashingWriter:
    """File-like object that forwards writes to a real file and hashes them on the way."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self._f.write(data)

    def flush(self):
        self._f.flush()


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as .npy to ``path``; return the sha256 of the bytes written.

    Not fsynced: a killed process loses nothing the kernel already has, and after a power cut a
    torn shard fails its checksum (the manifest, which is fsynced, holds it) and is named on resume.
    """
    with open(path, "wb") as f:
        hw = _HashingWriter(f)
        # np.save only calls .write on objects that are not real files, so every byte is hashed
        np.lib.format.write_array(hw, np.ascontiguousarray(array), allow_pickle=False)
    return hw.sha.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + _tmp_suffix())
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_error(what: str, path: Path, e: OSError) -> StoreWriteError:
    """One clear line for a failed write (full disk, read-only file or folder), no raw OSError."""
    reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return StoreWriteError(
        f"could not write {what} ({path}): {reason}. Finished shards are kept; fix the cause "
        f"(e.g. make the folder writable) and rerun the same command to resume."
    )


@contextlib.contextmanager
def _writing(what: str, path: Path):
    """Turn an OSError raised while writing ``what`` into a StoreWriteError."""
    try:
        yield
    except StoreError:
        raise
    except OSError as e:
        raise _write_error(what, path, e) from e


@contextlib.contextmanager
def _locked(directory: Path):
    """Exclusive lock on a site folder, held while its manifest is read-modified-written."""
    with open(directory / ".manifest.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts (``field: old -> new``)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_meta(n: int, fields: dict[str, Any] | None = None, num_train_timesteps: int = 1000) -> np.ndarray:
    """Build a META_DTYPE array of ``n`` rows; missing fields get the defaults of the module doc.

    ``branch`` may be given as codes (0/1) or names ("uncond"/"cond").
    """
    fields = dict(fields or {})
    unknown = set(fields) - set(META_FIELDS)
    if unknown:
        raise ValueError(f"unknown meta field(s) {sorted(unknown)}; valid fields: {', '.join(META_FIELDS)}")
    meta = np.zeros(n, dtype=META_DTYPE)
    meta["image"] = np.arange(n)
    meta["branch"] = branch_code("cond")
    for name, value in fields.items():
        value = np.asarray(value)
        if name == "branch" and value.dtype.kind in "US":
            value = np.vectorize(branch_code)(value)
        meta[name] = value
    if "prompt" not in fields:
        meta["prompt"] = meta["image"]
    if "tau" not in fields:
        meta["tau"] = meta["t"].astype(np.float64) / num_train_timesteps
    return meta


# --------------------------------------------------------------------------------------------
# checksums: the one place where a shard's files are compared with its manifest record

# (path, size, mtime_ns, sha256) of files found intact in this process: a file that changes
# changes its size or mtime, so a cached verdict is never stale in practice
_VERIFIED: set[tuple[str, int, int, str]] = set()


def rebuild_hint(root: Path, site: str) -> str:
    """The command that rebuilds a shard of ``site`` of the store at ``root``."""
    saved = root / HARVEST_CONFIG
    if saved.exists():
        return f"rerun `diffatlas harvest {saved} --sites '[{site}]'`"
    return "rerun the harvest that wrote it"


def verify_shard(directory: Path, record: dict, site: str) -> None:
    """Check both files of one shard against the sha256 of its manifest record.

    Raises CorruptShardError naming the shard file and how to rebuild it. Each file is hashed at
    most once per process while it keeps its size and mtime.
    """
    directory = Path(directory)
    for part in ("acts", "meta"):
        path = directory / f"{record['name']}.{part}.npy"
        expected = record["sha256"][part]
        try:
            st = path.stat()
        except FileNotFoundError:
            problem = "is missing"
        else:
            key = (str(path), st.st_size, st.st_mtime_ns, expected)
            if key in _VERIFIED:
                continue
            if sha256_file(path) == expected:
                _VERIFIED.add(key)
                continue
            problem = "does not match its sha256 in the manifest"
        raise CorruptShardError(
            f"shard {record['name']} of site {site} is corrupted: {path} {problem}. To rebuild it, delete "
            f"its record from {directory / MANIFEST} and its files, then {rebuild_hint(directory.parent, site)}."
        )


def _verify_mode(verify: bool | str) -> str:
    # False used to mean "never check"; reading unchecked data is now opt-in by name only
    mode = {True: "eager", False: "lazy"}.get(verify, verify) if isinstance(verify, bool) else verify
    if mode not in VERIFY_MODES:
        raise UsageError(f"verify must be one of {', '.join(VERIFY_MODES)} (or True/False), got {verify!r}")
    return mode


# --------------------------------------------------------------------------------------------
# the store's one configuration


def store_record(config: dict, model_revision: str | None, numerics: dict) -> dict:
    """What store.json holds: the content config without its sites, its hash, and what decides
    the numbers (every harvest into the store must agree on all of it)."""
    content = {k: v for k, v in config.items() if k != "sites"}
    return {
        "format": FORMAT_VERSION,
        "config": content,
        "config_hash": config_hash(content),
        "model_revision": model_revision,
        "numerics": dict(numerics),
    }


def check_store_record(root: str | os.PathLike, record: dict, saved_config: str | None = None) -> None:
    """Write ``record`` as the store's store.json, or check it against the one already there.

    A mismatch raises ConfigMismatchError naming every differing field. ``saved_config`` (YAML
    text) is written once as harvest.yaml, the config a rebuild reruns.
    """
    root = Path(root)
    with _writing("the store record", root / STORE_RECORD):
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            path = root / STORE_RECORD
            if not path.exists():
                legacy = next(root.glob(f"*/{MANIFEST}"), None)
                if legacy is not None:  # sites written before store.json existed: nothing to check against
                    raise ConfigMismatchError(
                        f"{root} holds sites (e.g. {legacy.parent.name}) but no {STORE_RECORD}: it was written by an "
                        f"older diffatlas whose configuration cannot be checked; harvest into another output folder."
                    )
                if saved_config is not None and not (root / HARVEST_CONFIG).exists():
                    (root / HARVEST_CONFIG).write_text(saved_config)
                _write_json_atomic(path, record)
                return
            existing = json.loads(path.read_text())
    problems = config_diff(existing.get("config", {}), record["config"])
    if existing.get("model_revision") != record["model_revision"]:
        problems.append(f"model_revision: {existing.get('model_revision')!r} -> {record['model_revision']!r}")
    problems += config_diff(existing.get("numerics", {}), record["numerics"], prefix="numerics.")
    if problems:
        raise ConfigMismatchError(
            f"{root} holds a harvest with a different configuration; a store has one configuration "
            f"for all its sites, so refusing to mix them. Differing fields (stored -> requested): "
            f"{'; '.join(problems)}. Use another output folder, or the stored configuration "
            f"({path}) to resume or add sites."
        )


# --------------------------------------------------------------------------------------------
# writing


class SiteWriter:
    """Writes the shards of one site of one harvest, safely and resumably.

    ``header`` holds the manifest's descriptive fields (model, model_revision, kind, timesteps,
    steps, num_train_timesteps, branch, config, config_hash, ...). Opening a site whose manifest
    exists checks that ``config_hash`` (and model/site/width) agree and otherwise raises
    ConfigMismatchError naming every differing field. Shards are identified by an integer index
    chosen by the caller (the harvester uses the chunk of images); ``finished()`` tells which
    indices are done so that a rerun skips them.
    """

    def __init__(self, root: str | os.PathLike, site: str, *, width: int, grid: Sequence[int], header: dict | None = None):
        self.root = Path(root)
        self.site = site
        self.dir = self.root / site
        self.width = int(width)
        header = dict(header or {})
        with _writing(f"the folder of site {site}", self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        header.setdefault("config", {})
        header.setdefault("config_hash", config_hash(header["config"]))
        header.setdefault("num_train_timesteps", 1000)
        self.header = {
            "format": FORMAT_VERSION,
            "site": site,
            "width": self.width,
            "grid": [int(g) for g in grid],
            "dtype": "float16",
            **header,
        }
        path = self.dir / MANIFEST
        with _writing(f"the manifest of site {site}", path), _locked(self.dir):
            if path.exists():
                self._check(json.loads(path.read_text()))
            else:
                _write_json_atomic(path, {**self.header, "shards": []})
        self._clean_temporaries()

    def _check(self, existing: dict) -> None:
        if existing.get("format") != FORMAT_VERSION:
            raise ConfigMismatchError(
                f"{self.dir / MANIFEST} has store format {existing.get('format')!r}, this diffatlas writes format "
                f"{FORMAT_VERSION}; refusing to mix them. Harvest into another output folder."
            )
        problems = []
        for key in ("model", "model_revision", "site", "width", "grid"):
            if key in self.header and existing.get(key) != self.header[key]:
                problems.append(f"{key}: {existing.get(key)!r} -> {self.header[key]!r}")
        if "numerics" in self.header:
            problems += config_diff(existing.get("numerics", {}), self.header["numerics"], prefix="numerics.")
        if existing.get("config_hash") != self.header["config_hash"]:
            problems += config_diff(existing.get("config", {}), self.header["config"])
            if not problems:
                problems.append(f"config_hash: {existing.get('config_hash')!r} -> {self.header['config_hash']!r}")
        if problems:
            raise ConfigMismatchError(
                f"{self.dir} holds a harvest with a different configuration; refusing to mix them. "
                f"Differing fields (stored -> requested): {'; '.join(problems)}. "
                f"Use another output folder, or the stored configuration to resume."
            )

    def _clean_temporaries(self) -> None:
        # A temporary file is never in the manifest; remove those left by dead writers of this
        # host. Files of live writers (other ranks) and of other hosts are left alone.
        for tmp in self.dir.glob("*.tmp-*"):
            host, _, pid = tmp.name.rsplit(".tmp-", 1)[1].rpartition("-")
            if host == _HOST and pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    @property
    def manifest(self) -> dict:
        return json.loads((self.dir / MANIFEST).read_text())

    def finished(self) -> set[int]:
        return {int(s["index"]) for s in self.manifest["shards"]}

    def write_shard(self, index: int, acts: np.ndarray | torch.Tensor, meta: np.ndarray, **extra) -> dict:
        """Write one shard and record it in the manifest; returns its record.

        Writing a shard that is already finished is refused (it would duplicate rows).
        """
        if isinstance(acts, torch.Tensor):
            acts = acts.detach().to("cpu", torch.float16).numpy()
        acts = np.asarray(acts, dtype=ACT_DTYPE)
        if acts.ndim != 2 or acts.shape[1] != self.width:
            raise ValueError(f"acts for {self.site} must have shape [rows, {self.width}], got {list(acts.shape)}")
        if meta.dtype != META_DTYPE or len(meta) != len(acts):
            raise ValueError(f"meta must be a META_DTYPE array of {len(acts)} rows (see make_meta), got {meta.dtype} x {len(meta)}")
        name = shard_name(index)
        if index in self.finished():
            raise StoreError(f"shard {name} of {self.site} is already finished; refusing to write its rows twice")
        tmp = {part: self.dir / f"{name}.{part}.npy{_tmp_suffix()}" for part in ("acts", "meta")}
        try:
            sha = {"acts": _save_npy(tmp["acts"], acts), "meta": _save_npy(tmp["meta"], meta)}
            record = {"index": int(index), "name": name, "rows": int(len(acts)), "sha256": sha, **extra}
            self._publish(record, tmp)
        except OSError as e:
            raise _write_error(f"shard {name} of site {self.site}", self.dir, e) from e
        finally:
            for path in tmp.values():  # left only if the shard was not published
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return record

    def _publish(self, record: dict, tmp: dict[str, Path]) -> None:
        """Rename the shard's files and record them, both under the lock (see the module doc)."""
        name = record["name"]
        with _locked(self.dir):
            manifest = self.manifest
            if any(int(s["index"]) == record["index"] for s in manifest["shards"]):
                raise StoreError(f"shard {name} of {self.site} was finished by another writer meanwhile; its files are kept")
            for part, path in tmp.items():
                os.replace(path, self.dir / f"{name}.{part}.npy")
            manifest["shards"].append(record)
            manifest["shards"].sort(key=lambda s: s["index"])
            _write_json_atomic(self.dir / MANIFEST, manifest)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are from an earlier, failed write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_synthetic_store(
    root: str | os.PathLike,
    site: str,
    acts: np.ndarray | torch.Tensor,
    meta: dict[str, Any] | np.ndarray | None = None,
    *,
    grid: Sequence[int] = (1, 1),
    rows_per_shard: int = 4096,
    num_train_timesteps: int = 1000,
    model: str = "synthetic",
    branch: str = "cond",
    config: dict | None = None,
) -> "SiteReader":
    """Fabricate a store for ``site`` from arrays (tests and examples); returns its SiteReader.

    acts: [n, width] (cast to float16). meta: a dict of per-row fields (see ``make_meta`` for the
    defaults of missing ones) or a ready META_DTYPE array. Rows are split into shards of
    ``rows_per_shard``.
    """
    if isinstance(acts, torch.Tensor):
        acts = acts.detach().cpu().float().numpy()
    acts = np.asarray(acts)
    n, width = acts.shape
    if not isinstance(meta, np.ndarray) or meta.dtype != META_DTYPE:
        meta = make_meta(n, meta, num_train_timesteps)
    ts = sorted({int(t) for t in np.unique(meta["t"])}, reverse=True)
    header = {
        "model": model,
        "model_revision": None,
        "kind": "synthetic",
        "timesteps": ts,
        "steps": sorted({int(s) for s in np.unique(meta["step"])}),
        "num_train_timesteps": num_train_timesteps,
        "branch": branch,
        "config": dict(config or {"synthetic": True, "rows": n, "width": width}),
    }
    writer = SiteWriter(root, site, width=width, grid=grid, header=header)
    for k, lo in enumerate(range(0, n, rows_per_shard)):
        writer.write_shard(k, acts[lo : lo + rows_per_shard], meta[lo : lo + rows_per_shard])
    return ActivationStore(root).site(site)


# --------------------------------------------------------------------------------------------
# reading


class ActivationStore:
    """An existing harvest folder.

    verify: "lazy" (default; False means the same) checks each shard's sha256 once per process,
    before its first use; "eager" (or True) checks every shard now; "never" trusts the files
    (only for callers that verified them already).
    """

    def __init__(self, root: str | os.PathLike, *, verify: bool | str = "lazy", model: str | None = None):
        self.root = Path(root)
        self.verify_mode = _verify_mode(verify)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no activation store at {self.root} (not a folder)")
        self.sites = sorted(str(p.parent.relative_to(self.root)) for p in self.root.glob("**/" + MANIFEST))
        if not self.sites:
            raise FileNotFoundError(f"no activation store at {self.root}: no <site>/{MANIFEST} found")
        self._readers: dict[str, SiteReader] = {}
        if model is not None:
            for name in self.sites:
                stored = self.site(name).manifest.get("model")
                if stored != model:
                    raise StoreError(f"store {self.root} holds activations of model {stored!r}, not {model!r}")
        if self.verify_mode == "eager":
            self.verify()

    def site(self, name: str) -> "SiteReader":
        if name not in self.sites:
            close = difflib.get_close_matches(name, self.sites, n=3, cutoff=0.5)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise UnknownNameError(f"site {name!r} is not in store {self.root}.{hint} Valid sites: {', '.join(self.sites)}")
        if name not in self._readers:
            self._readers[name] = SiteReader(self.root / name, verify=self.verify_mode)
        return self._readers[name]

    def verify(self) -> None:
        """Check every shard of every site against its checksum; raises CorruptShardError."""
        for name in self.sites:
            self.site(name).verify()

    def record(self) -> dict:
        """The store's one configuration, store.json (``config``: the harvest config without its
        sites; ``model_revision``: the U-Net's weights fingerprint; ``numerics``), or {} for a store
        written without one (``write_synthetic_store``)."""
        path = self.root / STORE_RECORD
        if not path.is_file():
            return {}
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{path} is not valid JSON ({err}); rebuild the store with `diffatlas harvest`") from None
        if not isinstance(record, dict):
            raise StoreError(f"{path} holds a {type(record).__name__}, not the store's record (a JSON object)")
        return record

    def prompts(self) -> list[dict]:
        """The records of prompts.jsonl (one per image), or [] if the store has none."""
        path = self.root / "prompts.jsonl"
        if not path.exists():
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def image_path(self, image: int) -> Path:
        return self.root / "images" / f"{int(image)}.png"

    def texts(self, images: Sequence[int]) -> list[str]:
        """The prompt text of each image id."""
        by_image = {int(r["image"]): r["text"] for r in self.prompts()}
        missing = [int(i) for i in images if int(i) not in by_image]
        if missing:
            raise UnknownNameError(f"no prompt for image {missing[0]} in {self.root / 'prompts.jsonl'}")
        return [by_image[int(i)] for i in images]

    def images(self, images: Sequence[int], size: int | None = None) -> torch.Tensor:
        """The final images [n, 3, H, W] in [-1, 1] (the VAE's range), resized to ``size`` if given."""
        from PIL import Image

        arrays = []
        for image in images:
            path = self.image_path(image)
            if not path.exists():
                raise FileNotFoundError(f"no final image for image {image} in {path.parent} (harvest with save_images: true)")
            im = Image.open(path).convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size))
            arrays.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def export(self, path: str | os.PathLike, sites: Sequence[str] | None = None) -> Path:
        """Write the folder that ``push_to_hub`` uploads: one parquet file per site (a dataset
        config named after the site) and a README whose YAML header lists them, so that
        ``datasets.load_dataset(path, name=site)`` reads it back, locally or from the Hub."""
        path = Path(path)
        names = list(self.sites if sites is None else sites)
        configs = []
        for name in names:
            data_file = f"{name}/train-00000-of-00001.parquet"
            (path / name).mkdir(parents=True, exist_ok=True)
            self.site(name).to_dataset().to_parquet(str(path / data_file))
            configs.append({"config_name": name, "data_files": [{"split": "train", "path": data_file}]})
        import yaml

        header = yaml.safe_dump({"configs": configs}, sort_keys=False)
        (path / "README.md").write_text(
            f"---\n{header}---\n\nActivations harvested by diffatlas from {self.root.name}: one config per site; "
            f"columns `act` (float16) and {', '.join(f'`{f}`' for f in META_FIELDS)}.\n"
        )
        return path

    def push_to_hub(self, repo_id: str, sites: Sequence[str] | None = None, *, private: bool = True, token: str | None = None) -> str:
        """Upload the store's rows as a Hugging Face dataset (one config per site): ``export``
        to a temporary folder, then one ``upload_folder`` of it. Returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            self.export(tmp, sites)
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="dataset"))

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.root)!r}, sites={self.sites})"


class SiteReader:
    """Memory-mapped rows of one site: random access, filters, shuffled batches, feature maps."""

    def __init__(self, directory: str | os.PathLike, *, verify: bool | str = "lazy"):
        self.dir = Path(directory)
        self.verify_mode = _verify_mode(verify)
        self._checked: set[int] = set()
        self.manifest: dict = json.loads((self.dir / MANIFEST).read_text())
        self.name: str = self.manifest["site"]
        self.width: int = int(self.manifest["width"])
        self.grid: tuple[int, int] = tuple(self.manifest.get("grid", (1, 1)))
        self.num_train_timesteps: int = int(self.manifest.get("num_train_timesteps", 1000))
        self.shards: list[dict] = list(self.manifest["shards"])
        rows = [int(s["rows"]) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.num_rows: int = int(self.offsets[-1])
        self._acts: dict[int, np.ndarray] = {}
        self._meta: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"SiteReader({self.name!r}, rows={self.num_rows}, width={self.width}, shards={len(self.shards)})"

    # -- shard access ------------------------------------------------------------------------
    def _path(self, k: int, part: str) -> Path:
        return self.dir / f"{self.shards[k]['name']}.{part}.npy"

    def _open(self, k: int, part: str) -> np.ndarray:
        path = self._path(k, part)
        name = self.shards[k]["name"]
        if self.verify_mode != "never" and k not in self._checked:
            verify_shard(self.dir, self.shards[k], self.name)
            self._checked.add(k)
        try:
            arr = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise CorruptShardError(f"shard {name} of site {self.name} is in the manifest but {path} is missing") from None
        except ValueError as e:
            raise CorruptShardError(f"shard {name} of site {self.name} ({path}) is unreadable: {e}") from None
        expect_rows = int(self.shards[k]["rows"])
        if len(arr) != expect_rows or (part == "acts" and arr.shape[1:] != (self.width,)):
            raise CorruptShardError(
                f"shard {name} of site {self.name} ({path}) has shape {arr.shape}, manifest says {expect_rows} rows"
            )
        return arr

    def acts_shard(self, k: int) -> np.ndarray:
        if k not in self._acts:
            self._acts[k] = self._open(k, "acts")
        return self._acts[k]

    def meta_shard(self, k: int) -> np.ndarray:
        if k not in self._meta:
            self._meta[k] = self._open(k, "meta")
        return self._meta[k]

    def verify(self) -> None:
        """Compare every shard's files with the sha256 recorded in the manifest."""
        for shard in self.shards:
            verify_shard(self.dir, shard, self.name)

    # -- metadata ----------------------------------------------------------------------------
    def meta_column(self, field: str) -> np.ndarray:
        """One metadata field for all rows, concatenated over shards."""
        if field not in META_FIELDS:
            raise UnknownNameError(f"unknown meta field {field!r}; valid fields: {', '.join(META_FIELDS)}")
        if not self.shards:
            return np.zeros(0, dtype=META_DTYPE[field])
        return np.concatenate([np.asarray(self.meta_shard(k)[field]) for k in range(len(self.shards))])

    def select(
        self,
        window=None,
        branch: str | None = None,
        images: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Row indices (int64, ascending) matching every given filter.

        window: a timestep gate (``activations.timesteps``: early | middle | late, {tau: [lo, hi]},
        {steps: [..]}, ...); branch: "cond" | "uncond"; images: image ids; steps: step indices.
        """
        mask = np.ones(self.num_rows, dtype=bool)
        if window is not None:
            mask &= parse_when(window).mask(self.meta_column("step"), self.meta_column("t"), self.num_train_timesteps)
        if branch is not None:
            mask &= self.meta_column("branch") == branch_code(branch)
        if images is not None:
            mask &= np.isin(self.meta_column("image"), np.asarray(list(images), dtype=np.int64))
        if steps is not None:
            mask &= np.isin(self.meta_column("step"), np.asarray(list(steps), dtype=np.int64))
        return np.flatnonzero(mask).astype(np.int64)

    # -- rows --------------------------------------------------------------------------------
    def read(self, indices: Sequence[int] | np.ndarray | slice) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Rows at ``indices`` (in the given order): float16 acts [n, width] and a dict of meta arrays."""
        if isinstance(indices, slice):
            indices = np.arange(self.num_rows)[indices]
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_rows):
            bad = idx[(idx < 0) | (idx >= self.num_rows)][0]
            raise IndexError(f"row {int(bad)} out of range for site {self.name} with {self.num_rows} rows")
        acts = np.empty((len(idx), self.width), dtype=ACT_DTYPE)
        meta = np.empty(len(idx), dtype=META_DTYPE)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for part in np.split(np.arange(len(sorted_idx)), bounds):
            if not len(part):
                continue
            k = int(shard_of[part[0]])
            local = sorted_idx[part] - self.offsets[k]
            dest = order[part]
            if local[-1] - local[0] + 1 == len(local):  # a contiguous run: one sequential slice
                acts[dest] = self.acts_shard(k)[local[0] : local[-1] + 1]
                meta[dest] = self.meta_shard(k)[local[0] : local[-1] + 1]
            else:
                acts[dest] = self.acts_shard(k)[local]
                meta[dest] = self.meta_shard(k)[local]
        return torch.from_numpy(acts), {f: meta[f] for f in META_FIELDS}

    def iter_batches(
        self,
        batch_size: int,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        chunk_rows: int = 256,
    ) -> Iterator[tuple[torch.Tensor, dict[str, np.ndarray]]]:
        """Batches of (acts [n, width] float16, meta), shuffled across images.

        Rows are cut into contiguous chunks of ``chunk_rows`` (cheap sequential reads); the chunk
        order is permuted with ``seed``; each rank takes an equal slice of that order (wrapping
        around to pad unless ``drop_last``, so every rank yields the same number of batches);
        then up to ``shuffle_buffer`` rows are read at a time and permuted, so one batch mixes
        many images and steps. ``shuffle_buffer=0`` keeps rows in store order (no shuffling).
        """
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        idx = np.arange(self.num_rows, dtype=np.int64) if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
        rng = np.random.default_rng(seed)
        shuffle = shuffle_buffer > 0
        if shuffle and len(idx):
            chunks = np.array_split(idx, max(1, math.ceil(len(idx) / chunk_rows)))
            idx = np.concatenate([chunks[c] for c in rng.permutation(len(chunks))])
        if world_size > 1:
            per = len(idx) // world_size if drop_last else math.ceil(len(idx) / world_size)
            if not drop_last and per * world_size > len(idx) and len(idx):
                idx = np.concatenate([idx, idx[: per * world_size - len(idx)]])
            idx = idx[rank * per : (rank + 1) * per]
        window = max(shuffle_buffer, batch_size) if shuffle else max(batch_size, 8192)
        carry_acts, carry_meta = None, None
        for lo in range(0, len(idx), window):
            acts, meta = self.read(idx[lo : lo + window])
            if shuffle:
                perm = torch.from_numpy(rng.permutation(len(acts)))
                acts, meta = acts[perm], {k: v[perm.numpy()] for k, v in meta.items()}
            if carry_acts is not None:
                acts = torch.cat([carry_acts, acts])
                meta = {k: np.concatenate([carry_meta[k], v]) for k, v in meta.items()}
            full = len(acts) // batch_size * batch_size
            for b in range(0, full, batch_size):
                yield acts[b : b + batch_size], {k: v[b : b + batch_size] for k, v in meta.items()}
            carry_acts, carry_meta = acts[full:], {k: v[full:] for k, v in meta.items()}
        if carry_acts is not None and len(carry_acts) and not drop_last:
            yield carry_acts, carry_meta

    def feature_map(self, image: int, step: int, branch: str = "cond") -> torch.Tensor:
        """The site's map [H, W, width] for one image, step and branch.

        Positions that were not harvested (position subsampling) are NaN.
        """
        rows = self.select(branch=branch, images=[image], steps=[step])
        if not len(rows):
            raise UnknownNameError(f"site {self.name} has no rows for image {image}, step {step}, branch {branch!r}")
        acts, meta = self.read(rows)
        h, w = self.grid
        out = torch.full((h, w, self.width), float("nan"), dtype=torch.float16)
        out[torch.from_numpy(meta["i"].astype(np.int64)), torch.from_numpy(meta["j"].astype(np.int64))] = acts
        return out

    def to_dataset(self):
        """The site's rows as a ``datasets.Dataset``: column ``act`` (float16, fixed length
        ``width``) and one column per metadata field, in store order.

        Built from Arrow arrays that wrap the memory-mapped shards (no copy into RAM; each shard
        is verified first, as for ``read``). ``save_to_disk``, ``to_parquet`` or ``push_to_hub``
        of the result write a copy.
        """
        import datasets
        import pyarrow as pa

        tables = [self._arrow_shard(k) for k in range(len(self.shards))]
        if not tables:
            tables = [self._arrow_table(np.zeros((0, self.width), ACT_DTYPE), np.zeros(0, META_DTYPE))]
        table = pa.concat_tables(tables)
        return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(description=f"diffatlas site {self.name}"))

    def _arrow_shard(self, k: int):
        return self._arrow_table(self.acts_shard(k), self.meta_shard(k))

    def _arrow_table(self, acts: np.ndarray, meta: np.ndarray):
        import pyarrow as pa

        # pa.array on a contiguous numeric ndarray wraps its buffer (here the mmap) without copying
        flat = pa.array(np.asarray(acts).reshape(-1), type=pa.float16())
        columns = {"act": pa.FixedSizeListArray.from_arrays(flat, self.width)}
        for field in META_FIELDS:
            columns[field] = pa.array(np.asarray(meta[field]))  # structured field: strided, so copied (small)
        return pa.table(columns)

    def branch_names(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(BRANCHES)[codes]
