"""The registry of evaluation families (robustdeq/evaluation/families.py): what it declares, the
order a run takes the families in, and the gradient-masking check that compares Square with them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from robustdeq.evaluation.families import (
    FAMILIES,
    REGISTRY,
    SHARDABLE_FAMILIES,
    SURROGATE_FAMILIES,
    single_job,
)
from robustdeq.evaluation.suite import EvalConfig, Evaluator
from robustdeq.evaluation.undefended import undefended_jobs

from .test_evaluation import SHIPPED, TINY

SQUARE_CHECK = "Square alone is not stronger than the white-box worst case"


def test_each_family_is_declared_once_and_the_lists_derive_from_it():
    assert FAMILIES == ("pgd", "ifgsm", "intermediate", "apgd-ce", "apgd-t", "square", "autoattack", "adaptive",
                        "cross-model", "radii", "analyses", "checks")  # fmt: skip
    assert SHARDABLE_FAMILIES == tuple(f for f in FAMILIES if f not in ("analyses", "checks"))
    assert SURROGATE_FAMILIES == {"intermediate", "apgd-ce", "apgd-t", "autoattack", "adaptive", "analyses"}
    assert [f for f in FAMILIES if REGISTRY[f].undefended] == list(FAMILIES[:7])


@pytest.mark.parametrize(
    "families, order",
    [
        # the surrogate is chosen before the first family that needs it, at the latest when the
        # undefended families are done; the non-adaptive summary closes the undefended families
        (("pgd", "analyses"), ["clean", "pgd", "surrogate", "transfer", "analyses"]),
        (("checks", "square", "apgd-ce"), ["clean", "surrogate", "apgd-ce", "square", "transfer", "checks"]),
    ],
)
def test_a_run_takes_the_families_in_registry_order(tmp_path, monkeypatch, families, order):
    for name in families:  # each selected family: one job named after it that records nothing
        monkeypatch.setitem(REGISTRY, name, replace(REGISTRY[name], jobs=single_job(name, lambda ctx: {})))
    config = EvalConfig(**{**TINY, "n": 4, "defenses": (), "families": families})
    ev = Evaluator(str(SHIPPED), str(tmp_path), config, device="cpu", progress=False)
    ev.run()
    assert list(ev.jobs) == order


def test_a_square_stronger_than_the_gradient_attacks_fails_the_masking_check(tmp_path, monkeypatch):
    """Issue 30 §4.1: the check must compare Square with the white-box attacks without Square (the
    worst case over every attack includes Square, so Square could never be stronger than it)."""

    def masked(ctx, name):  # a gradient attack that finds nothing, as under a masked gradient
        return ctx.x.clone()

    monkeypatch.setitem(REGISTRY, "pgd", replace(REGISTRY["pgd"], jobs=undefended_jobs("pgd-ready", masked)))
    config = EvalConfig(**{**TINY, "defenses": (), "families": ("pgd", "square", "checks")})
    ev = Evaluator(str(SHIPPED), str(tmp_path), config, device="cpu", progress=False)
    checks = ev.run()["checks"]
    clean, square = ev.jobs["clean"]["acc"]["acc"], ev.jobs["square"]["acc"]["acc"]
    assert ev.jobs["pgd-ready"]["acc"]["acc"] == clean  # the rigged attack broke nothing
    assert square < clean  # Square broke images
    assert checks["square_vs_white_box"] == {"square": square, "white_box_worst": clean}
    assert checks["verdicts"][SQUARE_CHECK] is False


class _Interrupted(Exception):
    """Stands for the kill of a long run (a time limit, Ctrl-C) in the middle of a job."""


def test_an_interrupted_long_job_resumes_at_its_next_batch(tmp_path, monkeypatch):
    """A job of hours (Square here; AutoAttack, APGD and the defended chain's APGD-T and Square
    alike) keeps its finished batches: stopped during its second batch, the rerun computes only
    the batches that were missing and ends with exactly what an uninterrupted run computes."""
    from pyautoattack.square import SquareAttack

    from robustdeq.evaluation.job_store import PARTIAL_FILE

    config = EvalConfig(**{**TINY, "n": 12, "batch_size": 4, "square_queries": 20, "defenses": (),
                           "families": ("square",)})  # fmt: skip
    whole = Evaluator(str(SHIPPED), str(tmp_path / "whole"), config, device="cpu", progress=False).run()

    perturb, calls = SquareAttack.perturb, []

    def counted(self, x, y=None):
        calls.append(len(x))
        if stop_at and len(calls) == stop_at:
            raise _Interrupted
        return perturb(self, x, y)

    monkeypatch.setattr(SquareAttack, "perturb", counted)
    out, stop_at = tmp_path / "stopped", 2
    with pytest.raises(_Interrupted):
        Evaluator(str(SHIPPED), str(out), config, device="cpu", progress=False).run()
    assert (out / PARTIAL_FILE).is_file()  # the first batch of Square is kept
    calls.clear()
    stop_at = 0
    resumed = Evaluator(str(SHIPPED), str(out), config, device="cpu", progress=False).run()
    assert calls == [4, 4]  # batches 2 and 3 of 3
    assert resumed["per_sample"] == whole["per_sample"]
    assert not (out / PARTIAL_FILE).exists()  # gone with the finished job
