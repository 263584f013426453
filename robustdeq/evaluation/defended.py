"""Adaptive attacks on the entropy-reduction defense (paper 1 Algorithm 1), family ``adaptive``:
BPDA, the full unroll with a smooth sign(), APGD-T through each, the gate-aware attack and
Square through the whole pipeline, each on the inputs that every earlier attack left correct."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch

from ..attacks import straight_through
from ..defense import DefenseSetting
from ..stats import correct_string
from .adaptive import DEFENDED_SQUARE_BATCH, UNROLL_BATCH, defended_logits, defended_surrogate_logits, gate_aware_loss
from .context import Job, proportion
from .measures import per_sample_ce
from .surrogate import strongest_intermediate

if TYPE_CHECKING:  # pragma: no cover
    from .context import EvaluationContext

__all__ = ["adaptive_jobs", "adaptive_pgd", "gate_aware", "adaptive_apgd_t", "defended_square"]


def adaptive_jobs(ctx: "EvaluationContext") -> Iterator[Job]:
    """Family ``adaptive``: per defense setting, the chain of attacks through it, in this order."""
    for d in ctx.defenses:
        yield f"{d.name}/bpda", lambda d=d: adaptive_pgd(ctx, d, "bpda")
        yield f"{d.name}/unroll", lambda d=d: adaptive_pgd(ctx, d, "unroll")
        for mode in ("bpda", "unroll"):
            yield f"{d.name}/apgd-t-{mode}", lambda d=d, mode=mode: adaptive_apgd_t(ctx, d, mode)
        if d.gated:
            yield f"{d.name}/gate-aware", lambda d=d: gate_aware(ctx, d)
        yield f"{d.name}/square", lambda d=d: defended_square(ctx, d)


def adaptive_pgd(ctx: "EvaluationContext", d: DefenseSetting, mode: str) -> dict:
    """PGD through BPDA or the full unroll, started from the setting's best input so far."""
    attack = strongest_intermediate(ctx)
    idx = ctx.robust(d).nonzero().squeeze(1)
    before = len(idx)
    if before:

        def surrogate(xa, y):
            real, surr = defended_surrogate_logits(ctx.model, xa, d, attack, mode)
            return real, per_sample_ce(surr, y)

        ctx.tracked_pgd(
            f"{d.name}/{mode}", surrogate, setting=d, idx=idx, steps=ctx.config.adaptive_steps,
            x_start=ctx.best[d.name].x, batch=UNROLL_BATCH if mode == "unroll" else None,
        )  # fmt: skip
    return _adaptive_record(ctx, d, mode, before, attack)


def gate_aware(ctx: "EvaluationContext", d: DefenseSetting) -> dict:
    """PGD that flips the label while keeping the gate's entropy under its threshold."""
    attack = strongest_intermediate(ctx)
    idx = ctx.robust(d).nonzero().squeeze(1)
    before = len(idx)
    if before:

        def surrogate(xa, y):
            return defended_logits(ctx.model, xa, d), gate_aware_loss(ctx.model, xa, y, d, attack)

        ctx.tracked_pgd(f"{d.name}/gate-aware", surrogate, setting=d, idx=idx, steps=ctx.config.adaptive_steps)
    return _adaptive_record(ctx, d, "gate-aware", before, attack)


def adaptive_apgd_t(ctx: "EvaluationContext", d: DefenseSetting, mode: str) -> dict:
    """Targeted APGD (pyautoattack's APGD-T, ``defended_apgd_targets`` target classes of
    ``defended_apgd_iters`` iterations each) through BPDA or the full unroll, on the inputs
    every earlier attack left correct; its candidates are scored by the real pipeline."""
    from pyautoattack.autopgd_base import APGDAttack_targeted

    c = ctx.config
    attack = strongest_intermediate(ctx)
    idx = ctx.robust(d).nonzero().squeeze(1)
    before = len(idx)
    if before:

        def predict(xa):
            if not (torch.is_grad_enabled() and xa.requires_grad):  # APGD's bookkeeping calls: the value only
                return defended_logits(ctx.model, xa, d)
            return straight_through(*defended_surrogate_logits(ctx.model, xa, d, attack, mode))

        apgd = APGDAttack_targeted(
            predict, n_iter=c.defended_apgd_iters, eps=c.eps, seed=c.seed,
            n_target_classes=c.defended_apgd_targets, device=ctx.device,
        )  # fmt: skip

        def fn(chunk, x, y):
            return apgd.perturb(x, y)

        desc, batch = f"{d.name}/apgd-t-{mode}", UNROLL_BATCH if mode == "unroll" else None
        _keep_strongest(ctx, d, ctx.map(fn, ctx.x, idx, desc, batch, resumable=True), idx, desc, batch)
    rec = _adaptive_record(ctx, d, f"apgd-t-{mode}", before, attack)
    rec["iterations"], rec["targets"] = c.defended_apgd_iters, c.defended_apgd_targets
    return rec


def defended_square(ctx: "EvaluationContext", d: DefenseSetting) -> dict:
    """Square (black box) through the whole defended pipeline, on every survivor (or the first
    ``defended_square_n``)."""
    from pyautoattack.square import SquareAttack

    c = ctx.config
    idx = ctx.robust(d).nonzero().squeeze(1)[: c.defended_square_n]  # None: every survivor
    before = int(ctx.robust(d).sum())
    if len(idx):

        def predict(xa):
            return defended_logits(ctx.model, xa, d)

        sq = SquareAttack(predict, n_queries=c.defended_square_queries, eps=c.eps, seed=c.seed, device=ctx.device)

        def fn(chunk, x, y):
            with torch.no_grad():
                return sq.perturb(x, y)

        desc, batch = f"{d.name}/square", DEFENDED_SQUARE_BATCH
        _keep_strongest(ctx, d, ctx.map(fn, ctx.x, idx, desc, batch, resumable=True), idx, desc, batch)
    rec = _adaptive_record(ctx, d, "square", before, None)
    rec["queried"] = len(idx)
    rec["queries"] = c.defended_square_queries
    return rec


def _keep_strongest(ctx: "EvaluationContext", d: DefenseSetting, adv, idx, desc: str, batch=None) -> None:
    """Score a step's adversarial inputs (one per image of ``idx``) by the real defended pipeline
    and keep each image's strongest input. The attack's batches stay free of side effects, so
    that an interrupted step resumes from its saved batches (``EvaluationContext.map``)."""
    x_cand = ctx.x.clone()
    x_cand[idx] = adv
    ctx.evaluate_candidates(d, x_cand, idx, desc, batch)


def _adaptive_record(ctx: "EvaluationContext", d: DefenseSetting, mode: str, before: int, attack) -> dict:
    robust = ctx.robust(d)
    return {
        "defense": d.name,
        "attack": mode,
        "surrogate": None if attack is None else attack.name,
        "attacked": before,
        "flipped": before - int(robust.sum()),
        "worst_case_so_far": {**proportion(robust), "correct": correct_string(robust.tolist())},
    }
