"""Optional wall-clock timing of the stages of inference (the cost model of docs/design.md §3).

The library marks its stages with ``with stage("solve"): ...``. With no timer active (the
normal case) a marker costs one context-variable lookup. ``robustdeq bench`` activates a
:class:`StageTimer` around a real library call and reads where the time went:

* ``stem``: ``model.inject`` of the input (once per input, before the solve);
* ``solve``: the N solver steps, with the evaluation of f at z[0];
* ``defense``: Algorithm 1's entropy-descent steps (paper 1, Eq. 8), the re-injection of the
  moved input and the redo of the intervened solver step (Algorithm 1, line 13);
* ``head``: ``model.head`` at a state that is read out.

Stages do not nest: time inside a marker that sits inside an active stage counts for the
outer stage (so the injections inside the defense count as defense, not stem).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Dict, Iterator, Optional

STAGES = ("stem", "solve", "defense", "head")

__all__ = ["STAGES", "StageTimer", "stage", "timing_stages"]


class StageTimer:
    """Accumulates seconds per stage name; ``sync`` (e.g. ``torch.cuda.synchronize``) runs at
    every stage boundary so that asynchronous devices are timed correctly."""

    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self._sync = sync
        self._depth = 0
        self._t0 = 0.0

    def enter(self) -> None:
        self._depth += 1
        if self._depth == 1:
            if self._sync is not None:
                self._sync()
            self._t0 = time.perf_counter()

    def exit(self, name: str) -> None:
        if self._depth == 1:
            if self._sync is not None:
                self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._t0
            self.calls[name] = self.calls.get(name, 0) + 1
        self._depth -= 1

    def total(self) -> float:
        return sum(self.seconds.values())


_active: ContextVar[Optional[StageTimer]] = ContextVar("robustdeq_stage_timer", default=None)


class stage:
    """Context manager marking a stage of inference; a no-op unless a timer is active."""

    __slots__ = ("_name", "_timer")

    def __init__(self, name: str):
        self._name = name
        self._timer = _active.get()

    def __enter__(self) -> None:
        if self._timer is not None:
            self._timer.enter()

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.exit(self._name)


@contextmanager
def timing_stages(sync: Optional[Callable[[], None]] = None) -> Iterator[StageTimer]:
    """Activate a fresh :class:`StageTimer` for the library calls inside the block."""
    timer = StageTimer(sync)
    token = _active.set(timer)
    try:
        yield timer
    finally:
        _active.reset(token)
