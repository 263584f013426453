"""The folder a training run writes, and what a resumed run reads back from it.

A run folder holds:

* ``config.yaml``: the resolved recipe;
* ``log.jsonl``: one record per log interval (``type: step``), per epoch (``type: epoch``)
  and per call that stops before the end of the schedule (``type: chunk``);
* ``epochs.csv``: the epoch records as a table;
* ``curves.png``: loss and clean / PGD-10 validation accuracy (paper 1 Fig. 4);
* ``last.pt``: the resume checkpoint (weights + optimizer + position), rewritten every
  ``run.checkpoint_every`` steps and at every epoch end;
* ``best.pt``: the weights of the epoch with the best validation PGD accuracy;
* ``model.pt``: the final checkpoint, written when the schedule completes, with the
  early state chosen by ready-made PGD-10 on the validation split (paper 1 Sec. 4);
* ``summary.json``: the finished run in a few numbers.

Only the main process writes (:attr:`RunFolder.writes`); every process reads.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig, config_diff

__all__ = ["RunFolder", "RunClock", "RESUMABLE_CHANGES"]

#: config sections that may change when a run is resumed (they do not alter the steps already taken)
RESUMABLE_CHANGES = (
    "optim.epochs", "run.", "validation.", "data.source", "data.workers", "data.in_memory_mb", "description", "name",
)  # fmt: skip

#: what ``--restart`` removes
RUN_FILES = ("last.pt", "model.pt", "log.jsonl", "epochs.csv", "curves.png", "summary.json")


class RunClock:
    """Training wall-clock and CPU seconds (user + system, every thread), summed over the
    calls that trained the run: earlier chunks plus the current call so far. CPU time does
    not grow when another job shares the cores: it is the CPU-hours axis."""

    def __init__(self, wall_s: float = 0.0, cpu_s: float = 0.0):
        self.wall_s, self.cpu_s = wall_s, cpu_s
        self._wall_started: Optional[float] = None
        self._cpu_started: Optional[float] = None

    def start(self) -> float:
        """Start counting this call; returns its monotonic start time."""
        self._wall_started = time.monotonic()
        self._cpu_started = time.process_time()
        return self._wall_started

    def wall(self) -> float:
        started = self._wall_started
        return self.wall_s + (time.monotonic() - started if started is not None else 0.0)

    def cpu(self) -> float:
        started = self._cpu_started
        return self.cpu_s + (time.process_time() - started if started is not None else 0.0)


class RunFolder:
    """``path``, written by the main process only (``writes``); see the module doc for the files."""

    def __init__(self, path: Path, title: str, writes: bool):
        self.path = Path(path)
        self.title = title  # of the curves
        self.writes = writes
        self.records: List[dict] = []  # log.jsonl as read back and appended to
        self.clock = RunClock()  # stamps every record

    def clear(self) -> None:
        """Forget a previous run (``--restart``)."""
        if self.writes and self.path.exists():
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)

    def write_config(self, cfg: TrainConfig) -> None:
        if self.writes:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, name: str, checkpoint: Checkpoint) -> None:
        if self.writes:
            save_checkpoint(checkpoint, self.path / name)

    def load(self, name: str, map_location="cpu") -> Checkpoint:
        return load_checkpoint(self.path / name, map_location=map_location)

    def finished(self) -> bool:
        return (self.path / "model.pt").is_file()

    def resume_checkpoint(self, cfg: TrainConfig, device, train_fingerprint: str) -> Optional[Checkpoint]:
        """``last.pt`` when there is one, checked to continue this recipe on this data; else None."""
        path = self.path / "last.pt"
        if not path.is_file():
            return None
        ckpt = load_checkpoint(path, map_location=device, expect_model=cfg.model.name)
        if ckpt.training_state is None:
            raise CheckpointError(f"{path} holds no training state; remove it or pass --restart")
        try:  # fill in fields added to the config since the checkpoint was written
            saved = TrainConfig.from_dict(ckpt.recipe).to_dict()
        except ValueError as exc:
            raise CheckpointError(f"{path} records a recipe this version cannot read: {exc}") from None
        diff = [
            k
            for k in config_diff(saved, cfg.to_dict())
            if not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)
        ]
        if diff:
            raise ValueError(
                f"{self.path} holds a run with a different recipe (differs in: {', '.join(diff)}); "
                "pass --restart to start over there, or choose another --out"
            )
        ckpt.check_dataset(train_fingerprint)
        return ckpt

    # ---- logs ----------------------------------------------------------------------------
    def read_log(self, up_to_step: int) -> None:
        """Read back ``log.jsonl``, dropping the records past the checkpoint a resumed run starts from."""
        log = self.path / "log.jsonl"
        if log.is_file():
            kept = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            self.records = [r for r in kept if r.get("step", 0) <= up_to_step]
            if self.writes and len(self.records) != len(kept):  # drop records past the checkpoint
                log.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        """Append one record, stamped with the run's clock; an epoch record also rewrites
        ``epochs.csv`` and ``curves.png``."""
        record["wall_s"] = round(self.clock.wall(), 2)
        record["cpu_s"] = round(self.clock.cpu(), 2)
        self.records.append(record)
        if not self.writes:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if record["type"] == "epoch":
            self._write_csv()
            from .monitor import plot_training_curves

            plot_training_curves(self.records, self.path / "curves.png", title=self.title)

    def _write_csv(self) -> None:
        rows = [r for r in self.records if r["type"] == "epoch"]
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys and k != "type" and not isinstance(r[k], list)]
        with open(self.path / "epochs.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    @staticmethod
    def interval_record(stats: List[dict], step: int, epoch: int, lr: float, batch_size: int, elapsed: float) -> dict:
        """The ``step`` record of a log interval: the mean of each number over its steps, the depths
        drawn, the phase of its last step and the global samples per second."""
        rec: Dict[str, Any] = {"type": "step", "step": step, "epoch": epoch + 1, "lr": lr}
        keys = {k for s in stats for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k in sorted(keys):
            vals = [s[k] for s in stats if k in s]
            rec[k] = sum(vals) / len(vals)
        rec["depths"] = [s["depth"] for s in stats]
        rec["phase"] = stats[-1]["phase"]
        rec["samples_per_s"] = len(stats) * batch_size / max(elapsed, 1e-9)
        return rec

    def median_train_samples_per_s(self) -> Optional[float]:
        """The median training rate over the logged intervals (pretraining left out)."""
        return _median([r["samples_per_s"] for r in self.records if r["type"] == "step" and r.get("phase") == "train"])

    def write_summary(self, summary: Dict[str, Any]) -> None:
        if self.writes:
            (self.path / "summary.json").write_text(json.dumps(summary, indent=2))


def _median(values: List[float]) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])
