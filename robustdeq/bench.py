"""``robustdeq bench``: throughput of plain inference and of the defense (paper 1, Table 10 grid).

Everything is timed in one process on one batch, as medians over repeats, and compared
with the defense's operation-count floor (DESIGN.md §3):

    floor(T_f, R) = N * t_f  +  floor(N / T_f) * R * t_step

where t_f is one forward of the cell f on the batch and t_step one entropy-gradient step
(injection + f + head forward, backward to the input) - the unit of work Eq. 8 repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from .defense import entropy_reduction
from .dynamics import prediction_entropy
from .models import create_model


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _batch(args, batch_size: int) -> torch.Tensor:
    try:
        from .data import load_cifar10

        test = load_cifar10("test", source=args.data, progress=False)
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:batch_size]
        return test.float_images(idx)
    except (FileNotFoundError, RuntimeError, OSError):
        return torch.rand(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def run_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    B, N = args.batch_size, model.n_steps
    x = _batch(args, B)
    with torch.no_grad():
        u = model.inject(x)
        z = model.trajectory(x).states[-1]

    def cell_forward():
        with torch.no_grad():
            model.cell(z, u)

    def entropy_step():
        with torch.enable_grad():
            xa = x.detach().requires_grad_(True)
            ua = model.inject(xa)
            h = prediction_entropy(model.head(model.cell(z, ua), ua)).sum()
            torch.autograd.grad(h, xa)

    def plain():
        with torch.no_grad():
            model.trajectory(x).logits(model.readout_state)

    reps = args.repeats
    # unit timings are sampled next to every measurement, so the floor and the measured
    # times share the machine's state (these shared machines are noisy)
    unit_f: List[float] = []
    unit_step: List[float] = []

    def sample_units() -> None:
        unit_f.append(median_time(cell_forward, 3, warmup=0))
        unit_step.append(median_time(entropy_step, 3, warmup=0))

    sample_units()
    t_plain = median_time(plain, max(reps, 5))
    runs = []
    grid = [(tf, r) for tf in args.T_f for r in args.R]
    for tf, r in tqdm(grid, desc="defense grid", unit="setting"):
        times = []
        entropy_reduction(model, x, T_f=tf, R=r, with_plain=False)  # warm-up
        for _ in range(reps):
            sample_units()
            t0 = time.perf_counter()
            entropy_reduction(model, x, T_f=tf, R=r, with_plain=False)
            times.append(time.perf_counter() - t0)
        runs.append((tf, r, statistics.median(times)))
    t_f, t_step = statistics.median(unit_f), statistics.median(unit_step)
    results: Dict[str, object] = {
        "model": args.model,
        "batch_size": B,
        "N": N,
        "threads": torch.get_num_threads(),
        "parameters": model.num_parameters(),
        "t_f_forward_s": t_f,
        "t_entropy_step_s": t_step,
        "plain_samples_per_s": B / t_plain,
        "plain_s": t_plain,
        "defense": [],
    }
    for tf, r, t in runs:
        floor = N * t_f + (N // tf) * r * t_step
        results["defense"].append(
            {
                "T_f": tf,
                "R": r,
                "seconds": t,
                "samples_per_s": B / t,
                "slowdown_vs_plain": t / t_plain,
                "floor_s": floor,
                "ratio_to_floor": t / floor,
            }
        )
    if args.train:
        from .training.throughput import measure_training_throughput, speedups

        y = torch.randint(0, model.num_classes, (B,), generator=torch.Generator().manual_seed(1))
        rows = measure_training_throughput(args.model, x, y, rounds=max(reps, 5))
        results["training"] = rows
        results["training_speedup_sec33"] = speedups(rows)
    print(render_markdown(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(render_markdown(results) + "\n")
        print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


def render_markdown(r: Dict[str, object]) -> str:
    lines: List[str] = [
        f"model `{r['model']}` ({r['parameters']:,} parameters), batch {r['batch_size']}, N = {r['N']}, "
        f"{r['threads']} threads, medians",
        "",
        f"- one f forward: {r['t_f_forward_s'] * 1e3:.2f} ms; one entropy-gradient step "
        f"(inject + f + head, forward + backward to x): {r['t_entropy_step_s'] * 1e3:.2f} ms",
        f"- plain inference (N + 1 f-evaluations + head): {r['plain_samples_per_s']:.0f} samples/s",
    ]
    lines += [
        "",
        "| T_f | R | samples/s | slowdown vs plain | floor (ms) | measured / floor |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for d in r["defense"]:
        lines.append(
            f"| {d['T_f']} | {d['R']} | {d['samples_per_s']:.1f} | {d['slowdown_vs_plain']:.1f}x | "
            f"{d['floor_s'] * 1e3:.0f} | {d['ratio_to_floor']:.2f} |"
        )
    if r.get("training"):
        lines += [
            "",
            "Training steps (attack: PGD-10 / TRADES-10 inner max, phantom gradient K = 5, Jacobian reg.; "
            "interleaved rounds, total samples / total time):",
            "",
            "| variant | samples/s | mean depth n | Sec. 3.3 speed-up |",
            "|---|---:|---:|---:|",
        ]
        sp = r.get("training_speedup_sec33", {})
        for row in r["training"]:
            up = sp.get(row["objective"]) if row["random_depth"] else None
            lines.append(
                f"| {row['variant']} | {row['samples_per_s']:.1f} | {row['mean_depth']:.1f} | "
                + (f"{up:.2f}x |" if up else "- |")
            )
    return "\n".join(lines)
