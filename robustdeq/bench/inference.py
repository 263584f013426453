"""Inference measurements: plain (eager PyTorch and ONNX Runtime), the defense over the
T_f x R grid of paper 1 Table 10 with its operation-count floor, and per-stage times.

Everything runs the library's own code path: ``model.trajectory`` for plain inference,
``DefenseSetting.run`` (``entropy_reduction`` / ``gated_entropy_reduction``, paper 1
Algorithm 1) for the defense, both read out by ``Trajectory.logits`` at the early state.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..defense import DefenseSetting
from .timing import TimedCall, UnitCosts, median_time, operation_floor, stage_breakdown

#: seconds to let ONNX Runtime's spinning threads go idle before the next measurement
ONNX_SETTLE_S = 0.5

__all__ = [
    "plain_forward",
    "defended_forward",
    "warm_up",
    "OnnxPlain",
    "measure_plain",
    "measure_grid",
    "measure_stages",
]


def plain_forward(model, x: Tensor) -> Tensor:
    """Plain inference: the N-step dynamics and the head at the readout state (paper 1, Sec. 4)."""
    with torch.no_grad():
        return model.trajectory(x).logits(model.readout_state)


def defended_forward(model, x: Tensor, setting: DefenseSetting) -> Tensor:
    """Algorithm 1 (or its gated variant) through the library, read out like plain inference."""
    with torch.no_grad():
        return setting.run(model, x).trajectory.logits(model.readout_state)


def warm_up(model, x: Tensor, calls: int = 5) -> None:
    """Grow the process's heap to the working set of the largest batch before timing anything:
    the first calls at a new size pay page faults on first touch (``runtime.tune_cpu_allocator``
    keeps that memory afterwards), which would make the first measurement look slower."""
    for _ in range(calls):
        plain_forward(model, x)
    defended_forward(model, x, DefenseSetting(T_f=1, R=1))


class OnnxPlain:
    """The ONNX Runtime fast path of plain inference (``robustdeq.export``), or why there is none."""

    def __init__(self, model, threads: int):
        self.session = None
        self.skipped: Optional[str] = None
        self._tmp = None
        if model.onnx_export_blocker:
            self.skipped = f"{model.name} cannot be exported to ONNX: {model.onnx_export_blocker}"
            return
        from ..export import OnnxPlainSession, export_onnx

        self._tmp = tempfile.TemporaryDirectory(prefix="robustdeq-bench-")
        path = export_onnx(model, Path(self._tmp.name) / "model.onnx")
        self.session = OnnxPlainSession(path, threads=threads)

    def forward(self, x: Tensor) -> Tensor:
        return self.session.run(x)[0]

    def close(self) -> None:
        """Drop the session (and its thread pool) and the exported file."""
        self.session = None
        if self._tmp is not None:
            self._tmp.cleanup()


def measure_plain(model, x: Tensor, onnx: OnnxPlain, repeats: int) -> Tuple[Dict, Dict]:
    """Plain inference in eager PyTorch, then through ONNX Runtime, each in its own block.

    Not interleaved: ONNX Runtime's intra-op threads spin-wait after every run (its default)
    and, on 2 cores, slow a PyTorch call right after it down by up to 2x; the benchmark lets
    them settle before the next measurement. Returns (plain row, ONNX row); the ONNX row
    carries ``skipped`` instead of times when the model cannot be exported."""
    B = x.shape[0]
    eager = median_time(lambda: plain_forward(model, x), repeats)
    plain = {"batch_size": B, "seconds": eager, "samples_per_s": B / eager}
    if onnx.session is None:
        return plain, {"batch_size": B, "skipped": onnx.skipped}
    t = median_time(lambda: onnx.forward(x), repeats)
    time.sleep(ONNX_SETTLE_S)
    return plain, {"batch_size": B, "eager_s": eager, "seconds": t, "samples_per_s": B / t,
                   "speedup_vs_eager": eager / t}  # fmt: skip


def measure_grid(
    model, x: Tensor, grid: Sequence[Tuple[int, int]], repeats: int, plain_s: float, tick: Callable[[], None]
) -> Tuple[List[Dict], Dict]:
    """The defense over ``grid`` = [(T_f, R)] (paper 1 Table 10) on one batch, with the
    operation-count floor from unit costs sampled next to every repetition.

    Returns (rows, unit-cost medians of the batch); ``tick`` advances a progress bar."""
    B, N = x.shape[0], model.n_steps
    units = UnitCosts(model, x)
    rows = []
    for T_f, R in grid:
        setting = DefenseSetting(T_f=T_f, R=R)
        first = len(units.t_f)
        timed = TimedCall(lambda s=setting: defended_forward(model, x, s))
        seconds = []
        for _ in range(max(1, repeats)):
            units.sample()
            seconds.append(timed.sample())
        t = statistics.median(seconds)
        unit = units.medians(since=first)
        floor = operation_floor(N, T_f, R, unit["t_f_s"], unit["t_step_s"])
        rows.append({"batch_size": B, "T_f": T_f, "R": R, "seconds": t, "samples_per_s": B / t,
                     "slowdown_vs_plain": t / plain_s, "floor_s": floor, "ratio_to_floor": t / floor,
                     **unit})  # fmt: skip
        tick()
    return rows, units.medians()


def measure_stages(model, x: Tensor, settings: Dict[str, Optional[DefenseSetting]], repeats: int) -> List[Dict]:
    """Per-stage seconds (stem, solve, defense, head, other) of plain inference (``None``)
    and of each named defense setting on one batch."""
    rows = []
    for name, setting in settings.items():
        if setting is None:
            fn = lambda: plain_forward(model, x)  # noqa: E731
        else:
            fn = lambda s=setting: defended_forward(model, x, s)  # noqa: E731
        rows.append({"batch_size": x.shape[0], "setting": name, **stage_breakdown(fn, repeats)})
    return rows
