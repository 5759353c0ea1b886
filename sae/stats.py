"""Per-feature statistics of a trained SAE over a store: the one implementation.

``compute_feature_stats`` (re-exported by ``analysis.features``, where ``diffatlas analyze features``
calls it) and the training pass of ``sae.lit.LitSAE`` (``feature_stats=True``, the default) both
run this code, so statistics written next to a trained SAE equal a separate pass bit for bit.
It lives in ``sae`` (not ``analysis``) because training may not import ``analysis`` (layer rule).

``FeatureStats``: when, where and how strongly each latent of a trained SAE fires over a store.

One streaming pass over a site's rows (``compute_feature_stats``): rows are read in contiguous
chunks, encoded by the SAE, and only the sparse codes' nonzero entries are accumulated, so memory
is bounded by the chunk and the [m, ...] accumulators; nothing of size [rows, latents] is built.

Accumulated per feature (m latents):
- ``density`` [m]: fraction of rows where the latent is > 0; ``mean`` [m] (over all rows, zeros
  included) and ``mean_active`` [m] (over the rows where it fires); ``max`` [m];
- ``tau_profile`` [branches=2, taus, m]: mean activation per distinct tau of the store, per branch
  (0 uncond, 1 cond; a branch with no rows is NaN) with ``taus`` [taus] descending;
- ``spatial`` [H*W, m]: mean activation per position (i, j) of the site's grid (row-major);
- top-k tokens: ``top_act`` [m, k] (descending, -inf pads) and ``top_row`` [m, k] (row id, -1 pads),
  merged chunk by chunk; the rows' image, step, tau, i, j are looked up once at the end;
- co-occurrence: ``cooc_idx``/``cooc_count`` [m, c]: the c features that fire most often on the
  same token as each feature. Each unordered pair is counted once. Counting choice: for m <=
  ``DENSE_COOC_MAX`` (2048) a dense int64 [m + 1, m + 1] count is kept (32 MiB at the limit; the
  extra latent takes pads) and updated with one ``index_add_`` per slot of the tokens' latents;
  above that, each chunk's pairs are reduced
  with ``np.unique`` and merged into a sorted (pair key, count) list, whose size is the number of
  distinct pairs seen (at most rows * k^2 / 2 for TopK codes, usually far fewer), never m^2.

Statistics saved next to an SAE (``<sae folder>/feature_stats/``, ``FeatureStats.save``'s files,
written by the training pass) are reused by ``diffatlas analyze features`` only when
``stats_match`` says they are of the same weights (``weights_fingerprint``, a hash of the SAE's
tensors, recorded in ``info["sae_weights"]``), the same store, site and rows, and the same
``top_k`` and ``cooc_top``; otherwise it computes them as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.errors import UsageError

DENSE_COOC_MAX = 2048
TENSORS_FILE = "feature_stats.safetensors"
META_FILE = "feature_stats.json"
SAE_STATS_DIR = "feature_stats"
"""subfolder of a trained SAE's folder where the training pass saves its statistics"""
ROWS_SITE = "site"
"""``rows_of`` of statistics over every row of the site (what ``diffatlas analyze features`` describes by default)"""


