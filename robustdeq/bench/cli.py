"""``robustdeq bench`` and ``robustdeq gpu-check``: their options and their runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .run import run_bench

__all__ = ["add_bench_arguments", "run_bench", "add_gpu_check_arguments", "run_gpu_check"]

DESCRIPTION = """\
In-process speed benchmark (one process, medians over repeats):

  * plain inference per batch size, eager PyTorch and ONNX Runtime (the serving fast path);
  * the entropy-reduction defense (paper 1, Algorithm 1) over the T_f x R grid of paper 1
    Table 10, with slowdown vs plain and measured / operation-count floor, where
    floor = N t_f + floor(N / T_f) R t_step (docs/design.md §3);
  * per-stage time (stem, solve, defense, head) of plain inference and of --stages settings;
  * the entropy-gated defense with the robustness card's gate on clean and PGD-10 inputs:
    trigger rates, cost vs plain at the largest batch size, the card's robust accuracy
    gated vs ungated;
  * with --trials: channels-last and torch.compile (inductor) against eager.

Prints a Markdown report and PASS / FAIL lines for the speed targets; with --out also
writes the JSON, the Markdown and two PNG plots beside it."""


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--checkpoint",
        default=None,
        help="model.pt to benchmark; its robustness_card.json beside it gives the gate "
        "(default: the shipped training/shipped/deq-tiny-trades-rs/model.pt)",
    )
    what.add_argument(
        "--model", default=None, help="benchmark a random-init registered model instead (quick runs; no card, no gate)"
    )
    p.add_argument("--card", default=None, help="robustness card JSON (default: the one beside the checkpoint)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="batch sizes (default 1 8 64)")
    sizes.add_argument("--batch-size", type=int, default=None, help="a single batch size (same as --batch-sizes N)")
    p.add_argument("--T_f", type=int, nargs="+", default=[1, 2, 4, 8], help="T_f values of the grid (default 1 2 4 8)")
    p.add_argument(
        "--R",
        type=int,
        nargs="+",
        default=[0, 1, 5, 10, 20],
        help="R values of the grid (default 0 1 5 10 20; 0 = plain)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed repetitions per measurement, medians reported (default 3; plain inference, "
        "stages and trials use at least 5)",
    )
    p.add_argument(
        "--stages",
        nargs="*",
        default=["2,10", "2,10,gated"],
        metavar="T_f,R[,gated]",
        help="settings whose per-stage time is reported beside plain inference (default: 2,10 2,10,gated; "
        "a gated one needs the card's gate)",
    )
    p.add_argument(
        "--gate-n",
        type=int,
        default=256,
        help="test images (clean and PGD-10-perturbed) for the gate's trigger rates (default 256)",
    )
    p.add_argument(
        "--trials",
        action="store_true",
        help="also time channels-last and torch.compile (inductor) plain inference against eager "
        "(compilation takes a minute or more on 2 cores)",
    )
    p.add_argument(
        "--compile-timeout",
        type=float,
        default=300.0,
        help="with --trials: give up a trial whose first call (compilation) takes longer (seconds, default 300)",
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="also time training steps of PGD-AT and TRADES with and without random intermediate states "
        "(paper 1 Sec. 3.3 / Table 9) at the largest batch size",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads, also used by ONNX Runtime (default: torch's)"
    )
    p.add_argument(
        "--out", default=None, help="write the results as JSON here, the Markdown (.md) and the PNG plots beside it"
    )
    p.add_argument(
        "--data", default=None, help="CIFAR-10 source (default: ../shared/data archive; random noise, said so, if none)"
    )


GPU_CHECK_EPILOG = """\
sections: parity64 (solvers, dynamics and Algorithm 1 in float64, CUDA vs CPU), served32 (the served
answer in float32, CUDA vs CPU), torchserve (a real TorchServe with number_of_gpu set: plain and
defended answers, timing_ms, GPU series on /metrics), training (mdeq-large samples/s at batch 96,
PGD-AT vs + Sec. 3.3, paper 1 Table 9), defense_cost (T_f = 2, R = 10 slowdown, paper 1 Table 10),
onnx (ONNX Runtime's CUDA provider vs eager, when onnxruntime-gpu is importable).

Without CUDA the GPU-only sections are skipped with the reason, and CPU stand-ins run (TorchServe
on the CPU, deq-tiny throughput and defense cost, ONNX Runtime's CPU provider). Exit status 0 unless
a section that ran failed. On a GPU machine: make gpu-check (about 3 minutes on one GPU)."""


def add_gpu_check_arguments(p: argparse.ArgumentParser) -> None:
    from .gpu_check import SECTIONS

    p.description = "Run the prepared GPU checks and write gpu-check.json and gpu-check.md."
    p.epilog = GPU_CHECK_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default="runs/gpu-check", help="output folder (default: %(default)s)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=None, help="run only these sections")
    p.add_argument("--quick", action="store_true", help="fewer repeats (for tests and a first look)")


def run_gpu_check(args: argparse.Namespace) -> int:
    """Run the sections, print the Markdown report; exit 1 when a section that ran failed."""
    from . import gpu_check

    report = gpu_check.run_gpu_check(Path(args.out), args.sections, quick=args.quick)
    print((Path(args.out) / "gpu-check.md").read_text())
    return 0 if report["verdict"] == "pass" else 1
