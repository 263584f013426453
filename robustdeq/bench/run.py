"""``robustdeq bench``: the whole in-process speed benchmark, from measurements to files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..defense import DefenseSetting
from .gated import card_gate, measure_gated
from .inference import OnnxPlain, measure_grid, measure_plain, measure_stages, warm_up
from .report import render_markdown
from .subject import Subject, load_subject
from .targets import check_targets, target_lines

DEFAULT_BATCH_SIZES = (1, 8, 64)
#: plain-inference timings are cheap: at least this many repeats
PLAIN_REPEATS_MIN = 5

__all__ = ["run_bench", "DEFAULT_BATCH_SIZES"]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", leave=False)


def _metadata(subject: Subject, args: argparse.Namespace, sizes: Sequence[int]) -> Dict[str, Any]:
    model = subject.model
    return {
        "model": subject.name,
        "origin": subject.origin,
        "checkpoint": str(subject.checkpoint) if subject.checkpoint else None,
        "card": subject.card_note,
        "parameters": model.num_parameters(),
        "N": model.n_steps,
        "readout_state": model.readout_index(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "repeats": args.repeats,
        "data": subject.data_note,
        "batch_sizes": list(sizes),
        "grid": {"T_f": list(args.T_f), "R": list(args.R)},
        "cpu_count": os.cpu_count(),
        "load_average_start": _load_average(),
    }


def _load_average() -> Optional[float]:
    """The 1-minute load average (other processes competing for the CPU make timings slower)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _plain_and_onnx(model, batches: List[Tensor], repeats: int) -> Tuple[List[Dict], List[Dict]]:
    onnx = OnnxPlain(model, threads=torch.get_num_threads())
    plain, onnx_rows = [], []
    try:
        for x in batches:
            p, o = measure_plain(model, x, onnx, max(repeats, PLAIN_REPEATS_MIN))
            plain.append(p)
            onnx_rows.append(o)
    finally:
        onnx.close()
    return plain, onnx_rows


def _grid(model, batches: List[Tensor], grid: List[Tuple[int, int]], repeats: int, plain: List[Dict]):
    bar = _progress(len(batches) * len(grid), "defense grid (T_f x R x batch)")
    defense, units = [], []
    for x, p in zip(batches, plain):
        rows, unit = measure_grid(model, x, grid, repeats, p["seconds"], bar.update)
        defense += rows
        units.append({"batch_size": x.shape[0], **unit})
    bar.close()
    return defense, units


def _stage_settings(specs: Sequence[str], gate: Optional[DefenseSetting]) -> Dict[str, Optional[DefenseSetting]]:
    """Plain inference plus the ``--stages`` settings (a gated one takes the card's gate)."""
    settings: Dict[str, Optional[DefenseSetting]] = {"plain": None}
    for spec in specs:
        s = DefenseSetting.parse(spec)
        if s.gated and gate is None:
            continue  # no card gate to take the threshold from
        if s.gated:
            s = dataclasses.replace(s, threshold=gate.threshold, gate_state=gate.gate_state)
        settings[s.name + (" (clean)" if s.gated else "")] = None if s.is_plain else s
    return settings


def _training(subject: Subject, x: Tensor, repeats: int) -> Dict[str, Any]:
    from ..training.throughput import measure_training_throughput, speedups

    y = torch.randint(0, subject.model.num_classes, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    rows = measure_training_throughput(subject.name, x, y, rounds=max(repeats, PLAIN_REPEATS_MIN))
    return {"training": rows, "training_speedup_sec33": speedups(rows), "training_batch_size": x.shape[0]}


def measure_all(subject: Subject, args: argparse.Namespace, sizes: Sequence[int]) -> Dict[str, Any]:
    """Every measurement of the benchmark, as one JSON-ready dictionary."""
    model, reps = subject.model, args.repeats
    batches = [subject.batch(B) for B in sizes]
    results = _metadata(subject, args, sizes)
    warm_up(model, batches[-1])
    results["plain"], results["onnx"] = _plain_and_onnx(model, batches, reps)
    grid = [(T_f, R) for T_f in args.T_f for R in args.R]
    results["defense"], results["units"] = _grid(model, batches, grid, reps, results["plain"])
    settings = _stage_settings(args.stages, card_gate(subject.card))
    stage_reps = max(reps, PLAIN_REPEATS_MIN)
    results["stages"] = [row for x in batches for row in measure_stages(model, x, settings, stage_reps)]
    pool = subject.batch(max(args.gate_n, sizes[-1]))
    results["gated"] = measure_gated(model, subject.card, pool, sizes[-1], reps)
    if args.trials:
        from .trials import TRIALS, run_trials

        bar = _progress(len(TRIALS) * len(batches), "PyTorch trials (channels-last, torch.compile)")
        results["trials"] = run_trials(model, batches, max(reps, PLAIN_REPEATS_MIN), args.compile_timeout, bar.update)
        bar.close()
    if args.train:
        results.update(_training(subject, batches[-1], reps))
    results["targets"] = check_targets(results)
    results["load_average_end"] = _load_average()
    return results


def _batch_sizes(args: argparse.Namespace) -> List[int]:
    sizes = [args.batch_size] if args.batch_size else list(args.batch_sizes or DEFAULT_BATCH_SIZES)
    if min(sizes) < 1:
        raise ValueError("batch sizes must be >= 1")
    return sorted(set(sizes))


def _write(results: Dict[str, Any], card: Optional[Dict[str, Any]], out: Path) -> str:
    """JSON, Markdown and the PNG plots beside each other; returns the Markdown."""
    from .plots import write_plots

    out.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, card, out)
    results["plots"] = plots
    markdown = render_markdown(results, plots)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown + "\n")
    return markdown


def run_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = _batch_sizes(args)
    if min(args.T_f) < 1 or min(args.R) < 0:
        raise ValueError("need T_f >= 1 and R >= 0")
    subject = load_subject(args.checkpoint, args.model, args.card, max(args.gate_n, sizes[-1]), args.data)
    results = measure_all(subject, args, sizes)
    if args.out:
        out = Path(args.out)
        print(_write(results, subject.card, out))
        print(f"\nwrote {out}, {out.with_suffix('.md')} and the plots {', '.join(results['plots'].values())}")
    else:
        print(render_markdown(results))
    print("\n" + "\n".join(target_lines(results["targets"])))
    return 0