@dataclass
class FeatureStats:
    """Per-feature statistics of an SAE over one site of a store (see the module doc for shapes)."""

    density: torch.Tensor
    mean: torch.Tensor
    mean_active: torch.Tensor
    max: torch.Tensor
    taus: torch.Tensor
    tau_profile: torch.Tensor
    spatial: torch.Tensor
    top_act: torch.Tensor
    top_row: torch.Tensor
    top_meta: dict[str, torch.Tensor]
    """image, step, tau, i, j, branch of each top token, each [m, k] (-1 / NaN at pads)"""
    cooc_idx: torch.Tensor
    cooc_count: torch.Tensor
    info: dict = field(default_factory=dict)
    """site, grid, rows, sae folder, store folder, k, cooc method"""

    @property
    def num_features(self) -> int:
        return int(self.density.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.info["grid"])

    def spatial_map(self, feature: int) -> torch.Tensor:
        """[H, W] mean activation of ``feature`` per position."""
        return self.spatial[:, feature].reshape(self.grid)

    def top_examples(self, feature: int, n: int | None = None) -> list[dict]:
        """The feature's top tokens, strongest first: activation, row, image, step, tau, i, j, branch."""
        out = []
        for r in range(self.top_act.shape[1] if n is None else min(n, self.top_act.shape[1])):
            if int(self.top_row[feature, r]) < 0:
                break
            ex = {"activation": float(self.top_act[feature, r]), "row": int(self.top_row[feature, r])}
            ex.update({k: (float(v[feature, r]) if k == "tau" else int(v[feature, r])) for k, v in self.top_meta.items()})
            out.append(ex)
        return out

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).contiguous() for k in _TENSOR_FIELDS}
        tensors.update({f"top_meta.{k}": v.contiguous() for k, v in self.top_meta.items()})
        save_file(tensors, str(folder / TENSORS_FILE))
        (folder / META_FILE).write_text(json.dumps(self.info, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "FeatureStats":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / TENSORS_FILE).exists():
            raise FileNotFoundError(f"no feature statistics in {folder} (expected {TENSORS_FILE} and {META_FILE})")
        tensors = load_file(str(folder / TENSORS_FILE))
        meta = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("top_meta.")}
        info = json.loads((folder / META_FILE).read_text())
        return cls(**{k: tensors[k] for k in _TENSOR_FIELDS}, top_meta=meta, info=info)


_TENSOR_FIELDS = ("density", "mean", "mean_active", "max", "taus", "tau_profile", "spatial", "top_act", "top_row",
                  "cooc_idx", "cooc_count")


def sparse_codes(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token [nnz], latent [nnz], value [nnz]) of the strictly positive entries of x's codes."""
    with torch.no_grad():
        lat = sae.encode(x.to(sae.device, sae.dtype))
    if lat.is_sparse:
        rows, idx, vals = lat.rows(), lat.indices, lat.values
    else:
        rows, idx = torch.nonzero(lat.dense > 0, as_tuple=True)
        vals = lat.dense[rows, idx]
    keep = vals > 0
    return rows[keep].cpu(), idx[keep].cpu().long(), vals[keep].float().cpu()


