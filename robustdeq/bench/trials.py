"""Trials of faster PyTorch paths for plain inference, each timed against eager in the same
run: channels-last memory format and ``torch.compile`` (inductor) of the whole plain forward
or of the model's parts (inject, cell, head). The library adopts only what measures faster;
nothing here changes the model the rest of the benchmark uses (each trial works on a copy).
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from contextlib import contextmanager
from functools import partial
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor

from .inference import plain_forward
from .timing import interleaved_medians

Forward = Callable[[Tensor], Tensor]

__all__ = ["TRIALS", "run_trials"]


def channels_last(model) -> Forward:
    """Weights and input in channels-last (NHWC) memory format."""
    m = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return lambda x: plain_forward(m, x.contiguous(memory_format=torch.channels_last))


def compile_forward(model) -> Forward:
    """``torch.compile`` (inductor) of the whole plain forward, solver loop included."""
    return torch.compile(partial(plain_forward, copy.deepcopy(model)))


def compile_parts(model) -> Forward:
    """``torch.compile`` (inductor) of inject, cell and head; the solver stays eager."""
    m = copy.deepcopy(model)
    m.inject, m.cell, m.head = torch.compile(m.inject), torch.compile(m.cell), torch.compile(m.head)
    return partial(plain_forward, m)


#: name -> builder of a plain forward
TRIALS: Dict[str, Callable[[object], Forward]] = {
    "channels-last": channels_last,
    "torch.compile forward": compile_forward,
    "torch.compile parts": compile_parts,
}


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the block after ``seconds`` (main thread on POSIX; else no limit)."""
    usable = seconds > 0 and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _expired(signum, frame):
        raise TimeoutError(f"gave up after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _first_calls(forward: Forward, x: Tensor, timeout_s: float) -> Tuple[float, Tensor]:
    """Seconds of the first call (compilation for compiled paths) and the output of a later one."""
    with _time_limit(timeout_s):
        t0 = time.perf_counter()
        forward(x)
        first = time.perf_counter() - t0
        out = forward(x)  # a second call may recompile (guards on the new shapes)
    return first, out


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _dynamo_counts() -> Dict[str, int]:
    """Graphs compiled, graph breaks and inductor cache hits so far in this trial (0 for eager
    trials); cache hits make the first call shorter than a cold compilation."""
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "inductor_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
    }


def _one_trial(forward: Forward, model, x: Tensor, repeats: int, timeout_s: float) -> Dict:
    """First-call seconds, then the trial against eager plain inference, interleaved."""
    B = x.shape[0]
    row: Dict = {"batch_size": B}
    try:
        row["first_call_s"], out = _first_calls(forward, x, timeout_s)
    except Exception as exc:  # a failing trial is a result, not a crash
        return {**row, "error": _error(exc)}
    row.update(_dynamo_counts())
    times = interleaved_medians({"eager": lambda: plain_forward(model, x), "trial": lambda: forward(x)}, repeats)
    row.update(eager_s=times["eager"], seconds=times["trial"], samples_per_s=B / times["trial"],
               speedup_vs_eager=times["eager"] / times["trial"],
               max_abs_logit_diff=float((out - plain_forward(model, x)).abs().max()))  # fmt: skip
    return row


def run_trials(model, batches: List[Tensor], repeats: int, timeout_s: float, tick: Callable[[], None]) -> List[Dict]:
    """Every trial at every batch size (one build per trial; a compiled path compiles again
    for a new batch shape, which ``first_call_s`` shows), against eager measured beside it."""
    rows = []
    from torch._dynamo.utils import counters

    for name, build in TRIALS.items():
        counters.clear()
        try:
            forward = build(model)
        except Exception as exc:
            forward, error = None, _error(exc)
        for x in batches:
            if forward is None:
                rows.append({"batch_size": x.shape[0], "trial": name, "error": error})
            else:
                rows.append({"trial": name, **_one_trial(forward, model, x, repeats, timeout_s)})
            tick()
        torch._dynamo.reset()  # drop compiled graphs before the next trial
    return rows
