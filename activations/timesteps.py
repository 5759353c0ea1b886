"""Timestep gates and guidance branches: typed, parsed once, used everywhere.

A denoising step has an index ``step`` (0 = the first call of the U-Net, pure noise) and the
scheduler's integer timestep ``t``; ``tau = t / num_train_timesteps`` lies in [0, 1], 1 = noise.

Which steps something applies to is a *gate*, one of these types, each with one spelling in Python
and one in YAML / on the command line (nothing is guessed from whether numbers are ints or floats):

=================  ==================================  ====================================
gate               Python                              YAML / CLI
=================  ==================================  ====================================
every step         ``All()`` or ``None``               ``all``
a named window     ``Window("early")``                 ``early`` / ``middle`` / ``late``
a tau range        ``Window.tau(0.6, 1.0)``            ``{tau: [0.6, 1.0]}``
step indices       ``Steps([0, 1, 2])``                ``{steps: [0, 1, 2]}``
every N-th step    ``Every(2)``                        ``{every: 2}`` (or ``every:2``)
scheduler t's      ``Timesteps([999, 500])``           ``{t: [999, 500]}``
=================  ==================================  ====================================

``parse_when`` turns any of these spellings into a gate and refuses everything else with a message
listing them. The named windows follow Tinaz et al. (2025): early tau in [0.6, 1], middle
[0.2, 0.6), late [0, 0.2) (``WINDOWS``; ``window_table()`` writes them for messages); a window
holds lo <= tau < hi, except that hi = 1 is inclusive so that pure noise belongs to "early"
(``in_tau_window``, the one place that rule is written; ``Window.holds`` applies it to a stored
float tau). Select steps of a schedule with ``select_steps`` / ``Window.select``, never by a
fraction of the step count (schedules are not uniform in tau).

The guidance branch is a ``Branch``: ``cond``, ``uncond`` or ``both`` (``parse_branch``). Batches
of a pipeline with classifier-free guidance stack [uncond; cond] rows; ``branch_codes`` gives each
row's branch and ``Branch.rows`` the rows of one branch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from common.errors import UsageError

WINDOWS: dict[str, tuple[float, float]] = {
    "early": (0.6, 1.0),
    "middle": (0.2, 0.6),
    "late": (0.0, 0.2),
}

BRANCHES = ("uncond", "cond")  # stored as int8: index into this tuple
BRANCH_CHOICES = ("cond", "uncond", "both")


def _interval(lo: float, hi: float) -> str:
    return f"[{lo:g}, {hi:g}]" if hi >= 1.0 else f"[{lo:g}, {hi:g})"


def window_table() -> str:
    """The named windows and their tau intervals, for messages: ``early [0.6, 1], middle [0.2, 0.6), ...``."""
    return ", ".join(f"{name} {_interval(*bounds)}" for name, bounds in WINDOWS.items())


def in_tau_window(tau, lo: float, hi: float):
    """Is ``tau`` (a float, a numpy array or a torch tensor of t / num_train_timesteps) in the
    window [lo, hi)? The one boundary rule: lo <= tau < hi, except that hi = 1 is inclusive so
    that pure noise belongs to "early". Stored float32 tau agree with float64 t / N here because
    both sides of each comparison round the same way (see ``Window.mask``)."""
    return (tau >= lo) & ((tau <= hi) if hi >= 1.0 else (tau < hi))


GATE_FORMS = (
    f"'all'; a window {', '.join(repr(w) for w in WINDOWS)}; {{tau: [lo, hi]}} with 0 <= lo < hi <= 1; "
    "{steps: [i, ...]} (step indices); {every: N} or every:N; {t: [t, ...]} (scheduler timesteps)"
)


class When:
    """A timestep gate. ``contains`` answers for one U-Net call, ``mask`` for arrays of rows,
    ``select`` for a schedule; ``to_spec`` gives the YAML spelling back."""

    def contains(self, step: int | None, t: int | None, num_train_timesteps: int) -> bool:
        return bool(self.mask(np.array([-1 if step is None else step]), np.array([-1 if t is None else t]), num_train_timesteps)[0])

    def mask(self, steps: np.ndarray, ts: np.ndarray, num_train_timesteps: int) -> np.ndarray:
        raise NotImplementedError

    def select(self, schedule: Sequence[int], num_train_timesteps: int) -> list[int]:
        """Step indices of ``schedule`` (the scheduler's timesteps, in order) inside the gate."""
        ts = np.asarray([int(t) for t in schedule], dtype=np.int64)
        return [int(i) for i in np.flatnonzero(self.mask(np.arange(len(ts)), ts, num_train_timesteps))]

    def to_spec(self) -> Any:
        raise NotImplementedError

    def __str__(self) -> str:
        spec = self.to_spec()
        return spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in spec.items())