def merge_topk(top_act: torch.Tensor, top_row: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
               rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge flat entries (latent idx, value, global row) into the running per-latent top-k [m, k]."""
    m, k = top_act.shape
    # only entries above their latent's current k-th best can enter (most, after the first chunks)
    enter = vals > top_act[idx, -1]
    idx, vals, rows = idx[enter], vals[enter], rows[enter]
    if not len(idx):
        return top_act, top_row
    # one sort by (latent, value descending): positive float32 bits order like the floats
    bits = vals.contiguous().view(torch.int32).long()
    order = torch.argsort(idx * (1 << 32) + ((1 << 31) - 1 - bits), stable=True)
    idx_s, vals_s, rows_s = idx[order], vals[order], rows[order]
    starts = torch.searchsorted(idx_s, idx_s, right=False)  # first position of each entry's latent
    rank = torch.arange(len(idx_s)) - starts
    keep = rank < k
    cand_act = torch.full((m, k), float("-inf"))
    cand_row = torch.full((m, k), -1, dtype=torch.long)
    cand_act[idx_s[keep], rank[keep]] = vals_s[keep]
    cand_row[idx_s[keep], rank[keep]] = rows_s[keep]
    both_act = torch.cat([top_act, cand_act], 1)
    both_row = torch.cat([top_row, cand_row], 1)
    new_act, pos = both_act.topk(k, dim=1)
    return new_act, both_row.gather(1, pos)


class _Cooc:
    """Co-firing counts (see the module doc for the dense / sparse choice)."""

    def __init__(self, m: int):
        self.m = m
        # one extra row and column (latent m) catch the pads of tokens with fewer latents; dropped in ``top``
        self.dense = torch.zeros((m + 1) * (m + 1), dtype=torch.int64) if m <= DENSE_COOC_MAX else None
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)

    @property
    def method(self) -> str:
        return "dense" if self.dense is not None else "sparse"

    def add(self, rows: torch.Tensor, idx: torch.Tensor) -> None:
        if not len(rows):
            return
        # a [tokens, kmax] table of each token's latents (-1 pads at the end of a row), then each
        # unordered pair once: slots i < j (a token's latents are distinct, and slot j filled means
        # slot i is). Entries come grouped by token (``sparse_codes`` keeps the Latents order).
        counts = torch.bincount(rows)
        counts = counts[counts > 0]
        kmax = int(counts.max())
        if kmax < 2:
            return
        if bool((counts == kmax).all()):  # every token has kmax latents (TopK codes, mostly): no pads
            table = idx.reshape(-1, kmax)
        else:
            starts = torch.cumsum(counts, 0) - counts
            tok = torch.repeat_interleave(torch.arange(len(counts)), counts)
            slot = torch.arange(len(idx)) - starts[tok]
            table = torch.full((len(counts), kmax), -1, dtype=torch.long)
            table[tok, slot] = idx
        if self.dense is not None:
            # one direction per pair (slot s with each later slot), symmetrised in ``top``; a pad is
            # latent m, whose row and column are dropped. One index_add_ per slot: no [tokens,
            # kmax^2 / 2] key table is built (the largest cost of the pass before).
            w = self.m + 1
            table = torch.where(table >= 0, table, self.m)
            scaled = table * w
            for s in range(kmax - 1):
                keys = (scaled[:, s:s + 1] + table[:, s + 1:]).reshape(-1)
                self.dense.index_add_(0, keys, torch.ones(1, dtype=torch.int64).expand(len(keys)))
            return
        i, j = torch.triu_indices(kmax, kmax, offset=1)
        a, b = table[:, i], table[:, j]
        valid = b >= 0
        lo, hi = torch.minimum(a, b)[valid], torch.maximum(a, b)[valid]
        u, c = np.unique((lo * self.m + hi).numpy(), return_counts=True)
        allk = np.concatenate([self.keys, u])
        allc = np.concatenate([self.counts, c])
        self.keys, inv = np.unique(allk, return_inverse=True)
        self.counts = np.bincount(inv, weights=allc).astype(np.int64)

    def top(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[m, n] most co-firing latents per latent and their counts (-1 / 0 pads)."""
        n = min(n, max(self.m - 1, 1))
        if self.dense is not None:
            half = self.dense.reshape(self.m + 1, self.m + 1)[: self.m, : self.m]
            c = half + half.T
            cnt, ix = c.topk(n, dim=1)
            ix = torch.where(cnt > 0, ix, torch.full_like(ix, -1))
            return ix, cnt
        ix = torch.full((self.m, n), -1, dtype=torch.long)
        cnt = torch.zeros((self.m, n), dtype=torch.long)
        lo, hi = self.keys // self.m, self.keys % self.m
        a, b, c = np.concatenate([lo, hi]), np.concatenate([hi, lo]), np.concatenate([self.counts, self.counts])
        order = np.lexsort((-c, a))
        a, b, c = a[order], b[order], c[order]
        starts = np.searchsorted(a, a, side="left")
        rank = np.arange(len(a)) - starts
        keep = rank < n
        ix[a[keep], rank[keep]] = torch.from_numpy(b[keep])
        cnt[a[keep], rank[keep]] = torch.from_numpy(c[keep])
        return ix, cnt


def weights_fingerprint(sae) -> str:
    """sha256 of the SAE's tensors (names, dtypes, shapes and bytes, on the CPU): equal exactly when
    the weights are bit-identical, e.g. a trained SAE and the same SAE loaded from its folder."""
    h = hashlib.sha256()
    for name, t in sorted(sae.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def stats_match(stats: FeatureStats, sae, reader, *, store_root: str | Path, rows: int | None = None,
                rows_of: str = ROWS_SITE, top_k: int = 16, cooc_top: int = 8) -> str | None:
    """None when ``stats`` are what ``compute_feature_stats(sae, reader, top_k=..., cooc_top=...)``
    over ``rows`` rows (default: all of the site's) selected as ``rows_of`` says, of ``store_root``,
    would compute; else the first reason they are not (a short phrase)."""
    info = stats.info
    want = {
        "rows_of": rows_of,
        "sae_weights": weights_fingerprint(sae),
        "store": str(Path(store_root).resolve()),
        "site": reader.name,
        "rows": int(reader.num_rows if rows is None else rows),
        "num_latents": int(sae.num_latents),
        "top_k": int(top_k),
        "cooc_top": int(cooc_top),
    }
    for key, value in want.items():
        got = info.get(key, ROWS_SITE if key == "rows_of" else None)  # files from before rows_of: every row
        if key == "store" and got is not None:
            got = str(Path(got).resolve())
        if got != value:
            return f"{key} is {got!r}, not {value!r}"
    return None


def trained_rows(reader, placement) -> tuple[np.ndarray, str]:
    """The rows an SAE was trained on, by its placement (its window and branch; both train and
    held-out images) and their ``rows_of`` label: ``site`` when that is every row."""
    if placement.window is None and placement.branch is None:
        return np.arange(reader.num_rows, dtype=np.int64), ROWS_SITE
    rows = reader.select(window=placement.window, branch=placement.branch)
    return rows, f"window={placement.window!r}, branch={placement.branch!r}"


def compute_feature_stats(saes, reader, *, rows=None, rows_of=ROWS_SITE, top_k: int = 16, cooc_top: int = 8,
                          chunk_rows: int = 8192, progress: bool = True, store_root: str | None = None,
                          accumulate: bool = True):
    """One streaming pass over ``reader``'s rows (all, or the given row ids) for one SAE, or for a
    list of SAEs of the same width (a run's SAEs of one site): each chunk is read once and encoded
    by each SAE. Returns a FeatureStats, or a list of them in the order of ``saes``.

    With a list of SAEs, ``rows`` and ``rows_of`` may be lists too (each SAE's own rows, e.g.
    ``trained_rows``): the pass reads their union once and each SAE encodes its rows of each chunk.
    ``rows_of`` labels the selection in ``info`` (``stats_match`` compares it).

    ``accumulate=False`` reads and encodes the same chunks and accumulates nothing (returns None):
    the same pass without the statistics, which ``benchmarks/feature_stats_speed.py`` times to
    measure what the statistics add (``stats_overhead``)."""
    from tqdm.auto import tqdm

    many = isinstance(saes, (list, tuple))
    saes = list(saes) if many else [saes]
    for sae in saes:
        if reader.width != sae.d_in:
            raise UsageError(f"the SAE takes width {sae.d_in} but site {reader.name} has width {reader.width}")

    def sorted_ids(r) -> np.ndarray:
        return np.arange(reader.num_rows, dtype=np.int64) if r is None else np.sort(np.asarray(r, dtype=np.int64))

    per_sae = isinstance(rows, (list, tuple))
    own = [sorted_ids(r) for r in rows] if per_sae else [sorted_ids(rows)] * len(saes)
    labels = list(rows_of) if isinstance(rows_of, (list, tuple)) else [rows_of] * len(saes)
    if len(own) != len(saes) or len(labels) != len(saes):
        raise ValueError(f"{len(saes)} SAEs with {len(own)} row selections and {len(labels)} labels")
    idx_all = own[0] if not per_sae or len(own) == 1 else np.unique(np.concatenate(own))
    accs = []
    if accumulate:
        for sae, ids in zip(saes, own):
            taus = np.unique(reader.meta_column("tau")[ids]) if len(ids) else np.zeros(0)
            accs.append(_StatsAccumulator(sae.num_latents, taus[::-1].copy(), reader.grid, top_k))  # tau 1 first
    bar = tqdm(total=len(idx_all), desc=f"feature stats {reader.name}", unit="tok", disable=not progress)
    for lo in range(0, len(idx_all), chunk_rows):
        ids = idx_all[lo: lo + chunk_rows]
        acts, meta = reader.read(ids)
        x = acts.float()
        for j, sae in enumerate(saes):
            if per_sae and len(own) > 1:  # this SAE's rows of the chunk
                keep = np.isin(ids, own[j], assume_unique=True)
                if not keep.any():
                    continue
                mine, xj, mj = ids[keep], x[torch.from_numpy(keep)], {k: v[keep] for k, v in meta.items()}
            else:
                mine, xj, mj = ids, x, meta
            codes = sparse_codes(sae, xj)
            if accumulate:
                accs[j].add(torch.from_numpy(mine), mj, *codes)
        bar.update(len(ids))
    bar.close()
    if not accumulate:
        return None
    out = []
    for sae, acc, ids, label in zip(saes, accs, own, labels):
        info = {"site": reader.name, "grid": list(reader.grid), "rows": int(len(ids)), "rows_of": label,
                "num_latents": sae.num_latents, "top_k": top_k, "cooc_top": cooc_top,
                "sae": str(getattr(sae, "source", "")), "sae_weights": weights_fingerprint(sae),
                "stage": sae.placement.stage, "store": str(store_root) if store_root else str(reader.dir.parent)}
        out.append(acc.finish(reader, len(ids), cooc_top, info))
    return out if many else out[0]


class _StatsAccumulator:
    """The running sums of one SAE's statistics over a pass (see the module doc)."""

    def __init__(self, m: int, taus: np.ndarray, grid: tuple[int, int], top_k: int):
        h, w = grid
        self.m, self.taus, self.w = m, taus, w
        self.asc = taus[::-1]
        self.fires = torch.zeros(m, dtype=torch.float64)
        self.total = torch.zeros(m, dtype=torch.float64)
        self.vmax = torch.zeros(m)
        self.tau_sum = torch.zeros(2 * len(taus), m, dtype=torch.float64)
        self.tau_n = torch.zeros(2 * len(taus), dtype=torch.float64)
        self.sp_sum = torch.zeros(h * w, m, dtype=torch.float64)
        self.sp_n = torch.zeros(h * w, dtype=torch.float64)
        self.top_act = torch.full((m, top_k), float("-inf"))
        self.top_row = torch.full((m, top_k), -1, dtype=torch.long)
        self.cooc = _Cooc(m)

    def add(self, ids: torch.Tensor, meta: dict, tok: torch.Tensor, lat: torch.Tensor, val: torch.Tensor) -> None:
        m = self.m
        self.fires.index_add_(0, lat, torch.ones_like(val, dtype=torch.float64))
        self.total.index_add_(0, lat, val.double())
        self.vmax = torch.maximum(self.vmax, torch.zeros(m).scatter_reduce(0, lat, val, "amax"))
        # group of each token: branch * taus + tau index; position: i * W + j
        t_ix = len(self.taus) - 1 - np.searchsorted(self.asc, meta["tau"])
        group = torch.from_numpy(meta["branch"].astype(np.int64) * len(self.taus) + t_ix)
        pos = torch.from_numpy(meta["i"].astype(np.int64) * self.w + meta["j"].astype(np.int64))
        self.tau_n += torch.bincount(group, minlength=len(self.tau_n)).double()
        self.sp_n += torch.bincount(pos, minlength=len(self.sp_n)).double()
        self.tau_sum.view(-1).index_add_(0, group[tok] * m + lat, val.double())
        self.sp_sum.view(-1).index_add_(0, pos[tok] * m + lat, val.double())
        self.top_act, self.top_row = merge_topk(self.top_act, self.top_row, lat, val, ids[tok])
        self.cooc.add(tok, lat)

    def finish(self, reader, rows: int, cooc_top: int, info: dict) -> FeatureStats:
        n = max(rows, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            tau_profile = (self.tau_sum / self.tau_n[:, None]).reshape(2, len(self.taus), self.m).float()
            spatial = (self.sp_sum / self.sp_n[:, None]).float()
        ci, cc = self.cooc.top(cooc_top)
        info = dict(info, cooc_method=self.cooc.method)
        return FeatureStats(density=(self.fires / n).float(), mean=(self.total / n).float(),
                            mean_active=(self.total / self.fires.clamp(min=1)).float(), max=self.vmax,
                            taus=torch.from_numpy(self.taus).float(), tau_profile=tau_profile, spatial=spatial,
                            top_act=self.top_act, top_row=self.top_row, top_meta=_top_meta(reader, self.top_row),
                            cooc_idx=ci, cooc_count=cc, info=info)


def _top_meta(reader, top_row: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = top_row.reshape(-1).numpy()
    ok = flat >= 0
    uniq = np.unique(flat[ok])
    out = {}
    _, meta = reader.read(uniq) if len(uniq) else (None, {f: np.zeros(0) for f in ("image", "step", "tau", "i", "j", "branch")})
    where = np.searchsorted(uniq, flat[ok])
    for f in ("image", "step", "tau", "i", "j", "branch"):
        dt = np.float32 if f == "tau" else np.int64
        arr = np.full(len(flat), np.nan if f == "tau" else -1, dtype=dt)
        arr[ok] = np.asarray(meta[f])[where].astype(dt)
        out[f] = torch.from_numpy(arr.reshape(top_row.shape))
    return out


