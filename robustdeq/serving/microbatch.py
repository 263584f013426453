"""Dynamic batching for a server that has none (KServe's Python ``ModelServer``).

TorchServe batches requests in its frontend: a worker gets up to ``batchSize`` requests, or
fewer when ``maxBatchDelay`` ms have passed since the first. :class:`MicroBatcher` does the same
inside one asyncio server process, so that the KServe runtime answers concurrent requests with
one solve per batch (one ``InferenceEngine.predict`` call), with each archive's own
``batchSize`` / ``maxBatchDelay`` (docs/serving.md, "The KServe runtime").

A request may carry several rows (an OIP tensor of N images): a batch holds whole requests, at
most ``max_rows`` rows unless one request alone has more. Up to ``workers`` batches run at once
(the archive's ``minWorkers``, which TorchServe runs as that many worker processes), each in a
worker thread, so the event loop keeps answering probes and the other lanes meanwhile; a batch
is formed when a worker is free, as TorchServe hands a worker its batch. When the batch function
raises, every request of that batch gets the exception (as a failed TorchServe batch).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, List, Optional, Sequence

__all__ = ["MicroBatcher"]


@dataclass
class _Entry:
    rows: int
    item: Any
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collect requests for up to ``max_delay_s`` after the first, or until ``max_rows`` rows,
    and answer them with one call of ``run(items) -> results`` (one result per item, in order)."""

    def __init__(self, run: Callable[[Sequence[Any]], List[Any]], max_rows: int, max_delay_s: float, workers: int = 1):
        if max_rows < 1 or max_delay_s < 0 or workers < 1:
            raise ValueError(
                f"max_rows and workers must be >= 1 and max_delay_s >= 0, got {max_rows}, {workers}, {max_delay_s}"
            )
        self._run, self.max_rows, self.max_delay_s = run, int(max_rows), float(max_delay_s)
        self.workers = int(workers)
        self._free: Optional[asyncio.Semaphore] = None
        self._in_flight: set = set()
        self._pending: Deque[_Entry] = deque()
        self._wake: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None
        self.batches = 0  # how many calls of ``run`` so far (tests, logs)

    async def submit(self, item: Any, rows: int = 1) -> Any:
        """Queue one request of ``rows`` rows and wait for its result."""
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake, self._free = asyncio.Event(), asyncio.Semaphore(self.workers)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._loop())
        entry = _Entry(max(1, int(rows)), item, loop.create_future())
        self._pending.append(entry)
        self._wake.set()
        return await entry.future

    def _queued_rows(self) -> int:
        return sum(e.rows for e in self._pending)

    async def _wait(self, timeout: Optional[float]) -> bool:
        """Wait for the next submission (or ``timeout`` seconds); False on timeout."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)  # cancelling an Event wait loses nothing
        except asyncio.TimeoutError:
            return False
        return True

    def _take(self) -> List[_Entry]:
        batch, rows = [self._pending.popleft()], 0
        rows = batch[0].rows
        while self._pending and rows + self._pending[0].rows <= self.max_rows:
            entry = self._pending.popleft()
            batch.append(entry)
            rows += entry.rows
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                await self._wait(None)
            await self._free.acquire()  # a worker is free: form its batch
            deadline = loop.time() + self.max_delay_s
            while self._queued_rows() < self.max_rows:
                left = deadline - loop.time()
                if left <= 0 or not await self._wait(left):
                    break
            task = loop.create_task(self._answer(self._take()))
            self._in_flight.add(task)  # a reference until done (the loop keeps only weak ones)
            task.add_done_callback(self._in_flight.discard)

    async def _answer(self, batch: List[_Entry]) -> None:
        try:
            results = await asyncio.to_thread(self._run, [e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function gave {len(results)} results for {len(batch)} requests")
        except Exception as exc:  # handed to every request of the batch
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
        else:
            for entry, result in zip(batch, results):
                if not entry.future.done():
                    entry.future.set_result(result)
        finally:
            self.batches += 1
            self._free.release()
