"""The in-process reference that a served lane's throughput is held to (``robustdeq loadtest``):
the archive's own handler in this process, on full batches, without TorchServe's frontend,
the socket hop and HTTP (``InProcessWorker``)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .traffic import PayloadSet

__all__ = ["in_process_throughput", "in_process_reference"]


def in_process_throughput(
    archive: Path, payloads: PayloadSet, repeats: int = 30, threads: Optional[int] = None
) -> Dict[str, float]:
    """Samples/s of the archive's handler on full batches, in this process (median of ``repeats``),
    with the archive's ``torch_threads`` or ``threads``."""
    return _time_full_batches(_in_process_worker(archive, threads), payloads, repeats)


def _in_process_worker(archive: Path, threads: Optional[int] = None):
    from ..serving.inprocess import InProcessWorker

    return InProcessWorker(archive, handler_overrides={"torch_threads": threads} if threads else None)


def _time_full_batches(worker, payloads: PayloadSet, repeats: int) -> Dict[str, float]:
    import torch

    from ..serving.inprocess import make_request

    threads = worker.engine.limits.torch_threads
    if threads > 0:  # the engine set it when it loaded; a worker built or timed since may have changed it
        torch.set_num_threads(threads)
    b = worker.batch_size
    batch = [make_request(str(i), payloads.pngs[i % len(payloads)], "image/png") for i in range(b)]
    worker.handle(batch)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        answers = worker.handle(batch)
        times.append(time.perf_counter() - t0)
    if any(status != 200 for status, _ in answers):
        raise RuntimeError(f"the in-process handler refused a payload: {answers}")
    seconds = statistics.median(times)
    return {"batch_size": b, "batch_ms": seconds * 1e3, "samples_per_s": b / seconds, "repeats": repeats,
            "threads": threads}  # fmt: skip


def in_process_reference(archive: Path, payloads: PayloadSet, rounds: int = 3) -> Dict[str, Any]:
    """What a served lane is held to: the archive's handler in this process, with the archive's
    ``torch_threads`` (one worker's share) and with every core, in interleaved rounds (medians).
    ``samples_per_s`` is the faster of the two, ``batch_ms`` the full-batch time at the
    archive's own thread count (what one served worker's handler is compared with). Each
    setting's worker is built once; each round times them in turn."""
    cores = os.cpu_count() or 1
    own = _in_process_worker(archive)
    workers = {int(own.engine.limits.torch_threads): own}
    if cores not in workers:
        workers[cores] = _in_process_worker(archive, cores)
    runs: Dict[int, List[Dict[str, float]]] = {t: [] for t in workers}
    for _ in range(rounds):
        for t, worker in workers.items():
            runs[t].append(_time_full_batches(worker, payloads, repeats=30))
    by_threads = {
        t: {k: statistics.median(r[k] for r in rs) for k in ("samples_per_s", "batch_ms")} for t, rs in runs.items()
    }
    worker_threads = next(iter(runs))
    best = max(by_threads, key=lambda t: by_threads[t]["samples_per_s"])
    first = runs[worker_threads][0]
    return {
        "batch_size": first["batch_size"],
        "repeats": first["repeats"],
        "rounds": rounds,
        "by_threads": by_threads,
        "worker_threads": worker_threads,
        "batch_ms": by_threads[worker_threads]["batch_ms"],
        "threads": best,
        "samples_per_s": by_threads[best]["samples_per_s"],
    }
