"""``robustdeq.serving.microbatch.MicroBatcher``: the KServe runtime's dynamic batching."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from robustdeq.serving.microbatch import MicroBatcher


def _recording(calls):
    def run(items):
        calls.append(list(items))
        time.sleep(0.01)
        return [f"answer {item}" for item in items]

    return run


def test_concurrent_requests_share_one_call_and_get_their_own_answers():
    calls = []
    batcher = MicroBatcher(_recording(calls), max_rows=8, max_delay_s=0.2)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(5)))

    assert asyncio.run(main()) == [f"answer {i}" for i in range(5)]
    assert calls == [[0, 1, 2, 3, 4]] and batcher.batches == 1


def test_a_full_batch_goes_without_waiting_for_the_delay_and_rows_are_counted():
    calls = []
    batcher = MicroBatcher(_recording(calls), max_rows=4, max_delay_s=30.0)

    async def main():
        start = time.monotonic()
        answers = await asyncio.gather(batcher.submit("a", rows=3), batcher.submit("b", rows=1))
        return answers, time.monotonic() - start

    answers, seconds = asyncio.run(main())
    assert answers == ["answer a", "answer b"] and calls == [["a", "b"]]
    assert seconds < 5  # the 30 s delay did not hold a full batch


def test_batches_respect_max_rows_and_a_large_request_goes_alone():
    calls = []
    batcher = MicroBatcher(_recording(calls), max_rows=4, max_delay_s=0.05)

    async def main():
        return await asyncio.gather(
            batcher.submit("x", rows=3), batcher.submit("y", rows=3), batcher.submit("big", rows=9)
        )

    assert asyncio.run(main()) == ["answer x", "answer y", "answer big"]
    assert calls == [["x"], ["y"], ["big"]]


def test_a_lone_request_waits_at_most_the_delay():
    calls = []
    batcher = MicroBatcher(_recording(calls), max_rows=16, max_delay_s=0.05)

    async def main():
        start = time.monotonic()
        await batcher.submit("only")
        return time.monotonic() - start

    assert asyncio.run(main()) < 2.0 and calls == [["only"]]


def test_a_failed_batch_fails_each_of_its_requests_and_the_next_batch_runs():
    state = {"fail": True}

    def run(items):
        if state.pop("fail", False):
            raise ValueError("model broke")
        return list(items)

    batcher = MicroBatcher(run, max_rows=8, max_delay_s=0.05)

    async def main():
        first = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        second = await batcher.submit(3)
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(e, ValueError) and "model broke" in str(e) for e in first) and second == 3


def test_the_event_loop_stays_free_while_a_batch_runs():
    release = threading.Event()

    def run(items):
        release.wait(10)
        return list(items)

    batcher = MicroBatcher(run, max_rows=1, max_delay_s=0.0)

    async def main():
        pending = asyncio.ensure_future(batcher.submit("slow"))
        await asyncio.sleep(0.05)
        ticks = 0
        for _ in range(5):  # the loop answers other work (probes) while the batch is in its thread
            await asyncio.sleep(0.01)
            ticks += 1
        release.set()
        return ticks, await pending

    assert asyncio.run(main()) == (5, "slow")


def test_workers_run_that_many_batches_at_once_and_no_more():
    running, peak, lock = [0], [0], threading.Lock()

    def run(items):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.1)
        with lock:
            running[0] -= 1
        return list(items)

    batcher = MicroBatcher(run, max_rows=1, max_delay_s=0.0, workers=2)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(6)))

    assert asyncio.run(main()) == list(range(6)) and batcher.batches == 6
    assert peak[0] == 2  # two solves overlapped, never three


@pytest.mark.parametrize("rows, delay, workers", [(0, 0.1, 1), (4, -1.0, 1), (4, 0.1, 0)])
def test_bad_settings_are_refused(rows, delay, workers):
    with pytest.raises(ValueError, match="max_rows"):
        MicroBatcher(list, rows, delay, workers)
