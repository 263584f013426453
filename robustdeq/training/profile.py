"""Where the time of one adversarial training step goes (``python -m robustdeq.training.profile``).

A step of PGD-AT / TRADES on a DEQ (paper 1 Appendix A, Sec. 3.3) is made of:

* the inner attack: ``steps`` x (a solve of n states without gradient + the phantom unroll
  of K + 1 cell calls, forward and backward to the input);
* for TRADES, the clean prediction the KL term is measured against (solve + unroll, no grad);
* the loss: one (PGD-AT) or two (TRADES: clean and adversarial) phantom forwards with
  gradient, and their backward to the parameters;
* the Jacobian regulariser (a Hutchinson vector-Jacobian product with a double backward);
* the optimiser update;
* validation, once per epoch: clean and PGD-10 accuracy of every state on held-out images,
  spread over the epoch's steps.

Each part is timed on its own in interleaved rounds, next to the full step, so machine
noise hits them alike; shares are of the summed parts. Depths follow the recipe: the full
N, or the mean of U{1..N} under Sec. 3.3 (rounded).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..attacks import pgd_linf
from ..dynamics import CellMap, damped_unroll, phantom_forward
from ..models import create_model
from ..solvers import solve
from .loss_terms import jacobian_regularizer
from .objectives import trades_kl

__all__ = ["profile_step", "format_profile", "add_profile_arguments", "run_profile", "main"]


def _median(values: List[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def profile_step(
    model_name: str = "deq-tiny",
    objective: str = "trades",
    attack_steps: int = 10,
    random_depth: bool = True,
    jacobian: bool = True,
    batch: int = 96,
    rounds: int = 5,
    validation_seconds_per_step: Optional[float] = None,
) -> Dict[str, float]:
    """Median seconds per part of one training step (and the full step) on random inputs."""
    torch.manual_seed(0)
    model = create_model(model_name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    depth = (model.n_steps + 1) // 2 if random_depth else model.n_steps
    trades = objective == "trades"

    def attack_solves():
        model.eval()
        with torch.no_grad():
            for _ in range(attack_steps):
                u = model.inject(x)
                solve(CellMap(model, u), model.initial_state(u), model.make_solver(), depth)

    def attack_unrolls():
        model.eval()
        for _ in range(attack_steps):
            xa = x.clone().requires_grad_(True)
            u = model.inject(xa)
            z = model.initial_state(u).detach()
            w = damped_unroll(model, z, u, 5, 0.5)
            torch.autograd.grad(model.head(w, u).sum(), xa)

    def clean_target():
        model.eval()
        with torch.no_grad():
            phantom_forward(model, x, depth)

    def loss_and_backward():
        model.train()
        opt.zero_grad()
        out = phantom_forward(model, x, depth)
        if trades:
            adv = phantom_forward(model, x, depth)
            loss = F.cross_entropy(out.logits, y) + 6.0 * trades_kl(adv.logits, out.logits.detach()).mean()
        else:
            loss = F.cross_entropy(out.logits, y)
        loss.backward()

    def jacobian_term():
        model.train()
        out = phantom_forward(model, x, depth)
        jacobian_regularizer(model, out.state, out.injection.detach()).backward()

    def optimiser():
        opt.step()

    def full_step():
        model.eval()

        def loss_fn(xa):
            return F.cross_entropy(phantom_forward(model, xa, depth).logits, y, reduction="none")

        pgd_linf(loss_fn, x, 8 / 255, 2 / 255, attack_steps, generator=g)
        if trades:
            clean_target()
        loss_and_backward()
        if jacobian:
            jacobian_term()
        opt.step()

    parts: Dict[str, Callable[[], None]] = {
        "attack: solves (no grad)": attack_solves,
        "attack: unroll + input backward": attack_unrolls,
    }
    if trades:
        parts["TRADES clean target"] = clean_target
    parts["loss: phantom forward(s) + backward" + (" (TRADES: two passes)" if trades else "")] = loss_and_backward
    if jacobian:
        parts["Jacobian regulariser"] = jacobian_term
    parts["optimiser update"] = optimiser
    parts["full step (measured)"] = full_step
    times: Dict[str, List[float]] = {k: [] for k in parts}
    for r in range(rounds + 1):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    out = {k: _median(v) for k, v in times.items()}
    if validation_seconds_per_step is not None:
        out["validation (per step, amortised)"] = validation_seconds_per_step
    return out


def format_profile(profile: Dict[str, float], batch: int = 96) -> str:
    parts = {k: v for k, v in profile.items() if k != "full step (measured)"}
    total = sum(parts.values())
    lines = ["| part of a step | ms | share |", "|---|---|---|"]
    lines += [f"| {k} | {1000 * v:.0f} | {100 * v / total:.0f}% |" for k, v in parts.items()]
    full = profile.get("full step (measured)")
    if full:
        lines.append(f"| full step, measured | {1000 * full:.0f} | {batch / full:.0f} samples/s |")
    return "\n".join(lines) + "\n"


def _validation_seconds(model_name: str, n_clean: int, n_robust: int, steps_per_epoch: int) -> float:
    """One epoch's validation (clean + PGD-10 of every state) on random inputs, per step."""
    from ..state_accuracy import state_accuracies

    torch.manual_seed(0)
    model = create_model(model_name).eval()
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(max(n_clean, n_robust), 3, 32, 32, generator=g) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (len(images),), generator=g)
    t0 = time.perf_counter()
    state_accuracies(model, images, labels, n_clean, n_robust, progress=False)
    return (time.perf_counter() - t0) / steps_per_epoch


def add_profile_arguments(ap: argparse.ArgumentParser) -> None:
    """``robustdeq profile-training`` (also ``python -m robustdeq.training.profile``)."""
    ap.description = __doc__.split("\n\n")[0]
    ap.add_argument("--model", default="deq-tiny")
    ap.add_argument("--objective", choices=("pgd_at", "trades"), default="trades")
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--no-random-depth", action="store_true", help="full depth N instead of Sec. 3.3's U{1..N}")
    ap.add_argument("--no-jacobian", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--epoch-size", type=int, default=12000, help="samples per epoch, to spread one validation over its steps"
    )


def run_profile(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    val = _validation_seconds(args.model, 1000, 500, max(1, args.epoch_size // 96))
    prof = profile_step(
        args.model,
        args.objective,
        args.attack_steps,
        not args.no_random_depth,
        not args.no_jacobian,
        rounds=args.rounds,
        validation_seconds_per_step=val,
    )
    print(format_profile(prof))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m robustdeq.training.profile")
    add_profile_arguments(ap)
    return run_profile(ap.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
