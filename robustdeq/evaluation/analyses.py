"""The paper analyses and checks of an evaluation (families ``radii``, ``analyses``, ``checks``):
paper 2's radii (Table 1), the dynamics under attack (paper 1 Fig. 2-3, Tables 6-7), the
transfer matrix (Table 3), the T_f x R grid (Table 5) and the gradient-masking checks of
docs/design.md §6."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks import ifgsm_steps
from ..defense import DefenseSetting
from ..stats import Proportion
from .adaptive import UNROLL_BATCH, defended_surrogate_logits
from .context import Job, proportion
from .measures import relative_deviation
from .surrogate import strongest_intermediate

if TYPE_CHECKING:  # pragma: no cover
    from .context import EvaluationContext

__all__ = [
    "analyses_jobs",
    "radii",
    "dynamics_analysis",
    "transfer_matrix",
    "tf_r_grid",
    "masking_checks",
    "white_box_worst_case",
]


def analyses_jobs(ctx: "EvaluationContext") -> Iterator[Job]:
    """Family ``analyses``: the dynamics, the transfer matrix and (with a defense) the T_f x R grid."""
    yield "dynamics", lambda: dynamics_analysis(ctx)
    yield "transfer-matrix", lambda: transfer_matrix(ctx)
    if ctx.defenses:
        yield "tf-r-grid", lambda: tf_r_grid(ctx)


def radii(ctx: "EvaluationContext") -> dict:
    """Paper 2 Table 1: I-FGSM and PGD (ready-made gradient) at several radii, step 1/255
    and the number of steps of paper 2 Eq. 14."""
    out = {}
    for eps in ctx.config.radii:
        steps = ifgsm_steps(eps)
        for kind in ("ifgsm", "pgd"):
            robust = ctx.isolated_pgd(
                f"{kind}@{eps * 255:.0f}", ctx.ready_made_surrogate(), steps=steps, eps=eps,
                step_size=1 / 255, random_start=kind == "pgd",
            )  # fmt: skip
            out[f"{kind}@{eps * 255:g}/255"] = {"eps": eps, "steps": steps, **proportion(robust)}
    return {"cells": out}


def dynamics_analysis(ctx: "EvaluationContext") -> dict:
    """Fig. 2c/3b (entropy along the dynamics, with and without the defense) and Fig. 3c
    (relative deviation of the perturbed states from the clean ones), on the strongest
    per-sample adversarial inputs found for the undefended model."""
    x_adv = ctx.best["none"].x
    d = next((d for d in ctx.defenses if not d.gated), None)
    sums: Dict[str, Tensor] = {}
    dh_adv = []

    def add(key, v):
        sums[key] = sums.get(key, 0) + v.sum(0).cpu()

    with ctx.bar(ctx.n, "dynamics analysis") as bar:
        for chunk in ctx.chunks(ctx.all_images()):
            xc, xa = ctx.x[chunk].to(ctx.device), x_adv[chunk].to(ctx.device)
            with torch.no_grad():
                tc, ta = ctx.model.trajectory(xc), ctx.model.trajectory(xa)
                add("entropy/clean", tc.entropies(1))
                add("entropy/adversarial", ta.entropies(1))
                add("deviation/plain", relative_deviation(ta, tc))
            if d is not None:
                rc, ra = d.run(ctx.model, xc), d.run(ctx.model, xa)
                with torch.no_grad():
                    add("entropy/clean+defense", rc.trajectory.entropies(1))
                    add("entropy/adversarial+defense", ra.trajectory.entropies(1))
                    dh_adv.append((ra.trajectory.entropies(1) - ta.entropies(1)).cpu())
                    add("deviation/defense", relative_deviation(ra.trajectory, rc.trajectory))
            bar.update(len(chunk))
    out = {k: (v / ctx.n).tolist() for k, v in sums.items()}
    out["defense"] = d.name if d is not None else None
    if dh_adv:
        dh = torch.cat(dh_adv)
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        out["delta_H_defense_quantiles"] = torch.quantile(dh, q, dim=0).T.tolist()  # [N][5]
        out["delta_H_defense_mean"] = dh.mean(0).tolist()
    return out


def transfer_matrix(ctx: "EvaluationContext") -> dict:
    """Paper 1 Table 3 within one model: the accuracy of each setting (rows) on the
    strongest inputs found against each setting (columns)."""
    settings: List[Optional[DefenseSetting]] = [None] + list(ctx.defenses)
    names = [ctx.key(s) for s in settings]
    matrix: Dict[str, Dict[str, dict]] = {}
    for row in settings:
        matrix[ctx.key(row)] = {}
        for col in names:
            x_col = ctx.best[col].x

            def fn(chunk, x, y, row=row):
                return (ctx.logits(row, x).argmax(-1) == y).float()

            correct = ctx.map(fn, x_col, ctx.all_images(), f"transfer {col} -> {ctx.key(row)}") > 0.5
            matrix[ctx.key(row)][col] = proportion(correct)
    return {"rows_evaluated_on": names, "columns_attacks_against": names, "matrix": matrix}


def tf_r_grid(ctx: "EvaluationContext") -> dict:
    """Paper 1 Table 5: robust accuracy of Algorithm 1 over T_f x R on the strongest
    inputs found against the undefended model (non-adaptive, as in the paper), with
    each setting's cost measured against plain inference in the same loop."""
    c = ctx.config
    x_adv = ctx.best["none"].x
    cells = []
    for T_f in c.grid_T_f:
        for R in c.grid_R:
            s = DefenseSetting(T_f=T_f, R=R)
            out, cost = ctx.timed_defense(s, x_adv, f"T_f={T_f} R={R}")
            cells.append({"T_f": T_f, "R": R, **proportion(out[:, 0] <= 0), "cost_vs_plain": cost})
    return {"inputs": "strongest per-sample attack on the undefended model (non-adaptive)", "cells": cells}


