"""Timestep vocabulary: tau, the named windows, and choosing which denoising steps to capture.

A denoising step has an index ``step`` (0 = first call of the U-Net, pure noise) and the
scheduler's integer timestep ``t``; ``tau = t / num_train_timesteps`` lies in [0, 1] with 1 = noise.
The named windows follow Tinaz et al.: early tau in [0.6, 1], middle [0.2, 0.6), late [0, 0.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# name -> (lo, hi); a window holds lo <= tau < hi, except that hi >= 1 is inclusive so that
# tau = 1 (pure noise) belongs to "early".
WINDOWS: dict[str, tuple[float, float]] = {
    "early": (0.6, 1.0),
    "middle": (0.2, 0.6),
    "late": (0.0, 0.2),
}

BRANCHES = ("uncond", "cond")  # stored as int8: index into this tuple
BRANCH_CHOICES = ("cond", "uncond", "both")


def window_bounds(window: str | tuple[float, float] | Sequence[float]) -> tuple[float, float]:
    """Return (lo, hi) for a named window or an explicit pair; errors name the valid windows."""
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"unknown timestep window {window!r}; valid windows: {', '.join(WINDOWS)} or a (lo, hi) pair")
        return WINDOWS[window]
    lo, hi = (float(x) for x in window)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"timestep window {(lo, hi)!r} must satisfy 0 <= lo <= hi <= 1")
    return lo, hi


def in_window(t: np.ndarray, num_train_timesteps: int, window) -> np.ndarray:
    """Boolean mask of integer timesteps ``t`` inside ``window``.

    Compared on t in float64 rather than on a stored float32 tau, so that a boundary such as
    t = 600 of 1000 lands in the documented window and not on the float32 side of it.
    """
    lo, hi = window_bounds(window)
    tau = np.asarray(t, dtype=np.float64) / float(num_train_timesteps)
    upper = tau <= hi if hi >= 1.0 else tau < hi
    return (tau >= lo) & upper


def branch_code(branch: str) -> int:
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; valid branches: {', '.join(BRANCHES)}")
    return BRANCHES.index(branch)


def check_branch(branch: str) -> str:
    if branch not in BRANCH_CHOICES:
        raise ValueError(f"unknown branch {branch!r}; valid choices: {', '.join(BRANCH_CHOICES)}")
    return branch


def select_steps(spec, timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    """Step indices of a schedule chosen by ``spec``.

    spec is one of:
      * ``"all"`` or ``None``: every step;
      * ``"every:N"`` (or ``{"every": N}``): steps 0, N, 2N, ...;
      * a window name (``"early"``, ``"middle"``, ``"late"``): steps whose tau lies in the window;
      * a list of integer scheduler timesteps ``t``: every step whose t is in the list (a schedule
        may repeat a timestep, e.g. PNDM); a t not in the schedule is an error that lists the
        schedule's timesteps.
    """
    ts = [int(t) for t in timesteps]
    n = len(ts)
    if spec is None or spec == "all":
        return list(range(n))
    if isinstance(spec, dict):
        if set(spec) != {"every"}:
            raise ValueError(f"unknown timestep spec {spec!r}; use {{'every': N}}")
        spec = f"every:{spec['every']}"
    if isinstance(spec, str):
        if spec.startswith("every:"):
            every = int(spec.split(":", 1)[1])
            if every < 1:
                raise ValueError(f"timestep spec {spec!r}: N must be >= 1")
            return list(range(0, n, every))
        if spec in WINDOWS:
            mask = in_window(np.array(ts), num_train_timesteps, spec)
            return [i for i in range(n) if mask[i]]
        raise ValueError(
            f"unknown timestep spec {spec!r}; valid: 'all', 'every:N', {', '.join(repr(w) for w in WINDOWS)}, or a list of timesteps"
        )
    wanted = [int(t) for t in spec]
    missing = [t for t in wanted if t not in ts]
    if missing:
        raise ValueError(f"timestep(s) {missing} not in the schedule; valid timesteps: {ts}")
    return [i for i, t in enumerate(ts) if t in set(wanted)]
