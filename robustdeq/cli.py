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


def _gpu_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench.gpu_check import run_gpu_check

    report = run_gpu_check(Path(args.out), args.sections, quick=args.quick)
    print((Path(args.out) / "gpu-check.md").read_text())
    return 0 if report["verdict"] == "pass" else 1


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def _train(args: argparse.Namespace) -> int:
    from .training.cli import run_train

    return run_train(args)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation.cli import run_evaluate

    return run_evaluate(args)


def _merge_shards(args: argparse.Namespace) -> int:
    from .evaluation.cli import run_merge

    return run_merge(args)


def _compare(args: argparse.Namespace) -> int:
    from .evaluation.cli import run_compare

    return run_compare(args)


def _export(args: argparse.Namespace) -> int:
    import json

    import torch

    from .checkpoint import load_checkpoint
    from .data import load_cifar10
    from .export import OnnxPlainSession, export_onnx, parity

    model = load_checkpoint(args.checkpoint).build_model()
    out = export_onnx(model, args.out, state=args.state)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB): fixed-iteration plain forward of {model.name}, "
          f"N = {model.n_steps}, outputs logits (z[{model.readout_index() if args.state is None else args.state}]), "
          "all_logits, residuals")  # fmt: skip
    if args.parity > 0:
        test = load_cifar10("test", source=args.data, progress=False)
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.parity]
        report = parity(model, OnnxPlainSession(out), test.float_images(idx), args.state)
        print("parity with PyTorch on CIFAR-10 test images: " + json.dumps(report))
        if report["max_abs_logit_diff"] > args.tolerance or report["labels_agree"] != report["n"]:
            print(f"robustdeq export: parity check failed (tolerance {args.tolerance})", file=sys.stderr)
            return 1
    return 0


def _accuracy(args: argparse.Namespace) -> int:
    import json

    from .evaluation import checkpoint_accuracy
    from .training.config import parse_number

    result = checkpoint_accuracy(
        args.checkpoint,
        split=args.split,
        n=args.n,
        pgd_steps=args.pgd_steps,
        eps=float(parse_number(args.eps)),
        batch_size=args.batch_size,
        data=args.data,
        device=args.device,
        progress=not args.no_progress,
    )
    k = result["state"]
    pgd = f", PGD-{args.pgd_steps} {100 * result['pgd_acc']:.2f}%" if result["pgd_acc"] is not None else ""
    where = f"{result['model']} at z[{k}] on {result['n']} {result['split']} images"
    print(f"{where}: clean {100 * result['clean_acc']:.2f}%{pgd}")
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


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
    p.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="draw the dynamics of --checkpoint on PGD-10 inputs with and without the defense into PNG "
        "(the README's picture: robustdeq demo --checkpoint "
        "training/shipped/deq-small-nfgsm-rs-long/model.pt --n 256 --plot docs/img/dynamics.png)",
    )
    p.add_argument("--checkpoint", default=None, help="with --plot: a model.pt written by 'robustdeq train'")
    p.set_defaults(func=_demo)

    from .bench.cli import add_bench_parser, add_gpu_check_parser

    add_bench_parser(sub, _bench)
    add_gpu_check_parser(sub, _gpu_check)
    p = sub.add_parser(
        "accuracy",
        help="clean and ready-made PGD-10 accuracy of a checkpoint (quick, non-adaptive)",
        description="Clean and ready-made PGD accuracy of a checkpoint at its chosen early state and at z[N], on "
        "the CIFAR-10 test split or on the checkpoint's own validation split. Non-adaptive: the attack follows the "
        "phantom gradient of the final state. Use 'robustdeq evaluate' for adaptive attacks.",
    )
    p.add_argument("--checkpoint", required=True, help="a model.pt written by 'robustdeq train'")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--n", type=int, default=None, help="images (default: the whole split)")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (0 = clean only; default 10)")
    p.add_argument("--eps", default="8/255", help="l_inf radius (default 8/255)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: ../shared/data archive)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_accuracy)

    p = sub.add_parser(
        "export",
        help="export the plain forward of a checkpoint to ONNX and check parity",
        description="Export the fixed-iteration plain forward (injection, N solver steps, the head at every "
        "state; outputs: logits at the early state, all_logits, residuals) to ONNX with a dynamic batch axis, then "
        "compare ONNX Runtime with PyTorch on real CIFAR-10 test images. The defense cannot be exported (it takes "
        "input gradients inside inference), nor can LyaDEQ (its head uses autograd).",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--state", type=int, default=None, help="readout state of 'logits' (default: the checkpoint's)")
    p.add_argument("--parity", type=int, default=256, help="test images for the parity check (0 = skip)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="max |logit difference| over every state allowed (default 1e-3: float32 rounding grows along the "
        "Broyden iterates, to 7.2e-4 at deq-small's z[8]); every label must agree in any case",
    )
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: ../shared/data archive)")
    p.set_defaults(func=_export)

    from .evaluation.cli import (
        add_card_parser,
        add_combine_parser,
        add_compare_parser,
        add_coverage_parser,
        add_evaluate_parser,
        add_merge_parser,
    )
    from .training.cli import add_train_parser

    add_train_parser(sub, _train)
    add_evaluate_parser(sub, _evaluate)
    add_merge_parser(sub, _merge_shards)
    add_compare_parser(sub, _compare)
    add_card_parser(sub)
    add_combine_parser(sub)
    add_coverage_parser(sub)

    from .serving.cli import add_serving_parsers

    add_serving_parsers(sub)

    from .loadtest.cli import add_loadtest_parser

    add_loadtest_parser(sub)
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
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:  # CheckpointError is a ValueError
        print(f"robustdeq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
