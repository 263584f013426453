"""``robustdeq train``: argument parsing and the call into :class:`Trainer`."""

from __future__ import annotations

import argparse
from pathlib import Path

TRAIN_EPILOG = """\
examples:
  robustdeq train --config training/configs/deq-tiny-trades-rs.yaml
  robustdeq train --config training/configs/deq-tiny-pgd.yaml --set optim.epochs=2 --set data.epoch_size=2000
  robustdeq train --config training/configs/lyadeq-tiny-trades.yaml --time-limit 30   # stop after 30 min, resume later
  torchrun --nproc_per_node 8 -m robustdeq train --config training/configs/mdeq-large-trades-rs.yaml

Running the same command again resumes from OUT/last.pt (the recipe must match, except
for optim.epochs, run.*, validation.* and data.source). --restart starts over.
The run directory gets config.yaml, log.jsonl, epochs.csv, curves.png, last.pt and, when
the schedule completes, model.pt with the early state chosen by PGD-10 on the validation split.
"""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Train a robust DEQ from a YAML recipe (training/configs/). Clean pretraining as a "
        "weight-tied unrolled net, then clean / PGD-AT / TRADES steps with the phantom gradient, optionally on "
        "a random intermediate state n ~ U{1..N}; per-epoch clean and PGD-10 validation on a split carved from "
        "the training set; the early state is chosen on that split at the end."
    )
    p.epilog = TRAIN_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", required=True, help="YAML recipe, e.g. training/configs/deq-tiny-trades-rs.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config entry (repeatable), e.g. --set optim.epochs=5 --set attack.eps=4/255",
    )
    p.add_argument("--out", default=None, help="run directory (default runs/train/<config name>)")
    p.add_argument("--restart", action="store_true", help="discard an existing run in --out instead of resuming")
    p.add_argument("--max-steps", type=int, default=None, help="stop (resumably) after this many steps in this call")
    p.add_argument(
        "--time-limit", type=float, default=None, metavar="MINUTES", help="stop (resumably) after this much wall time"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve live progress as Prometheus metrics on http://127.0.0.1:PORT/metrics",
    )
    p.add_argument("--data", default=None, help="CIFAR-10 source; shorthand for --set data.source=...")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the config's run.device, auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs still written)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from .config import load_config
    from .trainer import Trainer

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.device:
        overrides.append(f"run.device={args.device}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError("--max-steps must be >= 1")
    out = Path(args.out) if args.out else Path("runs") / "train" / cfg.name
    trainer = Trainer(cfg, out, progress=not args.no_progress, metrics_port=args.metrics_port, restart=args.restart)
    result = trainer.run(
        max_steps=args.max_steps, time_limit_s=None if args.time_limit is None else 60.0 * args.time_limit
    )
    return 0 if result.completed or result.step > 0 else 1