@dataclasses.dataclass(frozen=True)
class All(When):
    """Every step."""

    def mask(self, steps, ts, num_train_timesteps):
        return np.ones(len(np.asarray(steps)), dtype=bool)

    def contains(self, step, t, num_train_timesteps) -> bool:
        return True

    def to_spec(self):
        return "all"


@dataclasses.dataclass(frozen=True)
class Window(When):
    """A tau range: ``Window("early")`` or ``Window.tau(lo, hi)``."""

    name: str | None = None
    lo: float | None = None
    hi: float | None = None

    def __post_init__(self):
        if self.name is not None:
            if self.name not in WINDOWS:
                raise UsageError(f"unknown timestep window {self.name!r}; valid windows: {', '.join(WINDOWS)}, or {{tau: [lo, hi]}}")
            object.__setattr__(self, "lo", WINDOWS[self.name][0])
            object.__setattr__(self, "hi", WINDOWS[self.name][1])
            return
        if self.lo is None or self.hi is None:
            raise UsageError(f"Window needs a name ({', '.join(WINDOWS)}) or both tau bounds: Window.tau(lo, hi)")
        lo, hi = float(self.lo), float(self.hi)
        if not (0.0 <= lo < hi <= 1.0):
            raise UsageError(f"timestep window {{tau: [{lo:g}, {hi:g}]}} must satisfy 0 <= lo < hi <= 1 "
                             f"(tau = t / num_train_timesteps, 1 = pure noise); valid windows: {', '.join(WINDOWS)}, "
                             f"or {{tau: [lo, hi]}}")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    @classmethod
    def tau(cls, lo: float, hi: float) -> "Window":
        return cls(lo=lo, hi=hi)

    @property
    def bounds(self) -> tuple[float, float]:
        return self.lo, self.hi

    def mask(self, steps, ts, num_train_timesteps):
        # Compared on t in float64 rather than on a stored float32 tau, so that a boundary such as
        # t = 600 of 1000 lands in the documented window and not on the float32 side of it.
        tau = np.asarray(ts, dtype=np.float64) / float(num_train_timesteps)
        return self.holds(tau) & (np.asarray(ts) >= 0)

    def contains(self, step, t, num_train_timesteps) -> bool:
        if t is None:
            return False
        return bool(self.holds(t / float(num_train_timesteps)))

    def holds(self, tau):
        """Is ``tau`` in this window (a float, or an array / tensor of them: a bool mask)? The
        rule of ``in_tau_window``, for rows that carry a stored tau rather than t."""
        return in_tau_window(tau, self.lo, self.hi)

    def to_spec(self):
        return self.name if self.name is not None else {"tau": [self.lo, self.hi]}

    @property
    def label(self) -> str:
        """A short name for folders and plots: the window's name or ``tau0.6-1``."""
        return self.name if self.name is not None else f"tau{self.lo:g}-{self.hi:g}"


