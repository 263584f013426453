"""Training-speed levers, timed against one recipe (``python -m robustdeq.training.speed``).

Each lever is a set of config overrides (or a model-level switch: ``channels_last``,
``compile``) applied to one recipe. Every variant gets its own copy of the same initial
model and optimiser and trains real steps of :func:`training_step` on the same random
batches with the same depth draws, in interleaved rounds, so that machine noise hits the
variants alike. A round runs ``steps`` consecutive steps of every variant, so that a lever
that acts every k steps (``objective.jacobian_every``) is timed at its amortised cost.
The report gives the median seconds per step, samples/s and the ratio to the recipe.

Speed is only half of a lever: whether it costs accuracy is a pilot's question
(docs/training-budget.md, "A faster trainer").
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..models import create_model
from .config import TrainConfig, load_config
from .objectives import Objective, ObjectiveModule, training_step
from .optim import build_optimizer

__all__ = ["LEVERS", "Lever", "time_levers", "format_levers", "add_speed_arguments", "run_speed", "main"]


@dataclass(frozen=True)
class Lever:
    """One way to make a step cheaper: config overrides and/or a model-level switch."""

    description: str
    overrides: Sequence[str] = ()
    channels_last: bool = False
    compile: bool = False


LEVERS: Dict[str, Lever] = {
    "recipe": Lever("the recipe as configured"),
    "jacobian-every-2": Lever("Jacobian term every 2nd step", ("objective.jacobian_every=2",)),
    "jacobian-every-4": Lever("Jacobian term every 4th step", ("objective.jacobian_every=4",)),
    "jacobian-quarter": Lever("Jacobian term on a random quarter of the batch", ("objective.jacobian_fraction=0.25",)),
    "attack-unroll-2": Lever(
        "phantom unroll K = 2 inside the attack (loss keeps K = 5)", ("objective.attack_unroll=2",)
    ),
    "attack-unroll-0": Lever("attack through f(z[n]) alone (K = 0; loss keeps K = 5)", ("objective.attack_unroll=0",)),
    "channels-last": Lever("channels_last memory format for the model", channels_last=True),
    "compile": Lever("torch.compile (Inductor) of the cell", compile=True),
    "combined": Lever(
        "Jacobian on a quarter of the batch + attack unroll K = 2",
        ("objective.jacobian_fraction=0.25", "objective.attack_unroll=2"),
    ),
}


@dataclass
class _Variant:
    name: str
    lever: Lever
    cfg: TrainConfig
    model: torch.nn.Module
    module: ObjectiveModule
    objective: Objective
    optimizer: torch.optim.Optimizer
    times: List[float] = field(default_factory=list)
    compile_s: float = 0.0
    error: Optional[str] = None


def _build(name: str, lever: Lever, config: Optional[str], overrides: Sequence[str], initial_state) -> _Variant:
    cfg = load_config(config, list(overrides) + list(lever.overrides))
    model = create_model(cfg.model.name, **cfg.model.overrides)
    model.load_state_dict(initial_state)
    if lever.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if lever.compile:
        cell_owner = getattr(model, "block", None)
        if cell_owner is None:
            raise ValueError(f"{cfg.model.name} has no .block to compile")
        cell_owner.compile()
    objective = Objective(cfg.objective, cfg.attack, cfg.pretrain.depth)
    module = ObjectiveModule(model, objective)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    return _Variant(name, lever, cfg, model, module, objective, optimizer)


def time_levers(
    names: Sequence[str],
    config: Optional[str],
    overrides: Sequence[str] = (),
    rounds: int = 6,
    steps: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, Dict[str, float]]:
    """Median seconds per training step of each lever (a warm-up round is not counted)."""
    base = load_config(config, overrides)
    torch.manual_seed(seed)
    initial = create_model(base.model.name, **base.model.overrides).state_dict()
    variants = [_build(n, LEVERS[n], config, overrides, copy.deepcopy(initial)) for n in names]
    batch = base.optim.batch_size
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    step = base.pretrain.steps  # time adversarial steps, not pretraining
    for r in range(rounds + 1):
        for v in variants:
            if v.error:
                continue
            t0 = time.perf_counter()
            try:
                for s in range(steps):
                    k = step + r * steps + s
                    training_step(
                        v.module,
                        v.objective,
                        v.optimizer,
                        x,
                        y,
                        generator=torch.Generator().manual_seed(1000 + k),
                        depth_generator=torch.Generator().manual_seed(2000 + k),
                        use_jacobian=k % v.cfg.objective.jacobian_every == 0,
                    )
            except Exception as e:  # a lever that does not run here is reported, not fatal
                v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            elapsed = (time.perf_counter() - t0) / steps
            if r == 0:
                v.compile_s = elapsed * steps  # the first round includes any compilation
            else:
                v.times.append(elapsed)
        if progress:
            print(f"round {r}/{rounds} done", flush=True)
    out: Dict[str, Dict[str, float]] = {}
    for v in variants:
        if v.error or not v.times:
            out[v.name] = {"error": v.error or "no timing"}
            continue
        med = sorted(v.times)[len(v.times) // 2]
        out[v.name] = {"s_per_step": med, "samples_per_s": batch / med, "first_round_s": v.compile_s}
    ref = out.get("recipe", {}).get("s_per_step")
    for rec in out.values():
        if ref and "s_per_step" in rec:
            rec["speedup"] = ref / rec["s_per_step"]
    return out


def format_levers(result: Dict[str, Dict[str, float]]) -> str:
    lines = [
        "| lever | what it changes | ms / step | samples/s | vs recipe | first round, s |",
        "|---|---|---|---|---|---|",
    ]
    for name, rec in result.items():
        desc = LEVERS[name].description if name in LEVERS else ""
        if "error" in rec:
            lines.append(f"| `{name}` | {desc} | did not run: {rec['error']} | | | |")
            continue
        lines.append(
            f"| `{name}` | {desc} | {1000 * rec['s_per_step']:.0f} | {rec['samples_per_s']:.0f} | "
            f"{rec.get('speedup', float('nan')):.2f}x | {rec['first_round_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def add_speed_arguments(ap: argparse.ArgumentParser) -> None:
    """``robustdeq training-speed`` (also ``python -m robustdeq.training.speed``)."""
    ap.description = __doc__.split("\n\n")[0]
    ap.add_argument("--config", default="training/configs/deq-small-nfgsm-rs-long.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS), metavar="LEVER",
                    help=f"levers to time (default: all): {', '.join(LEVERS)}")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    ap.add_argument("--steps", type=int, default=4, help="consecutive training steps per variant per round")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")


def run_speed(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.levers if "recipe" in args.levers else ["recipe", *args.levers]
    result = time_levers(names, args.config, args.overrides, args.rounds, args.steps)
    meta = {"config": args.config, "overrides": args.overrides, "threads": torch.get_num_threads(),
            "rounds": args.rounds, "steps": args.steps}  # fmt: skip
    print(format_levers(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "levers": result}, indent=2) + "\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m robustdeq.training.speed")
    add_speed_arguments(ap)
    return run_speed(ap.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
