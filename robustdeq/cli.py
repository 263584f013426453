"""The ``robustdeq`` command line: one entry point with subcommands (compare ``torchserve``).

Every subcommand is one row of :data:`COMMANDS`: its name, the module that holds it and its
one-line help. The module defines ``add_<stem>_arguments(parser)`` (the options, and the
description when there is more to say) and ``run_<stem>(args)``, which returns the exit
status; the stem is the command's name with ``_`` for ``-`` unless the row names another.
Only the module of the command being run is imported, so ``robustdeq --help`` loads no
tool and no torch. ``python -m`` entry points that remain (``robustdeq.serving.health`` for
probes, the generators of committed files) are there for scripts and call the same functions.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module
from typing import Dict, Iterable, List, NamedTuple, Optional

from . import __version__

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


class Command(NamedTuple):
    module: str  # holds add_<stem>_arguments(parser) and run_<stem>(args)
    help: str
    stem: str = ""  # default: the command's name with "_" for "-"


#: name -> the subcommand, in the order ``robustdeq --help`` lists them
COMMANDS: Dict[str, Command] = {
    # models and training
    "models": Command("robustdeq.models.cli", "list the registered models with parameter counts"),
    "demo": Command("robustdeq.demo", "classify CIFAR-10 test images and print the entropy along the dynamics"),
    "train": Command(
        "robustdeq.training.cli",
        "train a DEQ / LyaDEQ with PGD-AT, TRADES and random intermediate states (paper 1 Sec. 3.3)",
    ),
    "cifar-folder": Command(
        "robustdeq.data.cifar_folder", "write CIFAR-10 as an image folder, to try training on your own images"
    ),
    "profile-training": Command(
        "robustdeq.training.profile", "where the time of one adversarial training step goes", "profile"
    ),
    "training-speed": Command(
        "robustdeq.training.speed", "time training-speed levers against a recipe, in interleaved rounds", "speed"
    ),
    "training-budget": Command(
        "robustdeq.training.budget", "rank the training-budget pilots by robust accuracy per CPU-hour", "budget"
    ),
    "long-runs": Command("robustdeq.training.long_runs", "chunk-by-chunk account of the long training runs"),
    # evaluation
    "accuracy": Command(
        "robustdeq.evaluation.cli", "clean and ready-made PGD-10 accuracy of a checkpoint (quick, non-adaptive)"
    ),
    "evaluate": Command(
        "robustdeq.evaluation.cli",
        "honest robustness evaluation: intermediate-state, AutoAttack and adaptive attacks",
    ),
    "merge-shards": Command(
        "robustdeq.evaluation.cli", "merge the folders of 'robustdeq evaluate --shard i/k' into one evaluation", "merge"
    ),
    "compare": Command(
        "robustdeq.evaluation.cli", "paired McNemar tests between two evaluations (or the settings of one)"
    ),
    "card": Command(
        "robustdeq.evaluation.cli",
        "print a robustness card as a table: robust accuracy vs cost per T_f/R setting",
    ),
    "combine-cards": Command(
        "robustdeq.evaluation.cli",
        "one robustness card from an undefended evaluation and a defended one of its first images",
        "combine",
    ),
    "attack-coverage": Command(
        "robustdeq.evaluation.cli",
        "which attacks set an evaluation's worst case (unique breaks, greedy cover, attack time)",
        "coverage",
    ),
    "results-page": Command(
        "robustdeq.evaluation.results_page",
        "regenerate docs/results.md and docs/robustbench/*.json from the committed evaluations",
    ),
    # serving
    "export": Command("robustdeq.export", "export the plain forward of a checkpoint to ONNX and check parity"),
    "archive": Command("robustdeq.serving.cli", "build TorchServe archives (.mar) from a checkpoint"),
    "serve": Command("robustdeq.serving.cli", "start TorchServe on 127.0.0.1 with the shipped archives"),
    "health": Command(
        "robustdeq.serving.health",
        "exit 0 when the server answers /ping and every model is loaded (the Docker HEALTHCHECK)",
    ),
    "kserve-layout": Command(
        "robustdeq.serving.kserve", "write the model storage (config/ + model-store/) a KServe InferenceService mounts"
    ),
    "stop": Command("robustdeq.serving.cli", "stop the server started by 'robustdeq serve'"),
    "predict": Command("robustdeq.serving.cli", "classify image files through a running server"),
    "grafana-dashboard": Command(
        "robustdeq.serving.dashboard",
        "print the Grafana dashboard (serving/grafana/robustdeq-dashboard.json)",
        "dashboard",
    ),
    "metrics-yaml": Command(
        "robustdeq.serving.metrics", "print the metrics declaration TorchServe reads (serving/metrics.yaml)"
    ),
    "fuzz-decoder": Command(
        "robustdeq.serving.fuzz", "feed seeded hostile payloads to the request decoder and count what it does", "fuzz"
    ),
    # measurements
    "loadtest": Command(
        "robustdeq.loadtest.cli",
        "start a server, load it with Locust, report exact latency percentiles and throughput",
    ),
    "bench": Command(
        "robustdeq.bench.cli",
        "speed of plain inference, ONNX Runtime and the defense over T_f x R (paper 1 Table 10)",
    ),
    "gpu-check": Command(
        "robustdeq.bench.cli",
        "everything a GPU must confirm (CUDA vs CPU parity, TorchServe on a GPU, Table 9 / 10 speeds)",
    ),
}


def _stem(name: str) -> str:
    return COMMANDS[name].stem or name.replace("-", "_")


def build_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, with the options of ``commands`` (default: all of them;
    :func:`main` imports only the module of the one it runs)."""
    parser = argparse.ArgumentParser(
        prog="robustdeq",
        description="Robust deep equilibrium (DEQ) classifiers: neural dynamics, early-state readout and "
        "test-time entropy reduction (Algorithm 1 of 'Improving Adversarial Robustness of DEQs "
        "with Explicit Regulations Along the Neural Dynamics').",
    )
    parser.add_argument("--version", action="version", version=f"robustdeq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(COMMANDS) if commands is None else set(commands)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        if name in wanted:
            module = import_module(command.module)
            getattr(module, f"add_{_stem(name)}_arguments")(p)
            p.set_defaults(func=getattr(module, f"run_{_stem(name)}"))
    return parser


def _command_in(argv: List[str]) -> List[str]:
    """The subcommand ``argv`` runs: its first word that is not an option (the top-level options take no value)."""
    return [word for word in argv if not word.startswith("-")][:1]


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .allocator import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:  # CheckpointError is a ValueError
        print(f"robustdeq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
