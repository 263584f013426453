"""The ``robustdeq`` command line: one entry point with subcommands (compare ``torchserve``)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__


def _models(args: argparse.Namespace) -> int:
    from .models import MODEL_PRESETS, create_model

    print(f"{'name':<18}{'parameters':>12}  solver      N   description")
    for name in sorted(MODEL_PRESETS):
        model = create_model(name)
        print(
            f"{name:<18}{model.num_parameters():>12,}  {model.solver_name:<10}{model.n_steps:>3}   "
            f"{MODEL_PRESETS[name][2]}"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def _train(args: argparse.Namespace) -> int:
    from .training.cli import run_train

    return run_train(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustdeq",
        description="Robust deep equilibrium (DEQ) classifiers: neural dynamics, early-state readout and "
        "test-time entropy reduction (Algorithm 1 of 'Improving Adversarial Robustness of DEQs "
        "with Explicit Regulations Along the Neural Dynamics').",
    )
    parser.add_argument("--version", action="version", version=f"robustdeq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered models with parameter counts")
    p.set_defaults(func=_models)

    p = sub.add_parser(
        "demo",
        help="classify CIFAR-10 test images and print the entropy along the dynamics",
        description="Classify a few CIFAR-10 test images, print the prediction entropy at every "
        "state z[1..N] with and without the entropy-reduction defense.",
    )
    p.add_argument("--model", default="deq-tiny", help="registered model name (see 'robustdeq models')")
    p.add_argument("--n", type=int, default=8, help="number of test images (default 8)")
    p.add_argument(
        "--train-steps",
        type=int,
        default=300,
        help="clean training steps before classifying (0 = random weights; default 300, ~30 s on 2 cores)",
    )
    p.add_argument("--T_f", type=int, default=2, help="defense: input update every T_f solver steps (default 2)")
    p.add_argument("--R", type=int, default=10, help="defense: entropy-descent steps per update (default 10)")
    p.add_argument(
        "--data",
        default=None,
        help="CIFAR-10 source: JPEG archive, cifar-10-batches-py folder, or "
        "'torchvision' (default: ../shared/data archive if present)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "bench",
        help="speed of plain inference and of the defense over T_f x R (paper 1 Table 10)",
        description="In-process throughput of plain inference and of the entropy-reduction defense "
        "over a T_f x R grid, with the operation-count floor of the defense.",
    )
    p.add_argument("--model", default="deq-tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--T_f", type=int, nargs="+", default=[1, 2, 4, 8], help="T_f values (default 1 2 4 8)")
    p.add_argument("--R", type=int, nargs="+", default=[1, 5, 10, 20], help="R values (default 1 5 10 20)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per setting; the median is reported")
    p.add_argument(
        "--train-step",
        action="store_true",
        help="also time one PGD-10 adversarial-training step (phantom gradient) at this batch size",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the results as JSON here (and a .md table beside it)")
    p.add_argument("--data", default=None, help="CIFAR-10 source (real test images; random ones if none)")
    p.set_defaults(func=_bench)
    from .training.cli import add_train_parser

    add_train_parser(sub, _train)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .runtime import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"robustdeq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
