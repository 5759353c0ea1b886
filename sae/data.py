"""``ActivationDataModule``: SAE training batches from an activation store, for one SAE or many.

One run trains one SAE per *part*: a site, a timestep window and a branch. ``site``, ``window``
and ``branch`` each take one value or a list, and the run trains one SAE per combination (a grid,
e.g. Tinaz et al.'s block x branch x timestep SAEs); ``saes`` lists the combinations instead.
Each site is read once: a batch holds the rows of one site, and each row goes to the SAEs whose
window and branch it belongs to (``batch["parts"]``), so no row is read twice for two SAEs.

Rows are split into train and validation by *image* (tokens of one image are strongly correlated,
so a row-level split would leak), per site over the rows any of its SAEs takes, and served in a
global random permutation per site and epoch (which shuffles across images completely). The
batches of the sites are interleaved in proportion to their sizes, so every SAE trains from the
start of the run to its end. Each global batch of ``batch_size * world_size`` rows is cut into one
equal slice per rank for every SAE (its rows of the batch, in permutation order), every rank gets
the same number of batches (the remainder of an epoch is dropped), and the position inside the
epoch is part of the checkpoint so that a resumed run continues with exactly the batches it would
have seen.

A batch is a dict: ``site`` (its name), ``acts`` float32 [B, d], ``tau`` float32 [B], ``rows``
int64 [B] (row ids in the site), ``parts`` {SAE index: int64 positions in the batch of its rows,
or None for all of them; SAEs without rows in the batch are absent}, and for training batches
``epoch`` and ``position`` (ints).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
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


def check_branch(branch: str | None) -> str | None:
    if branch is not None and branch not in BRANCHES:
        raise UsageError(f"unknown branch {branch!r}; valid branches: {', '.join(BRANCHES)}, or null (every row)")
    return branch


@dataclass(frozen=True)
class Part:
    """The rows one SAE of a run trains on: a site, a timestep gate (None: every step) and a
    guidance branch (None: every stored row)."""

    site: str
    window: Any = None
    branch: str | None = None

    @property
    def window_spec(self):
        """The gate in its YAML spelling (None: every step)."""
        from activations.timesteps import gate_spec

        return None if self.window is None else gate_spec(self.window)

    @property
    def name(self) -> str:
        """``<site>[__<window>][__<branch>]``: the SAE's folder and its W&B namespace."""
        from sae.config import Placement

        return Placement(site=self.site, window=self.window_spec, branch=self.branch).folder_name

    def describe(self) -> str:
        return f"site {self.site!r} (window={self.window_spec!r}, branch={self.branch!r})"


def _finite_rows(acts: torch.Tensor) -> torch.Tensor:
    """bool [n]: rows of float32 ``acts`` [n, d] free of NaN and inf. A row sum is non-finite exactly
    when the row holds one (store values are float16 and cannot overflow a float32 sum), at a
    tenth of the cost of ``isfinite().all(-1)``."""
    return torch.isfinite(acts.sum(dim=-1))


def _members(rows: np.ndarray, part_ids: np.ndarray) -> np.ndarray:
    """bool [len(rows)]: which ``rows`` are in the sorted id array ``part_ids``."""
    if len(part_ids) == 0:
        return np.zeros(len(rows), dtype=bool)
    at = np.minimum(np.searchsorted(part_ids, rows), len(part_ids) - 1)
    return part_ids[at] == rows


