"""Every request of a load test, and exact statistics over them.

Locust's own percentiles come from rounded response-time buckets. Here each request is
recorded (start time, stage, request type, milliseconds, success) and percentiles are
computed from the raw samples by the nearest-rank rule: p99 is a latency that some
request actually had, and at least 99% of requests were at most that slow.
"""

from __future__ import annotations

import csv
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

__all__ = ["SampleRecorder", "Samples", "nearest_rank", "RequestStats"]

FIELDS = ("start_time", "stage", "name", "response_time_ms", "ok", "error")


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 < q <= 100) by the nearest-rank rule; NaN for no values."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    ordered = np.sort(np.asarray(values, dtype=float))
    if ordered.size == 0:
        return math.nan
    return float(ordered[max(int(math.ceil(q / 100 * ordered.size)) - 1, 0)])


class SampleRecorder:
    """Collects Locust request events and stage starts; ``save`` writes CSV + JSON."""

    def __init__(self):
        self.rows: List[tuple] = []
        self.stage_starts: List[float] = []
        self.stage = -1
        self._lock = threading.Lock()

    def start_stage(self, index: int, when: float) -> None:
        with self._lock:
            self.stage = index
            self.stage_starts.append(when)

    def on_request(self, name: str, start_time: float, response_time_ms: float, exception=None, **_) -> None:
        error = "" if exception is None else str(exception).replace("\n", " ")[:300]
        with self._lock:
            self.rows.append((start_time, self.stage, name, response_time_ms, int(exception is None), error))

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(FIELDS)
            writer.writerows(self.rows)
            path.with_suffix(".stages.json").write_text(json.dumps({"stage_starts": self.stage_starts}))
        return path


@dataclass
class RequestStats:
    """Exact figures for one request type over a time window."""

    name: str
    requests: int
    failures: int
    throughput: float  # successful requests per second over the window
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    window_s: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Samples:
    """The recorded requests of one Locust run (``SampleRecorder.save`` output)."""

    def __init__(self, path: Union[str, Path]):
        path = Path(path)
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        self.start = np.array([float(r["start_time"]) for r in rows])
        self.stage = np.array([int(r["stage"]) for r in rows], dtype=int)
        self.name = np.array([r["name"] for r in rows], dtype=object)
        self.ms = np.array([float(r["response_time_ms"]) for r in rows])
        self.ok = np.array([r["ok"] == "1" for r in rows], dtype=bool)
        self.error = [r["error"] for r in rows]
        stages_file = path.with_suffix(".stages.json")
        self.stage_starts = json.loads(stages_file.read_text())["stage_starts"] if stages_file.is_file() else []

    def __len__(self) -> int:
        return len(self.ms)

    @property
    def names(self) -> List[str]:
        return sorted(set(self.name.tolist()))

    def window(self, stage: Optional[int] = None, settle: float = 0.0) -> "tuple[np.ndarray, float]":
        """(mask, seconds): the requests that *started* in a stage after ``settle`` seconds
        (the ramp to its user count), and the length of that window."""
        if stage is None:
            mask = np.ones(len(self), dtype=bool)
            begin = float(self.start.min()) if len(self) else 0.0
            end = float((self.start + self.ms / 1e3).max()) if len(self) else 0.0
            return mask, max(end - begin, 1e-9)
        begin = self.stage_starts[stage] + settle
        end = self.stage_starts[stage + 1] if stage + 1 < len(self.stage_starts) else None
        if end is None:
            in_stage = self.stage == stage
            end = float((self.start[in_stage] + self.ms[in_stage] / 1e3).max()) if in_stage.any() else begin
        mask = (self.start >= begin) & (self.start < end)
        return mask, max(end - begin, 1e-9)

    def stats(self, name: str, stage: Optional[int] = None, settle: float = 0.0) -> RequestStats:
        mask, seconds = self.window(stage, settle)
        mask = mask & (self.name == name)
        good = self.ms[mask & self.ok]
        return RequestStats(
            name=name,
            requests=int(mask.sum()),
            failures=int((mask & ~self.ok).sum()),
            throughput=len(good) / seconds,
            p50_ms=nearest_rank(good, 50),
            p95_ms=nearest_rank(good, 95),
            p99_ms=nearest_rank(good, 99),
            mean_ms=float(good.mean()) if good.size else math.nan,
            max_ms=float(good.max()) if good.size else math.nan,
            window_s=seconds,
        )

    def failure_reasons(self, limit: int = 5) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for ok, err in zip(self.ok, self.error):
            if not ok:
                counts[err] = counts.get(err, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])

    def timeline(self, name: str, bucket: float = 10.0) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
        """(seconds since the start, p99 ms, requests/s) per whole ``bucket``-second slice."""
        if not len(self):
            return np.array([]), np.array([]), np.array([])
        t0 = float(self.start.min())
        mask = (self.name == name) & self.ok
        slot = ((self.start[mask] - t0) // bucket).astype(int)
        ms = self.ms[mask]
        xs, p99, rate = [], [], []
        whole = int((float(self.start.max()) - t0) // bucket)  # a last, partial slice would under-count
        for s in range(min(int(slot.max()) + 1, whole) if slot.size else 0):
            sel = ms[slot == s]
            if sel.size:
                xs.append((s + 0.5) * bucket)
                p99.append(nearest_rank(sel, 99))
                rate.append(sel.size / bucket)
        return np.array(xs), np.array(p99), np.array(rate)
