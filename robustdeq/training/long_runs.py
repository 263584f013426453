"""The account of the long runs (issue 15): what each chunk of each run reached, at what cost.

A long run trains in chunks (``--time-limit``); the trainer logs a ``chunk`` record to
``log.jsonl`` whenever a call stops before the end of the schedule. This module reads the
run folders and writes, between the markers ``<!-- long-runs:start -->`` and
``<!-- long-runs:end -->`` of ``docs/training-budget.md``, one row per chunk (validation
accuracy at the last epoch it finished, cumulative CPU-hours) and a plot of validation
accuracy against CPU-hours per run:

    python -m robustdeq.training.long_runs --doc docs/training-budget.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import List, Optional, Sequence

from ..data import PROJECT_ROOT
from .budget import plot_curves, update_document

__all__ = ["RUNS", "chunk_rows", "markdown_table", "plot_runs", "add_long_runs_arguments", "run_long_runs", "main"]

START, END = "<!-- long-runs:start -->", "<!-- long-runs:end -->"
#: the runs of the account, in order (folders under training/shipped/)
RUNS = (
    "deq-small-nfgsm-rs",
    "deq-small-nfgsm",
    "lyadeq-small-nfgsm-rs",
    "resnet-peer-nfgsm",
    "deq-small-clean",
    "lyadeq-small-clean",
    "deq-small-nfgsm-rs-long",
    "deq-small-nfgsm-rs-100",
    "resnet-peer-nfgsm-long",
)
#: a run that continues another from its last state: its log starts with the other's history
CONTINUES = {"deq-small-nfgsm-rs-100": "deq-small-nfgsm-rs-long"}


def _records(folder: Path) -> List[dict]:
    path = folder / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def chunk_rows(folder: Path, after_step: int = 0) -> List[dict]:
    """One dict per chunk of the run in ``folder``: where it ended and what validation said then.
    ``after_step``: the run continues another that ended there; only its own chunks count."""
    records = _records(folder)
    if after_step:  # the continued run's history: the continuation's chunks start after its last step
        records = [r for i, r in enumerate(records) if r.get("step", 0) > after_step or r["type"] == "epoch"]
        first = next((i for i, r in enumerate(records) if r.get("step", 0) > after_step), len(records))
        records = records[first:]
    if not records:
        return []
    finished = (folder / "summary.json").is_file() and (folder / "model.pt").is_file()
    ends = [i for i, r in enumerate(records) if r["type"] == "chunk"]
    if finished or records[-1]["type"] != "chunk":
        ends.append(len(records) - 1)
    rows, start = [], 0
    for n, end in enumerate(ends, 1):
        part = records[start : end + 1]
        epochs = [r for r in records[: end + 1] if r["type"] == "epoch"]
        steps = [r for r in part if r["type"] == "step" and r.get("phase") == "train" and r.get("samples_per_s")]
        last = records[end]
        last_chunk = n == len(ends)
        status = (
            "finished"
            if last_chunk and finished
            else ("running" if last_chunk and last["type"] != "chunk" else "stopped")
        )
        rows.append(
            {
                "chunk": n,
                "status": status,
                "epoch": epochs[-1]["epoch"] if epochs else 0,
                "step": last.get("step"),
                "cpu_h": last["cpu_s"] / 3600,
                "wall_h": last["wall_s"] / 3600,
                "samples_per_s": statistics.median(r["samples_per_s"] for r in steps) if steps else None,
                "val_clean": epochs[-1].get("val_clean_acc") if epochs else None,
                "val_pgd": epochs[-1].get("val_pgd_acc") if epochs else None,
            }
        )
        start = end + 1
    return rows


def _last_step(folder: Path) -> int:
    """The last step a (finished) run's log records."""
    return max((r.get("step", 0) for r in _records(folder)), default=0)


def _epochs_planned(folder: Path) -> Optional[int]:
    import yaml

    cfg = folder / "config.yaml"
    return yaml.safe_load(cfg.read_text())["optim"]["epochs"] if cfg.is_file() else None


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown_table(root: Path, runs: Sequence[str] = RUNS) -> str:
    lines = [
        "| run | chunk | status | epochs done | CPU-h so far | wall-h so far | samples/s (wall, median) | val clean | "
        "val PGD-10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        folder = root / run
        continued = CONTINUES.get(run)
        rows = chunk_rows(folder, _last_step(root / continued) if continued else 0)
        if not rows:
            lines.append(f"| `{run}` | – | not started | | | | | | |")
            continue
        planned = _epochs_planned(folder)
        for r in rows:
            sps = "–" if r["samples_per_s"] is None else f"{r['samples_per_s']:.0f}"
            lines.append(
                f"| `{run}` | {r['chunk']} | {r['status']} | {r['epoch']} of {planned or '?'} | {r['cpu_h']:.2f} | "
                f"{r['wall_h']:.2f} | {sps} | {_pct(r['val_clean'])} | {_pct(r['val_pgd'])} |"
            )
    lines += ["", "Validation: clean accuracy on 1,000 and ready-made PGD-10 on 500 images of the run's own "
              "validation split, at the readout state, after the last epoch each chunk finished."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_runs(root: Path, path: Path, runs: Sequence[str] = RUNS) -> Path:
    series = []
    for run in runs:
        epochs = [r for r in _records(root / run) if r["type"] == "epoch" and r.get("val_pgd_acc") is not None]
        series.append((run, [(r["cpu_s"] / 3600, r["val_clean_acc"], r["val_pgd_acc"]) for r in epochs], None))
    return plot_curves(series, path, "long runs: validation accuracy per CPU-hour")


def add_long_runs_arguments(ap: argparse.ArgumentParser) -> None:
    """``robustdeq long-runs`` (also ``python -m robustdeq.training.long_runs``)."""
    ap.description = "Chunk-by-chunk account of the long runs in training/shipped/: table and plot."
    ap.add_argument("--root", type=Path, default=PROJECT_ROOT / "training" / "shipped")
    ap.add_argument("--doc", type=Path, default=None, help="Markdown document whose long-runs markers to refresh")
    ap.add_argument("--plot", type=Path, default=PROJECT_ROOT / "docs" / "img" / "long-runs.png")


def run_long_runs(args: argparse.Namespace) -> int:
    table = markdown_table(args.root)
    print(table)
    print(f"wrote {plot_runs(args.root, args.plot)}")
    if args.doc is not None:
        update_document(args.doc, table, START, END)
        print(f"updated {args.doc}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m robustdeq.training.long_runs")
    add_long_runs_arguments(ap)
    return run_long_runs(ap.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
