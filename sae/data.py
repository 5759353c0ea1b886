"""``ActivationDataModule``: SAE training batches from an activation store.

Rows are filtered by timestep window and branch, split into train and validation by *image* (tokens
of one image are strongly correlated, so a row-level split would leak), and served in a global
random permutation per epoch (which shuffles across images completely). Each global batch of
``batch_size * world_size`` rows is cut into one slice per rank, every rank gets the same number of
batches (the remainder of an epoch is dropped), and the position inside the epoch is part of the
checkpoint so that a resumed run continues with exactly the batches it would have seen.

A batch is a dict: ``acts`` float16 [B, d], ``tau`` float32 [B], ``rows`` int64 [B] (row ids in
the site), and for training batches ``epoch`` and ``position`` (ints).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch

from activations.timesteps import BRANCHES, window_table
from common.errors import UsageError

log = logging.getLogger(__name__)

WindowSpec = str | dict | None


def check_window(window):
    """``window`` as a typed gate (``activations.timesteps``), or None for every step. The one
    place the data module reads windows: ``early`` / ``middle`` / ``late`` or ``{tau: [lo, hi]}``
    (any gate spelling, e.g. ``{steps: [0, 1]}``, selects rows too)."""
    from activations.timesteps import parse_when

    if window is None:
        return None
    try:
        return parse_when(window)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _finite_rows(acts: torch.Tensor) -> torch.Tensor:
    """bool [n]: rows of float32 ``acts`` [n, d] free of NaN and inf. A row sum is non-finite exactly
    when the row holds one (store values are float16 and cannot overflow a float32 sum), at a
    tenth of the cost of ``isfinite().all(-1)``."""
    return torch.isfinite(acts.sum(dim=-1))


class _BatchLoader:
    """An iterable of batches over ``ids`` (int64 row ids). Lightning treats it as a dataloader."""

    def __init__(self, dm: "ActivationDataModule", ids: np.ndarray, *, train: bool):
        self.dm, self.ids, self.train = dm, ids, train

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self.dm, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def __len__(self) -> int:
        rank, world = self._world()
        b = self.dm.batch_size
        if self.train:
            return len(self.ids) // (b * world)
        return math.ceil(len(self.ids[rank::world]) / b)

    def __iter__(self):
        rank, world = self._world()
        b = self.dm.batch_size
        if not self.train:
            mine = self.ids[rank::world]
            for lo in range(0, len(mine), b):
                batch = self.dm._read(mine[lo : lo + b])
                if batch is not None:
                    yield batch
            return
        trainer = getattr(self.dm, "trainer", None)
        epoch = int(trainer.current_epoch) if trainer is not None else self.dm._epoch_fallback
        start = 0
        if self.dm._resume is not None and self.dm._resume["epoch"] == epoch:
            start = int(self.dm._resume["position"])
        self.dm._resume = None
        perm = self.dm.epoch_order(epoch)
        for pos in range(start, len(self)):
            lo = pos * b * world + rank * b
            batch = self.dm._read(perm[lo : lo + b])
            if batch is None:  # every row of this slice was non-finite and skipped
                if world > 1:
                    raise UsageError(
                        f"every row of training batch {pos} on rank {rank} is NaN or inf; skipping it would put the "
                        f"ranks out of step. Clean the store or use a larger --data.batch_size")
                continue
            batch["epoch"], batch["position"] = epoch, pos
            yield batch
        if trainer is None:
            self.dm._epoch_fallback += 1

    # Lightning checks for these to treat the loader as resumable; the real state is kept by the
    # data module, which knows which batches were consumed rather than pre-fetched.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ActivationDataModule(pl.LightningDataModule):
    """Batches of one site's activations for SAE training."""

    def __init__(
        self,
        store: str,
        site: str | None = None,
        window: WindowSpec = None,
        branch: str | None = None,
        batch_size: int = 4096,
        val_fraction: float = 0.05,
        max_val_rows: int = 65536,
        nonfinite: Literal["skip", "error"] = "skip",
        seed: int = 0,
    ):
        """
        Args:
            store: Folder of a harvest (ActivationStore root).
            site: Site to train on; may be omitted when the store holds exactly one.
            window: Timestep window: early (tau in [0.6, 1]), middle ([0.2, 0.6)), late ([0, 0.2)),
                {tau: [lo, hi]}, or null for one SAE pooled over all timesteps.
            branch: Guidance branch to train on (cond or uncond); null keeps every stored row.
            batch_size: Tokens per batch on each rank (the global batch is batch_size x world size).
            val_fraction: Fraction of images held out for validation metrics (split by image, not by token).
            max_val_rows: Cap on held-out tokens evaluated per validation run.
            nonfinite: What to do with rows holding NaN or inf: skip (drop and count them, logged as
                data/nonfinite_rows) or error (stop, naming the first offending row).
            seed: Seed of the train/validation split and of the per-epoch shuffling.
        """
        super().__init__()
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if branch is not None and branch not in BRANCHES:
            raise UsageError(f"unknown branch {branch!r}; valid branches: {', '.join(BRANCHES)}, or null (every row)")
        if nonfinite not in ("skip", "error"):
            raise UsageError(f"nonfinite must be 'skip' or 'error', got {nonfinite!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.store_path = store
        self.site_name = site
        self.window = check_window(window)
        self.branch = branch
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_val_rows = max_val_rows
        self.nonfinite = nonfinite
        self.seed = seed
        self.nonfinite_rows = 0
        self._reader = None
        self._resume: dict | None = None
        self._consumed: dict | None = None
        self._epoch_fallback = 0
        self.train_ids = self.val_ids = None

    # -------------------------------------------------------------------------------- setup
    @property
    def reader(self):
        """The store's SiteReader for the chosen site (opened on first use)."""
        if self._reader is None:
            from activations.store import ActivationStore

            store = ActivationStore(self.store_path)
            if not store.sites:
                raise UsageError(f"activation store {self.store_path} holds no sites (no {'<site>'}/manifest.json)")
            name = self.site_name
            if name is None:
                if len(store.sites) != 1:
                    raise UsageError(f"store {self.store_path} holds {len(store.sites)} sites; choose one with "
                                     f"--data.site, valid: {', '.join(store.sites)}")
                name = store.sites[0]
            if name not in store.sites:
                raise UsageError(f"site {name!r} is not in store {self.store_path}; valid sites: {', '.join(store.sites)}")
            self.site_name = name
            self._reader = store.site(name)
        return self._reader

    @property
    def window_spec(self):
        """The training rows' timestep gate in its YAML spelling (None: every step)."""
        from activations.timesteps import gate_spec

        return None if self.window is None else gate_spec(self.window)

    @property
    def width(self) -> int:
        return self.reader.width

    @property
    def manifest(self) -> dict:
        return self.reader.manifest

    def setup(self, stage: str | None = None) -> None:
        if self.train_ids is not None:
            return
        reader = self.reader
        if reader.num_rows == 0:
            raise UsageError(f"site {self.site_name!r} of store {self.store_path} is empty (0 rows): nothing to train on")
        ids = reader.select(window=self.window, branch=self.branch)
        if len(ids) == 0:
            taus = np.unique(reader.meta_column("t")) / reader.num_train_timesteps
            branches = sorted({str(b) for b in reader.branch_names(np.unique(reader.meta_column("branch")))})
            raise UsageError(
                f"no rows of site {self.site_name!r} match window={self.window_spec!r}, branch={self.branch!r} "
                f"(the site has {reader.num_rows} rows with tau in {sorted(float(t) for t in taus)} and "
                f"branches {branches}); valid windows: {window_table()}, or {{tau: [lo, hi]}}"
            )
        images = reader.meta_column("image")[ids]
        unique = np.unique(images)
        rng = np.random.default_rng(self.seed)
        n_val = int(round(self.val_fraction * len(unique))) if len(unique) > 1 else 0
        n_val = min(n_val, len(unique) - 1)
        if self.val_fraction > 0 and len(unique) > 1:
            n_val = max(n_val, 1)
        val_images = rng.permutation(unique)[:n_val]
        is_val = np.isin(images, val_images)
        self.train_ids = ids[~is_val]
        self.val_ids = ids[is_val]
        if len(self.val_ids) == 0 and self.val_fraction > 0:
            # One image only: evaluate on a sample of training rows rather than on nothing.
            self.val_ids = self.train_ids
        if len(self.val_ids) > self.max_val_rows:
            self.val_ids = np.sort(rng.choice(self.val_ids, self.max_val_rows, replace=False))
        world = int(self.trainer.world_size) if self.trainer is not None else 1
        if len(self.train_ids) < self.batch_size * world:
            raise UsageError(
                f"site {self.site_name!r} has {len(self.train_ids)} training rows after filtering "
                f"(window={self.window_spec!r}, branch={self.branch!r}), fewer than one global batch of "
                f"batch_size {self.batch_size} x {world} rank(s); lower --data.batch_size"
            )

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Training row ids in the order of epoch ``epoch`` (identical on every rank)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.train_ids)

    # ------------------------------------------------------------------------------- reading
    def _read(self, ids: np.ndarray) -> dict[str, Any] | None:
        order = np.sort(ids)  # sequential memory-map access; order within a batch does not matter
        acts, meta = self.reader.read(order)
        acts = acts.float()  # float32 for training
        finite = _finite_rows(acts)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            if self.nonfinite == "error":
                raise UsageError(
                    f"non-finite activation (NaN or inf) in row {int(order[bad])} of site {self.site_name!r} "
                    f"(image {int(meta['image'][bad])}, step {int(meta['step'][bad])}, t {int(meta['t'][bad])}, "
                    f"position ({int(meta['i'][bad])}, {int(meta['j'][bad])})); set --data.nonfinite skip to drop such rows"
                )
            self.nonfinite_rows += int((~finite).sum())
            keep = finite.numpy()
            acts, order = acts[finite], order[keep]
            meta = {k: v[keep] for k, v in meta.items()}
            if len(order) == 0:
                return None
        return {
            "acts": acts,
            "tau": torch.from_numpy(np.ascontiguousarray(meta["tau"], dtype=np.float32)),
            "rows": torch.from_numpy(order.astype(np.int64)),
        }

    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """Up to ``n`` finite training rows as float32 [n, d] (for initialisation statistics)."""
        self.setup()
        rng = np.random.default_rng(self.seed if seed is None else seed)
        ids = self.train_ids if len(self.train_ids) <= n else rng.choice(self.train_ids, n, replace=False)
        acts, _ = self.reader.read(np.sort(ids))
        acts = acts.float()
        finite = _finite_rows(acts)
        if not bool(finite.any()):
            raise UsageError(f"every sampled row of site {self.site_name!r} is NaN or inf")
        return acts[finite]

    # ----------------------------------------------------------------------------- loaders
    def train_dataloader(self):
        self.setup()
        return _BatchLoader(self, self.train_ids, train=True)

    def val_dataloader(self):
        self.setup()
        return _BatchLoader(self, self.val_ids, train=False)

    # ------------------------------------------------------------------ resumable position
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for the batch about to be *used* (Lightning pre-fetches one more): remember the
        # next position so that a checkpoint written after this step resumes right after it.
        if isinstance(batch, dict) and "position" in batch:
            self._consumed = {"epoch": batch["epoch"], "position": batch["position"] + 1}
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self._consumed, "nonfinite_rows": self.nonfinite_rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict.get("consumed")
        self._consumed = self._resume
        self.nonfinite_rows = int(state_dict.get("nonfinite_rows", 0))