class _BatchLoader:
    """An iterable of batches (training: the interleaved schedule of every site; validation: each
    site's held-out rows in turn). Lightning treats it as a dataloader."""

    def __init__(self, dm: "ActivationDataModule", *, train: bool):
        self.dm, self.train = dm, train

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self.dm, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def __len__(self) -> int:
        rank, world = self._world()
        b = self.dm.batch_size
        if self.train:
            return sum(self.dm.site_batches(world).values())
        return sum(math.ceil(len(ids[rank::world]) / b) for ids in self.dm._val.values())

    def __iter__(self):
        rank, world = self._world()
        b = self.dm.batch_size
        if not self.train:
            for site, ids in self.dm._val.items():
                mine = ids[rank::world]
                for lo in range(0, len(mine), b):
                    batch = self.dm._read(site, {k: None for k in self.dm.parts_of(site)}, mine[lo: lo + b])
                    if batch is not None:
                        yield batch
            return
        trainer = getattr(self.dm, "trainer", None)
        epoch = int(trainer.current_epoch) if trainer is not None else self.dm._epoch_fallback
        start = 0
        if self.dm._resume is not None and self.dm._resume["epoch"] == epoch:
            start = int(self.dm._resume["position"])
        self.dm._resume = None
        schedule = self.dm.schedule(world)
        orders = {site: self.dm.epoch_order(epoch, site) for site in self.dm.sites}
        for pos in range(start, len(schedule)):
            site, k = schedule[pos]
            glob = orders[site][k * b * world: (k + 1) * b * world]
            slices = self.dm.rank_slices(site, glob, rank, world)
            batch = self.dm._read(site, slices, None)
            if batch is None or (world > 1 and len(batch["parts"]) != len(slices)):
                # every row of this slice (or of one SAE's) was non-finite and skipped
                if world > 1:
                    raise UsageError(
                        f"every row of training batch {pos} on rank {rank} (or of one SAE's part of it) is NaN or inf; "
                        f"skipping it would put the ranks out of step. Clean the store or use a larger --data.batch_size")
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
    """Batches of a store's activations for training one SAE, or one per site x window x branch."""

    def __init__(
        self,
        store: str,
        site: str | list[str] | None = None,
        window: WindowSpec | list[WindowSpec] = None,
        branch: str | list[str | None] | None = None,
        saes: list[dict] | None = None,
        batch_size: int = 4096,
        val_fraction: float = 0.05,
        max_val_rows: int = 65536,
        nonfinite: Literal["skip", "error"] = "skip",
        seed: int = 0,
    ):
        """
        Args:
            store: Folder of a harvest (ActivationStore root).
            site: Site to train on, or a list of sites (one SAE each); may be omitted when the store
                holds exactly one.
            window: Timestep window: early (tau in [0.6, 1]), middle ([0.2, 0.6)), late ([0, 0.2)),
                {tau: [lo, hi]}, or null for one SAE pooled over all timesteps; or a list of them
                (one SAE each).
            branch: Guidance branch to train on (cond or uncond); null keeps every stored row; or a
                list of them (one SAE each).
            saes: The SAEs of the run as a list of {site, window, branch} (each key optional as
                above), instead of the grid of site x window x branch. Each site is read once.
            batch_size: Rows of a site per batch on each rank (the global batch is batch_size x
                world size); an SAE whose window or branch takes part of a site trains on its part.
            val_fraction: Fraction of images held out for validation metrics (split by image, not by token).
            max_val_rows: Cap on held-out tokens evaluated per site and validation run.
            nonfinite: What to do with rows holding NaN or inf: skip (drop and count them, logged as
                data/nonfinite_rows) or error (stop, naming the first offending row).
            seed: Seed of the train/validation split and of the per-epoch shuffling.
        """
        super().__init__()
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if nonfinite not in ("skip", "error"):
            raise UsageError(f"nonfinite must be 'skip' or 'error', got {nonfinite!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if isinstance(max_val_rows, bool) or not isinstance(max_val_rows, int) or max_val_rows < 1:
            raise UsageError(f"max_val_rows must be an int >= 1, got {max_val_rows!r}")
        self.save_hyperparameters()
        self.store_path = store
        self._wanted = self._combinations(site, window, branch, saes)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_val_rows = max_val_rows
        self.nonfinite = nonfinite
        self.seed = seed
        self.nonfinite_rows = 0
        self._parts: list[Part] | None = None
        self._readers: dict = {}
        self._resume: dict | None = None
        self._consumed: dict | None = None
        self._epoch_fallback = 0
        self._train: dict[str, np.ndarray] | None = None
        self._val: dict[str, np.ndarray] = {}
        self._part_ids: list[np.ndarray] = []

    @staticmethod
    def _combinations(site, window, branch, saes) -> list[tuple]:
        """[(site or None, gate or None, branch or None)], every window and branch checked."""
        def as_list(value):
            return list(value) if isinstance(value, (list, tuple)) else [value]

        if saes is not None:
            if site is not None or window is not None or branch is not None:
                raise UsageError("give the SAEs either as --data.saes or as --data.site/--data.window/--data.branch "
                                 f"(a grid), not both (got saes={saes!r} with site={site!r}, window={window!r}, "
                                 f"branch={branch!r})")
            if not isinstance(saes, list) or not saes:
                raise UsageError(f"saes must be a non-empty list of {{site, window, branch}}, got {saes!r}")
            combos = []
            for entry in saes:
                if not isinstance(entry, dict) or set(entry) - {"site", "window", "branch"}:
                    raise UsageError(f"each entry of saes is a mapping with keys site, window, branch; got {entry!r}")
                combos.append((entry.get("site"), entry.get("window"), entry.get("branch")))
        else:
            lists = [as_list(site), as_list(window), as_list(branch)]
            for name, values in zip(("site", "window", "branch"), lists):
                if not values:
                    raise UsageError(f"{name} is an empty list; give at least one value (or null)")
            combos = list(itertools.product(*lists))
        out = []
        for s, w, b in combos:
            if s is not None and not isinstance(s, str):
                raise UsageError(f"a site is a name, got {s!r}")
            out.append((s, check_window(w), check_branch(b)))
        return out

    # -------------------------------------------------------------------------------- setup
    def _store(self):
        from activations.store import ActivationStore

        store = ActivationStore(self.store_path)
        if not store.sites:
            raise UsageError(f"activation store {self.store_path} holds no sites (no {'<site>'}/manifest.json)")
        return store

    @property
    def parts(self) -> list[Part]:
        """The run's SAEs, in order (the sites resolved against the store; duplicates refused)."""
        if self._parts is None:
            store = None
            parts = []
            for site, window, branch in self._wanted:
                if site is None or site not in self._readers:
                    store = store or self._store()
                    if site is None:
                        if len(store.sites) != 1:
                            raise UsageError(f"store {self.store_path} holds {len(store.sites)} sites; choose one with "
                                             f"--data.site, valid: {', '.join(store.sites)}")
                        site = store.sites[0]
                    if site not in store.sites:
                        raise UsageError(f"site {site!r} is not in store {self.store_path}; valid sites: "
                                         f"{', '.join(store.sites)}")
                    self._readers[site] = store.site(site)
                parts.append(Part(site, window, branch))
            names = [p.name for p in parts]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise UsageError(f"the run lists the SAE {dup[0]} twice; each site x window x branch trains once")
            self._parts = parts
        return self._parts

    @property
    def sites(self) -> list[str]:
        """The sites read, each once, in the order of their first SAE."""
        return list(dict.fromkeys(p.site for p in self.parts))

    def parts_of(self, site: str) -> list[int]:
        return [k for k, p in enumerate(self.parts) if p.site == site]

    def site_reader(self, site: str):
        """The store's SiteReader of ``site`` (opened once)."""
        self.parts  # noqa: B018 - resolves and opens every site of the run
        return self._readers[site]

    def _single(self) -> Part:
        if len(self.parts) != 1:
            raise UsageError(f"this run trains {len(self.parts)} SAEs ({', '.join(p.name for p in self.parts)}); "
                             f"ask for one of them")
        return self.parts[0]

    # One SAE's view, for the single-SAE callers (and the tests) that name no part.
    @property
    def reader(self):
        return self.site_reader(self._single().site)

    @property
    def site_name(self) -> str:
        return self._single().site

    @property
    def window(self):
        return self._single().window

    @property
    def branch(self) -> str | None:
        return self._single().branch

    @property
    def window_spec(self):
        """The training rows' timestep gate in its YAML spelling (None: every step)."""
        return self._single().window_spec

    @property
    def width(self) -> int:
        return self.width_of(self._single())

    @property
    def manifest(self) -> dict:
        return self.site_reader(self._single().site).manifest

    def width_of(self, part: Part) -> int:
        return self.site_reader(part.site).width

    @property
    def train_ids(self) -> np.ndarray:
        self._single()
        return self.part_rows(0, "train")

    @property
    def val_ids(self) -> np.ndarray:
        self._single()
        return self.part_rows(0, "val")

    def part_rows(self, k: int, split: Literal["train", "val"]) -> np.ndarray:
        """Sorted row ids of SAE ``k`` in the training or held-out split."""
        self.setup()
        pool = (self._train if split == "train" else self._val)[self.parts[k].site]
        return np.sort(pool[_members(pool, self._part_ids[k])])

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        world = int(self.trainer.world_size) if self.trainer is not None else 1
        part_ids = []
        for part in self.parts:
            reader = self.site_reader(part.site)
            if reader.num_rows == 0:
                raise UsageError(f"site {part.site!r} of store {self.store_path} is empty (0 rows): nothing to train on")
            ids = reader.select(window=part.window, branch=part.branch)
            if len(ids) == 0:
                taus = np.unique(reader.meta_column("t")) / reader.num_train_timesteps
                branches = sorted({str(b) for b in reader.branch_names(np.unique(reader.meta_column("branch")))})
                raise UsageError(
                    f"no rows of site {part.site!r} match window={part.window_spec!r}, branch={part.branch!r} "
                    f"(the site has {reader.num_rows} rows with tau in {sorted(float(t) for t in taus)} and "
                    f"branches {branches}); valid windows: {window_table()}, or {{tau: [lo, hi]}}"
                )
            part_ids.append(ids)
        train, val = {}, {}
        for site in self.sites:
            ks = self.parts_of(site)
            ids = part_ids[ks[0]] if len(ks) == 1 else np.unique(np.concatenate([part_ids[k] for k in ks]))
            train[site], val[site] = self._split(self.site_reader(site), ids)
            for k in ks:
                got = int(_members(train[site], part_ids[k]).sum())
                if got < world:
                    raise UsageError(f"{self.parts[k].describe()} has {got} training rows after the image split, "
                                     f"fewer than the {world} rank(s); harvest more images or widen the window")
            if len(train[site]) < self.batch_size * world:
                raise UsageError(
                    f"{self.parts[ks[0]].describe() if len(ks) == 1 else f'site {site!r}'} has {len(train[site])} "
                    f"training rows after filtering, fewer than one global batch of batch_size {self.batch_size} x "
                    f"{world} rank(s); lower --data.batch_size"
                )
        self._part_ids, self._train, self._val = part_ids, train, val

    def _split(self, reader, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) row ids of ``ids``, split by image; val capped at max_val_rows."""
        images = reader.meta_column("image")[ids]
        unique = np.unique(images)
        rng = np.random.default_rng(self.seed)
        n_val = int(round(self.val_fraction * len(unique))) if len(unique) > 1 else 0
        n_val = min(n_val, len(unique) - 1)
        if self.val_fraction > 0 and len(unique) > 1:
            n_val = max(n_val, 1)
        val_images = rng.permutation(unique)[:n_val]
        is_val = np.isin(images, val_images)
        train_ids, val_ids = ids[~is_val], ids[is_val]
        if len(val_ids) == 0 and self.val_fraction > 0:
            # One image only: evaluate on a sample of training rows rather than on nothing.
            val_ids = train_ids
        if len(val_ids) > self.max_val_rows:
            val_ids = np.sort(rng.choice(val_ids, self.max_val_rows, replace=False))
        return train_ids, val_ids

    # ------------------------------------------------------------------------------ schedule
    def epoch_order(self, epoch: int, site: str | None = None) -> np.ndarray:
        """Training row ids of ``site`` (default: the run's only one) in the order of epoch ``epoch``
        (identical on every rank)."""
        self.setup()
        site = site or self._single().site
        return np.random.default_rng([self.seed, epoch]).permutation(self._train[site])

    def site_batches(self, world: int = 1) -> dict[str, int]:
        """Global batches per epoch of each site (the remainder of an epoch is dropped)."""
        self.setup()
        return {site: len(ids) // (self.batch_size * world) for site, ids in self._train.items()}

    def schedule(self, world: int = 1) -> list[tuple[str, int]]:
        """One epoch's (site, batch index) in order: each site's batches spread evenly over the
        epoch (by the midpoint of each batch's share), so every site's SAEs train throughout."""
        counts = self.site_batches(world)
        keyed = [((k + 0.5) / n, i, site, k) for i, (site, n) in enumerate(counts.items()) for k in range(n)]
        return [(site, k) for _, _, site, k in sorted(keyed)]

    def rank_slices(self, site: str, glob: np.ndarray, rank: int, world: int) -> dict[int, np.ndarray]:
        """{SAE index: this rank's row ids} of the global batch ``glob`` (permutation order): each
        SAE's rows of the batch cut into ``world`` equal slices (the remainder dropped), so every
        rank trains the same SAEs on the same number of rows. SAEs with fewer rows than ranks in
        the batch sit it out, on every rank alike."""
        out = {}
        for k in self.parts_of(site):
            mine = glob[_members(glob, self._part_ids[k])]
            per = len(mine) // world
            if per:
                out[k] = mine[rank * per: (rank + 1) * per]
        return out

    # ------------------------------------------------------------------------------- reading
    def _read(self, site: str, slices: dict[int, np.ndarray | None], ids: np.ndarray | None) -> dict[str, Any] | None:
        """Read the union of ``slices`` (or ``ids``, splitting it among ``slices``' SAEs by
        membership) once, and say which rows go to which SAE."""
        if ids is None:  # sorted: sequential memory-map access
            order = np.unique(np.concatenate(list(slices.values()))) if slices else np.zeros(0, np.int64)
        else:
            order = np.sort(ids)
        if len(order) == 0:
            return None
        reader = self.site_reader(site)
        acts, meta = reader.read(order)
        acts = acts.float()  # float32 for training
        finite = _finite_rows(acts)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            if self.nonfinite == "error":
                raise UsageError(
                    f"non-finite activation (NaN or inf) in row {int(order[bad])} of site {site!r} "
                    f"(image {int(meta['image'][bad])}, step {int(meta['step'][bad])}, t {int(meta['t'][bad])}, "
                    f"position ({int(meta['i'][bad])}, {int(meta['j'][bad])})); set --data.nonfinite skip to drop such rows"
                )
            self.nonfinite_rows += int((~finite).sum())
            keep = finite.numpy()
            acts, order = acts[finite], order[keep]
            meta = {k: v[keep] for k, v in meta.items()}
            if len(order) == 0:
                return None
        parts = {}
        for k, rows in slices.items():
            mask = _members(order, self._part_ids[k] if rows is None else np.sort(rows))
            if mask.all():
                parts[k] = None  # all of the batch: no gather
            elif mask.any():
                parts[k] = torch.from_numpy(np.flatnonzero(mask))
        return {
            "site": site,
            "acts": acts,
            "tau": torch.from_numpy(np.ascontiguousarray(meta["tau"], dtype=np.float32)),
            "rows": torch.from_numpy(order.astype(np.int64)),
            "parts": parts,
        }

    def sample(self, n: int, seed: int | None = None, part: int = 0) -> torch.Tensor:
        """Up to ``n`` finite training rows of SAE ``part`` as float32 [n, d] (for initialisation
        statistics)."""
        ids = self.part_rows(part, "train")
        rng = np.random.default_rng(self.seed if seed is None else seed)
        if len(ids) > n:
            ids = np.sort(rng.choice(ids, n, replace=False))
        acts, _ = self.site_reader(self.parts[part].site).read(ids)
        acts = acts.float()
        finite = _finite_rows(acts)
        if not bool(finite.any()):
            raise UsageError(f"every sampled row of {self.parts[part].describe()} is NaN or inf")
        return acts[finite]

    # ----------------------------------------------------------------------------- loaders
    def train_dataloader(self):
        self.setup()
        return _BatchLoader(self, train=True)

    def val_dataloader(self):
        self.setup()
        return _BatchLoader(self, train=False)

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