def masking_checks(ctx: "EvaluationContext") -> dict:
    """Job ``checks``: docs/design.md §6 sanity checks against gradient masking, on the first
    ``check_n`` images."""
    c = ctx.config
    n = min(c.check_n, ctx.n)
    idx = torch.arange(n)
    attack = strongest_intermediate(ctx)

    def run(label, surrogate, **kw) -> float:
        return float(ctx.isolated_pgd(label, surrogate, idx=idx, **kw)[:n].float().mean())

    eq11 = ctx.plain_surrogate(lambda xa: attack.logits(ctx.model, xa))
    ready, ready_2n = ctx.ready_made_surrogate(), ctx.ready_made_surrogate(2 * ctx.N)

    out: Dict[str, object] = {"n": n, "surrogate": attack.name}
    sweep = {f"{e * 255:g}/255": run(f"sweep eps {e * 255:g}", eq11, eps=e, step_size=e / 4) for e in c.sweep_eps}
    out["eps_sweep"] = sweep
    base = run("steps x1", eq11)
    double = run("steps x2", eq11, steps=2 * c.steps)
    out["steps"] = {"x1": base, "x2": double, "change": double - base}
    r1, r2 = run("ready-made N", ready), run("ready-made 2N", ready_2n)
    out["solver_steps"] = {"N": r1, "2N": r2, "change": r2 - r1}
    # input gradients of the attack losses, per sample
    grads = {}
    for label, logits_fn in [("undefended (Eq. 11)", lambda xa: attack.logits(ctx.model, xa))] + [
        (f"{d.name} (unroll)", lambda xa, d=d: defended_surrogate_logits(ctx.model, xa, d, attack, "unroll")[1])
        for d in ctx.defenses
    ]:

        def grad_l1(chunk, x, y, logits_fn=logits_fn):
            xa = x.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(F.cross_entropy(logits_fn(xa), y, reduction="sum"), xa)
            return g.abs().flatten(1).sum(1)

        norms = ctx.map(grad_l1, ctx.x, idx, f"input gradient, {label}", UNROLL_BATCH)
        grads[label] = {"zero_fraction": float((norms == 0).float().mean()), "median_l1": float(norms.median())}
    out["input_gradients"] = grads
    wb = white_box_worst_case(ctx.jobs)
    sq = ctx.jobs.get("square", {}).get("acc", {}).get("acc")
    out["verdicts"] = {
        "accuracy falls to ~0 at the largest eps": sweep[list(sweep)[-1]] <= 0.05,
        "doubling PGD steps changes accuracy by < 2 points": abs(double - base) < 0.02,
        "doubling solver steps changes accuracy by < 2 points": abs(r2 - r1) < 0.02,
        "input gradients are non-zero": all(v["zero_fraction"] == 0 for v in grads.values()),
    }
    if wb is not None and sq is not None:
        out["square_vs_white_box"] = {"square": sq, "white_box_worst": wb}
        out["verdicts"]["Square alone is not stronger than the white-box worst case"] = sq >= wb
    for d in ctx.defenses:
        rec = ctx.jobs.get(f"{d.name}/square")
        if rec:
            out["verdicts"][f"Square flips no {d.name} survivor of the white-box attacks"] = rec["flipped"] == 0
    return out


def white_box_worst_case(jobs: Dict[str, dict]) -> Optional[float]:
    """The accuracy under the white-box attacks on the undefended model alone: the share of images
    that clean inference and every attack job on the undefended model but Square's left correct
    (each attack with the inputs it returned); None where no such attack ran. The check of
    docs/design.md §6 compares Square with this, never with a worst case that includes Square."""
    strings = [rec["correct"] for name, rec in jobs.items() if "P" in rec and name != "square"]
    if not strings:
        return None
    clean = jobs["clean"]["correct"]
    robust = [c == "1" and all(s[i] == "1" for s in strings) for i, c in enumerate(clean)]
    return Proportion.of(sum(robust), len(robust)).value
