"""The Eq. 11 surrogate of an evaluation (paper 1 Eq. 11): the intermediate-state attack grid,
and the grid attack chosen on the validation split (job ``surrogate``) whose gradient APGD, the
adaptive attacks through the defense, the analyses and the checks differentiate."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Dict, List

import torch

from ..attacks import IntermediateAttack, intermediate_grid
from .adaptive import readout_logits
from .job_ids import seed_of
from .measures import per_sample_ce

if TYPE_CHECKING:  # pragma: no cover
    from .context import EvaluationContext

__all__ = ["eq11_grid", "choose_surrogate", "strongest_intermediate"]


def eq11_grid(ctx: "EvaluationContext") -> List[IntermediateAttack]:
    """Paper 1's grid over state i, unroll K_a and lambda (default states: 1, ~3N/8, the early
    state, N; ``full_grid``: every state)."""
    c = ctx.config
    states = c.states
    if states is None and not c.full_grid:
        states = sorted({1, max(1, round(3 * ctx.N / 8)), ctx.k if ctx.k >= 1 else ctx.N, ctx.N})
    return intermediate_grid(ctx.N, states, c.unrolls, c.lams)


def strongest_intermediate(ctx: "EvaluationContext") -> IntermediateAttack:
    """The Eq. 11 surrogate of APGD and the adaptive attacks: the grid attack chosen on the
    validation split (job ``surrogate``). The run schedules that job before every family that
    declares it needs it; any other caller still gets the choice, made here on first use, never
    a fixed fallback (a fixed i = 3, K_a = 5, lambda = 0.5 overstated deq-small's robustness by
    2-3 points)."""
    return IntermediateAttack(**ctx.job("surrogate", lambda: choose_surrogate(ctx))["surrogate"])


def choose_surrogate(ctx: "EvaluationContext") -> dict:
    """Run the Eq. 11 grid on ``select_n`` validation images and keep the attack with the
    lowest early-state accuracy (ties: the first). A choice made off the test subset is
    the same in every shard of it."""
    c = ctx.config
    val = ctx.validation_split()
    n = min(c.select_n, len(val))
    x_all, y_all = val.images[:n].float().div(255.0), val.labels[:n]
    grid = eq11_grid(ctx)
    acc: Dict[str, float] = {}
    with ctx.bar(n * len(grid), "Eq. 11 surrogate (validation)") as bar:
        for a in grid:
            correct = 0
            for i in range(0, n, c.batch_size):
                x, y = x_all[i : i + c.batch_size].to(ctx.device), y_all[i : i + c.batch_size].to(ctx.device)
                gen = torch.Generator().manual_seed(seed_of(c.seed, "surrogate", a.name, i))
                x_adv = ctx.pgd(lambda xa, a=a, y=y: per_sample_ce(a.logits(ctx.model, xa), y), x, y, gen)
                correct += int((readout_logits(ctx.model, x_adv).argmax(-1) == y).sum())
                bar.update(len(y))
            acc[a.name] = correct / n
    best = min(grid, key=lambda a: acc[a.name])
    return {
        "attack": best.name,
        "surrogate": asdict(best),
        "val_n": n,
        "val_acc": acc,
        "split": "validation split of the checkpoint's training run",
    }