@dataclasses.dataclass(frozen=True)
class Steps(When):
    """Step indices (0 = the first U-Net call of a generation)."""

    indices: tuple[int, ...] = ()

    def __init__(self, indices: Iterable[int]):
        idx = tuple(_ints(indices, "steps"))
        if any(i < 0 for i in idx):
            raise UsageError(f"step indices must be >= 0, got {list(idx)}")
        object.__setattr__(self, "indices", idx)

    def mask(self, steps, ts, num_train_timesteps):
        return np.isin(np.asarray(steps), np.asarray(self.indices, dtype=np.int64))

    def contains(self, step, t, num_train_timesteps) -> bool:
        return step is not None and step in self.indices

    def select(self, schedule, num_train_timesteps):
        missing = [i for i in self.indices if i >= len(schedule)]
        if missing:
            raise UsageError(f"step(s) {missing} out of range for a schedule of {len(schedule)} steps (valid: 0..{len(schedule) - 1})")
        return super().select(schedule, num_train_timesteps)

    def to_spec(self):
        return {"steps": list(self.indices)}


@dataclasses.dataclass(frozen=True)
class Every(When):
    """Steps 0, N, 2N, ..."""

    n: int = 1

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise UsageError(f"{{every: N}} needs an integer N >= 1, got {self.n!r}")

    def mask(self, steps, ts, num_train_timesteps):
        s = np.asarray(steps)
        return (s >= 0) & (s % self.n == 0)

    def contains(self, step, t, num_train_timesteps) -> bool:
        return step is not None and step % self.n == 0

    def to_spec(self):
        return {"every": int(self.n)}


@dataclasses.dataclass(frozen=True)
class Timesteps(When):
    """Scheduler timesteps t (a schedule may repeat one, e.g. PNDM: every such step is in)."""

    values: tuple[int, ...] = ()

    def __init__(self, values: Iterable[int]):
        object.__setattr__(self, "values", tuple(_ints(values, "t")))

    def mask(self, steps, ts, num_train_timesteps):
        return np.isin(np.asarray(ts), np.asarray(self.values, dtype=np.int64))

    def contains(self, step, t, num_train_timesteps) -> bool:
        return t is not None and t in self.values

    def select(self, schedule, num_train_timesteps):
        ts = [int(t) for t in schedule]
        missing = [t for t in self.values if t not in ts]
        if missing:
            raise UsageError(f"timestep(s) {missing} not in the schedule; valid timesteps: {ts}")
        return super().select(schedule, num_train_timesteps)

    def to_spec(self):
        return {"t": list(self.values)}


