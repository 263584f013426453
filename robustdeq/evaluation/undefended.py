"""Attacks on the undefended model (the evaluation's first families): ready-made PGD, I-FGSM
(paper 2 Eq. 13-14), paper 1's intermediate-state grid (Eq. 11), APGD-CE / APGD-T and Square
(``pyautoattack``); each is scored at every state and transferred to every defense, and the
non-adaptive summary (job ``transfer``) reads the defenses after them (paper 1's protocol)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import Tensor

from ..attacks import IntermediateAttack, ifgsm_steps, margin
from ..stats import correct_string
from .adaptive import readout_logits, surrogate_logits
from .context import FamilyJobs, Job, proportion
from .surrogate import eq11_grid, strongest_intermediate

if TYPE_CHECKING:  # pragma: no cover
    from .context import EvaluationContext

#: ``make(ctx, job name) -> adversarial inputs for every image``
MakeAdversarial = Callable[["EvaluationContext", str], Tensor]

__all__ = [
    "undefended_jobs",
    "intermediate_jobs",
    "ready_made_adv",
    "ifgsm_adv",
    "apgd_adv",
    "square_adv",
    "autoattack_adv",
    "undefended_attack",
    "transfer_summary",
]


# ---- the families' jobs ----------------------------------------------------------------
def undefended_jobs(job: str, make_adv: MakeAdversarial) -> FamilyJobs:
    """The jobs of a family of one attack on the undefended model: job ``job``, made by ``make_adv``."""

    def jobs(ctx: "EvaluationContext") -> Iterator[Job]:
        yield job, lambda: undefended_attack(ctx, job, make_adv)

    return jobs


def intermediate_jobs(ctx: "EvaluationContext") -> Iterator[Job]:
    """Family ``intermediate``: one job per attack of the Eq. 11 grid."""
    for a in eq11_grid(ctx):
        yield a.name, lambda a=a: undefended_attack(ctx, a.name, intermediate_adv(a), attack=a)


# ---- the attacks -----------------------------------------------------------------------
def ready_made_adv(ctx: "EvaluationContext", name: str) -> Tensor:
    """Ready-made PGD (paper 1 Sec. 4): the phantom gradient of z[N]."""
    return ctx.tracked_pgd(name, ctx.ready_made_surrogate())


def ifgsm_adv(ctx: "EvaluationContext", name: str) -> Tensor:
    """I-FGSM of paper 2 (Eq. 13-14): no random start, step 1/255, n from Eq. 14."""
    return ctx.tracked_pgd(
        name, ctx.ready_made_surrogate(), steps=ifgsm_steps(ctx.config.eps), step_size=1 / 255, random_start=False
    )


def intermediate_adv(attack: IntermediateAttack) -> MakeAdversarial:
    """PGD through one Eq. 11 attack of the grid (paper 1 Eq. 11)."""

    def make(ctx: "EvaluationContext", name: str) -> Tensor:
        return ctx.tracked_pgd(name, ctx.plain_surrogate(lambda xa: attack.logits(ctx.model, xa)))

    return make


def apgd_adv(kind: str) -> MakeAdversarial:
    """APGD-CE / APGD-T of the reference AutoAttack code (``pyautoattack``), attacking the
    real early-state prediction through the strongest Eq. 11 gradient."""

    def make(ctx: "EvaluationContext", name: str) -> Tensor:
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

        attack = strongest_intermediate(ctx)

        def predict(xa):
            return surrogate_logits(ctx.model, xa, attack)

        c = ctx.config
        if kind == "ce":
            apgd = APGDAttack(predict, n_iter=c.apgd_iters, eps=c.eps, seed=c.seed, loss="ce", device=ctx.device)
        else:
            apgd = APGDAttack_targeted(
                predict, n_iter=c.apgd_iters, eps=c.eps, seed=c.seed, n_target_classes=c.apgd_targets,
                device=ctx.device,
            )  # fmt: skip

        def fn(chunk, x, y):
            return apgd.perturb(x, y)

        return ctx.map(fn, ctx.x, ctx.all_images(), name, resumable=True)

    return make


class _ReadoutThroughSurrogate(torch.nn.Module):
    """The real early-state prediction forward, the Eq. 11 surrogate's gradient backward, as a
    module (AutoAttack calls ``model(x)``): its bookkeeping, FAB's logit values and Square's
    queries see the real model, the gradient attacks follow the surrogate."""

    def __init__(self, ctx: "EvaluationContext"):
        super().__init__()
        self.model, self.attack = ctx.model, strongest_intermediate(ctx)

    def forward(self, x: Tensor) -> Tensor:
        return surrogate_logits(self.model, x, self.attack)


def autoattack_adv(ctx: "EvaluationContext", name: str) -> Tensor:
    """The reference AutoAttack, ``version='standard'`` (APGD-CE, APGD-T with 9 target classes,
    FAB-T with 9, Square with 5,000 queries: RobustBench's ``autoattack_acc``), through the
    strongest Eq. 11 gradient and judged by the real forward like every family here."""
    import logging

    from pyautoattack import AutoAttack

    c = ctx.config
    adversary = AutoAttack(_ReadoutThroughSurrogate(ctx), norm="Linf", eps=c.eps, version="standard",
                           seed=c.seed, device=ctx.device)  # fmt: skip
    logging.getLogger("auto-attack").setLevel(logging.WARNING)

    def fn(chunk, x, y):
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv

    return ctx.map(fn, ctx.x, ctx.all_images(), name, resumable=True)


def square_adv(ctx: "EvaluationContext", name: str) -> Tensor:
    """Square (black box, margin loss) on the real early-state prediction."""
    from pyautoattack.square import SquareAttack

    c = ctx.config

    def predict(xa):
        return readout_logits(ctx.model, xa)

    sq = SquareAttack(predict, n_queries=c.square_queries, eps=c.eps, seed=c.seed, device=ctx.device)

    def fn(chunk, x, y):
        with torch.no_grad():
            return sq.perturb(x, y)

    return ctx.map(fn, ctx.x, ctx.all_images(), name, resumable=True)


# ---- scoring and transfer ----------------------------------------------------------------
def undefended_attack(ctx: "EvaluationContext", name: str, make_adv: MakeAdversarial, attack=None) -> dict:
    """Make adversarial inputs on the undefended model, score them at every state, and
    transfer them to every defense where it is still robust."""
    x_adv = make_adv(ctx, name)
    k, N = ctx.k, ctx.N
    per_state = torch.zeros(N, dtype=torch.long)
    entropies = torch.zeros(N)
    h_clean = torch.tensor(ctx.jobs["clean"]["entropy_final"])
    m_all, h_all = [], []
    for chunk in ctx.chunks(ctx.all_images()):
        x, y = x_adv[chunk].to(ctx.device), ctx.y[chunk].to(ctx.device)
        with torch.no_grad():
            traj = ctx.model.trajectory(x)
            per_state += (traj.all_logits(1).argmax(-1) == y.view(-1, 1)).sum(0).cpu()
            entropies += traj.entropies(1).sum(0).cpu()
            m_all.append(margin(traj.logits(k), y).cpu())
            h_all.append(traj.entropy(-1).cpu())
    m, h_adv = torch.cat(m_all), torch.cat(h_all)
    ctx.best["none"].update(ctx.all_images(), x_adv, m)
    transfer = {}
    for d in ctx.defenses:
        idx = ctx.robust(d).nonzero().squeeze(1)
        before = len(idx)
        ctx.evaluate_candidates(d, x_adv, idx, f"{name} -> {d.name}")
        transfer[d.name] = {"attacked": before, "still_robust": int(ctx.robust(d).sum())}
    correct = m <= 0
    return {
        "attack": attack.name if attack is not None else name,
        "surrogate": None if attack is None else asdict(attack),
        "acc": proportion(correct),
        "correct": correct_string(correct.tolist()),
        "acc_per_state": (per_state.float() / ctx.n).tolist(),
        "mean_entropy_per_state": (entropies / ctx.n).tolist(),
        # paper 1 Eq. 12-13 at z* = z[N]: clean entropy lower than perturbed, and the mean gap
        "P": float((h_clean < h_adv).float().mean()),
        "delta_H": float((h_clean - h_adv).mean()),
        "max_perturbation": float((x_adv - ctx.x).abs().amax()),
        "worst_case_so_far": proportion(ctx.robust(None)),
        "transfer": transfer,
    }


def transfer_summary(ctx: "EvaluationContext") -> dict:
    """Job ``transfer``, the non-adaptive numbers: each defense under every attack made on the undefended model."""
    out = {"none": proportion(ctx.robust(None))}
    for d in ctx.defenses:
        out[d.name] = {**proportion(ctx.robust(d)), "correct": correct_string(ctx.robust(d).tolist())}
    out["none"]["correct"] = correct_string(ctx.robust(None).tolist())
    return out
