"""Timing primitives: interleaved medians, the unit costs and the operation-count floor of
Algorithm 1 (docs/design.md §3), and per-stage breakdowns of real library calls.

Floor of the defense for one batch (paper 1, Algorithm 1; docs/design.md §3):

    floor(T_f, R) = N * t_f  +  floor(N / T_f) * R * t_step

t_f: one forward of the cell f on the batch; t_step: one entropy-gradient step of Eq. 8
(injection + f + head forward, backward to the input), timed through the library's own
``entropy_descent`` with R = 1.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..defense import entropy_descent, per_sample
from ..defense_defaults import DEFAULT_BETA, DEFAULT_EPS
from ..stages import STAGES, timing_stages

#: a timed sample repeats a fast call until it lasts this long (timer resolution and jitter)
MIN_SAMPLE_S = 0.02
MAX_INNER_CALLS = 200

__all__ = [
    "MIN_SAMPLE_S",
    "TimedCall",
    "interleaved_medians",
    "median_time",
    "UnitCosts",
    "operation_floor",
    "stage_breakdown",
]


class TimedCall:
    """A function and how many calls make one timed sample, decided by one warm-up call:
    a fast call is repeated until a sample lasts ``min_sample_s`` (timer resolution, jitter)."""

    def __init__(self, fn: Callable[[], object], min_sample_s: float = MIN_SAMPLE_S):
        self.fn = fn
        once = self._seconds_per_call(1)
        self.calls = max(1, min(MAX_INNER_CALLS, math.ceil(min_sample_s / max(once, 1e-9))))

    def _seconds_per_call(self, calls: int) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            self.fn()
        return (time.perf_counter() - t0) / calls

    def sample(self) -> float:
        """Seconds per call, from one timed sample."""
        return self._seconds_per_call(self.calls)


def interleaved_medians(
    fns: Dict[str, Callable[[], object]], repeats: int, min_sample_s: float = MIN_SAMPLE_S
) -> Dict[str, float]:
    """Median seconds per call of each function (after a warm-up call). Every repeat samples
    every function once (round-robin), so slow drifts of a shared machine hit all alike."""
    timed = {name: TimedCall(fn, min_sample_s) for name, fn in fns.items()}
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, call in timed.items():
            samples[name].append(call.sample())
    return {name: statistics.median(times) for name, times in samples.items()}


def median_time(fn: Callable[[], object], repeats: int, min_sample_s: float = MIN_SAMPLE_S) -> float:
    """Median seconds of one call of ``fn`` (after one warm-up call)."""
    return interleaved_medians({"fn": fn}, repeats, min_sample_s)["fn"]


def operation_floor(n_steps: int, T_f: int, R: int, t_f: float, t_step: float) -> float:
    """docs/design.md §3: N forwards of f plus floor(N / T_f) * R entropy-gradient steps."""
    return n_steps * t_f + (n_steps // T_f) * R * t_step


class UnitCosts:
    """Samples t_f and t_step on one batch; call :meth:`sample` next to every measurement,
    so that the floor and the measured times share the (noisy, shared) machine's state."""

    def __init__(self, model, x: Tensor):
        self.model = model
        self.x = x.detach()
        with torch.no_grad():
            self.u = model.inject(self.x)
            self.z = model.trajectory(self.x).states[-1]
        B, dtype, dev = x.shape[0], x.dtype, x.device
        self.one_step = per_sample(1, B, torch.long, dev, "R")
        self.beta = per_sample(DEFAULT_BETA, B, dtype, dev, "beta")
        self.eps = per_sample(DEFAULT_EPS, B, dtype, dev, "eps")
        self.t_f: List[float] = []
        self.t_step: List[float] = []

    def cell_forward(self) -> None:
        with torch.no_grad():
            self.model.cell(self.z, self.u)

    def entropy_step(self) -> None:
        """One step of Eq. 8 through the library (``entropy_descent`` with R = 1)."""
        entropy_descent(self.model, self.z, self.x, self.x, self.one_step, self.beta, self.eps)

    def sample(self, repeats: int = 3) -> None:
        times = interleaved_medians({"f": self.cell_forward, "step": self.entropy_step}, repeats)
        self.t_f.append(times["f"])
        self.t_step.append(times["step"])

    def medians(self, since: int = 0) -> Dict[str, float]:
        """Median t_f and t_step of the samples taken from index ``since`` on."""
        return {"t_f_s": statistics.median(self.t_f[since:]), "t_step_s": statistics.median(self.t_step[since:])}


def stage_breakdown(
    fn: Callable[[], object], repeats: int, sync: Optional[Callable[[], None]] = None
) -> Dict[str, float]:
    """Median seconds per stage of ``fn`` (``robustdeq.stages``: stem, solve, defense, head),
    of the whole call (``total``) and of what lies outside the marked stages (``other``)."""
    fn()  # warm-up
    rows = []
    for _ in range(max(1, repeats)):
        with timing_stages(sync) as timer:
            t0 = time.perf_counter()
            fn()
            total = time.perf_counter() - t0
        row = {name: timer.seconds.get(name, 0.0) for name in STAGES}
        row.update(other=total - timer.total(), total=total)
        rows.append(row)
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}
