"""The job store of one evaluation folder (docs/design.md §6): every finished job, by name, in
``state.json`` and the per-sample best inputs in ``state.pt``, saved after each job so that an
interrupted run continues where it stopped. A folder is resumed only by the same checkpoint,
subset and settings; the attack families and the transfer sources may differ (each job is named
and seeded on its own, so adding a family to a finished evaluation runs just its jobs).

Jobs of hours (the reference AutoAttack, Square, APGD) also keep their finished batches in
``partial.pt`` while they run (:meth:`JobStore.save_batch`), so that an interrupted one resumes at
its next batch; the file goes when the job finishes."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from .best_input import BestInput
from .job_ids import utc_now

STATE_FORMAT = 2  # 2: surrogate chosen on validation, block-aligned batches, shards
#: the finished batches of the job that is running (:meth:`JobStore.save_batch`)
PARTIAL_FILE = "partial.pt"

__all__ = ["JobStore", "STATE_FORMAT"]


class JobStore:
    """The saved jobs and per-sample best inputs (one :class:`BestInput` per setting) of the
    evaluation ``identity`` in ``out``; :meth:`open` resumes what the folder holds."""

    def __init__(self, out: Path, identity: dict, checkpoint: str, data: Optional[str]):
        self.out, self.identity = out, identity
        self.checkpoint, self.data = checkpoint, data
        self.jobs: Dict[str, dict] = {}
        self.best: Dict[str, BestInput] = {}
        self._batches: Optional[Dict[str, Dict[str, list]]] = None  # the running job's, by map

    @classmethod
    def open(cls, out: Path, identity: dict, checkpoint: str, data: Optional[str], restart: bool) -> "JobStore":
        """The store of ``out``, with the jobs it already holds unless ``restart``; refuses a folder
        written by another evaluation or an older state format."""
        store = cls(out, identity, checkpoint, data)
        path = out / "state.json"
        if restart:
            (out / PARTIAL_FILE).unlink(missing_ok=True)
        if restart or not path.exists():
            return store
        saved = json.loads(path.read_text())
        if (saved.get("identity") or {}).get("format") != STATE_FORMAT:
            raise ValueError(
                f"{out} holds an evaluation written by an older version of the evaluator "
                f"(state format {(saved.get('identity') or {}).get('format')}, now {STATE_FORMAT}); "
                "use another --out, or --restart to discard it"
            )
        if _without_families(saved.get("identity")) != _without_families(identity):
            raise ValueError(
                f"{out} holds an evaluation of another checkpoint or with other settings; "
                "use another --out, or --restart to discard it"
            )
        store.jobs = saved["jobs"]
        store._date_undated_jobs()
        tensors = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
        store.best = {k: BestInput(tensors[f"{k}/x"], tensors[f"{k}/margin"]) for k in saved["best"]}
        return store

    def _date_undated_jobs(self) -> None:
        """Jobs saved before jobs were dated get the date of the outputs they made, so that
        resuming such an evaluation keeps its date (the outputs are dated by the last job)."""
        undated = [job for job in self.jobs.values() if isinstance(job, dict) and "finished" not in job]
        results = self.out / "results.json"
        written = json.loads(results.read_text()).get("date") if undated and results.exists() else None
        for job in undated if written else []:
            job["finished"] = written

    def save(self) -> None:
        tensors = {}
        for k, b in self.best.items():
            tensors[f"{k}/x"], tensors[f"{k}/margin"] = b.x, b.margin
        tmp = self.out / "state.pt.tmp"
        torch.save(tensors, tmp)
        os.replace(tmp, self.out / "state.pt")
        state = {
            "identity": self.identity,
            "checkpoint": self.checkpoint,
            "data": self.data,
            "jobs": self.jobs,
            "best": sorted(self.best),
        }
        tmp = self.out / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.out / "state.json")

    def job(self, name: str, fn: Callable[[], dict]) -> dict:
        """The record of job ``name``: saved, or made by ``fn()`` now, timed, dated, saved and logged."""
        if name not in self.jobs:
            t0 = time.perf_counter()
            result = fn()
            result["seconds"] = round(time.perf_counter() - t0, 2)
            result["finished"] = utc_now()
            self.jobs[name] = result
            self.save()
            self._batches = {}
            (self.out / PARTIAL_FILE).unlink(missing_ok=True)
            print(_job_line(name, result), file=sys.stderr, flush=True)
        return self.jobs[name]

    # ---- the finished batches of a running job -----------------------------------------
    def _identity_key(self) -> str:
        return json.dumps(_without_families(self.identity), sort_keys=True)

    def _running_batches(self) -> Dict[str, Dict[str, list]]:
        """The running job's finished batches, by map: loaded once from what an interrupted process
        left, and only if it was this evaluation's."""
        if self._batches is None:
            self._batches = {}
            path = self.out / PARTIAL_FILE
            if path.exists():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("identity") == self._identity_key():
                    self._batches = saved["maps"]
        return self._batches

    def saved_batches(self, name: str) -> Dict[int, tuple]:
        """The batches of map ``name`` that the running job finished before it was interrupted:
        first index -> (the batch's indices, its output)."""
        done = self._running_batches().get(name, {"indices": [], "outputs": []})
        return {int(i[0]): (i, o) for i, o in zip(done["indices"], done["outputs"])}

    def save_batch(self, name: str, indices: torch.Tensor, output: torch.Tensor) -> None:
        """Keep one finished batch of map ``name``. The per-sample best inputs stay as they were
        when the job began, so that a resumed job starts from the same state."""
        done = self._running_batches().setdefault(name, {"indices": [], "outputs": []})
        done["indices"].append(indices.clone())
        done["outputs"].append(output.clone())
        tmp = self.out / (PARTIAL_FILE + ".tmp")
        torch.save({"identity": self._identity_key(), "maps": self._batches}, tmp)
        os.replace(tmp, self.out / PARTIAL_FILE)


def _job_line(name: str, result: dict) -> str:
    """One log line per finished job (stderr), so that a run without progress bars still says
    where it is: the job, its accuracy and the worst case so far where it has them, its time."""
    parts = [f"{time.strftime('%H:%M:%S')} {name}"]
    acc = result.get("acc")
    acc = acc.get("acc") if isinstance(acc, dict) else acc
    if isinstance(acc, (int, float)):
        parts.append(f"accuracy {100 * acc:.1f}%")
    if "attacked" in result:
        parts.append(f"attacked {result['attacked']}, flipped {result.get('flipped', 0)}")
    worst = result.get("worst_case_so_far") or result.get("after")
    if isinstance(worst, dict) and isinstance(worst.get("acc"), (int, float)):
        parts.append(f"worst case so far {100 * worst['acc']:.1f}%")
    return "evaluate: " + ", ".join(parts) + f" ({result['seconds']:.0f} s)"


def _without_families(identity: Optional[dict]) -> Optional[dict]:
    """Resume compatibility ignores the attack families and the transfer sources: adding one
    to a finished evaluation runs just the new jobs (each job is named and seeded on its own)."""
    if not identity:
        return identity
    return {
        **identity,
        "config": {k: v for k, v in identity["config"].items() if k not in ("families", "transfer_from")},
    }