def _ints(values, what: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise UsageError(f"{{{what}: [...]}} needs a list of integers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise UsageError(f"{{{what}: [...]}} needs integers, got {v!r} in {list(values)!r}")
        out.append(int(v))
    return out


_DICT_FORMS = {
    "tau": lambda v: Window.tau(*_pair(v)),
    "steps": Steps,
    "every": lambda v: Every(v),
    "t": Timesteps,
    "window": lambda v: Window(v),
}


def _pair(v) -> tuple[float, float]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2:
        raise UsageError(f"{{tau: [lo, hi]}} needs two numbers, got {v!r}")
    return float(v[0]), float(v[1])


def parse_when(spec: Any) -> When:
    """A gate from any accepted spelling (see the module doc); anything else is a ValueError that
    lists the accepted forms."""
    if spec is None:
        return All()
    if isinstance(spec, When):
        return spec
    if isinstance(spec, str):
        s = spec.strip()
        if s == "all":
            return All()
        if s in WINDOWS:
            return Window(s)
        if s.startswith("every:"):
            n = s.split(":", 1)[1]
            if not n.strip().isdigit():
                raise UsageError(f"timestep gate {spec!r}: N in 'every:N' must be an integer >= 1")
            return Every(int(n))
        raise UsageError(f"unknown timestep window {spec!r}; valid windows: {', '.join(WINDOWS)}; valid gates: {GATE_FORMS}")
    if isinstance(spec, dict) and len(spec) == 1:
        key, value = next(iter(spec.items()))
        if key in _DICT_FORMS:
            return _DICT_FORMS[key](value)
    raise UsageError(f"timestep gate {spec!r} is not one of the accepted forms: {GATE_FORMS}")


def gate_spec(when: When | None) -> Any:
    """The YAML spelling of a gate (for configs and files)."""
    return parse_when(when).to_spec()


# --------------------------------------------------------------------------------------------
# guidance branches


@dataclasses.dataclass(frozen=True)
class Branch:
    """A guidance branch: ``cond``, ``uncond`` or ``both``."""

    name: str = "both"
    CHOICES: ClassVar[tuple[str, ...]] = BRANCH_CHOICES

    def __post_init__(self):
        if self.name not in BRANCH_CHOICES:
            raise UsageError(f"unknown branch {self.name!r}; valid choices: {', '.join(BRANCH_CHOICES)}")

    def rows(self, codes: torch.Tensor) -> torch.Tensor | None:
        """Batch row indices of this branch given per-row codes (0 uncond, 1 cond); None = all rows."""
        if self.name == "both":
            return None
        return torch.nonzero(codes == BRANCHES.index(self.name)).flatten()

    def row_mask(self, codes: np.ndarray | torch.Tensor):
        """Boolean mask over rows (numpy or torch, like ``codes``)."""
        if self.name == "both":
            return codes == codes  # all True, same type and device
        return codes == BRANCHES.index(self.name)

    def __str__(self) -> str:
        return self.name


def parse_branch(spec: Any) -> Branch:
    if isinstance(spec, Branch):
        return spec
    if spec is None:
        return Branch("both")
    if not isinstance(spec, str):
        raise UsageError(f"unknown branch {spec!r}; valid choices: {', '.join(BRANCH_CHOICES)}")
    return Branch(spec)


def branch_codes(batch: int, cfg: bool, device=None) -> torch.Tensor:
    """Per-row branch codes of a batch: diffusers stacks [uncond; cond] under guidance."""
    codes = torch.ones(batch, dtype=torch.long, device=device)
    if cfg and batch % 2 == 0:
        codes[: batch // 2] = 0
    return codes


def branch_code(branch: str) -> int:
    """The stored int8 code of ``uncond`` / ``cond``."""
    if branch not in BRANCHES:
        raise UsageError(f"unknown branch {branch!r}; valid branches: {', '.join(BRANCHES)}")
    return BRANCHES.index(branch)


def check_branch(branch: str) -> str:
    return parse_branch(branch).name


# --------------------------------------------------------------------------------------------
# thin helpers kept for callers that hold plain specs


def window_bounds(window: Any) -> tuple[float, float]:
    """(lo, hi) of a window spelling (``early`` or ``{tau: [lo, hi]}`` or a Window)."""
    gate = parse_when(window)
    if not isinstance(gate, Window):
        raise UsageError(f"{window!r} is not a timestep window; valid: {', '.join(WINDOWS)}, or {{tau: [lo, hi]}}")
    return gate.bounds


def in_window(t, num_train_timesteps: int, window) -> np.ndarray:
    """Boolean mask of integer timesteps ``t`` inside a window spelling."""
    t = np.asarray(t)
    gate = parse_when(window)
    if not isinstance(gate, Window):
        raise UsageError(f"{window!r} is not a timestep window; valid: {', '.join(WINDOWS)}, or {{tau: [lo, hi]}}")
    return gate.mask(np.zeros(len(np.atleast_1d(t)), dtype=np.int64), np.atleast_1d(t), num_train_timesteps).reshape(t.shape)


def select_steps(spec, timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    """Step indices of a schedule chosen by a gate spelling (see ``parse_when``)."""
    return parse_when(spec).select(timesteps, num_train_timesteps)
