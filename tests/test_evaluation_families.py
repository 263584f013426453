"""The registry of evaluation families (robustdeq/evaluation/families.py): what it declares and
the order a run takes the families in."""

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

from .test_evaluation import SHIPPED, TINY


def test_each_family_is_declared_once_and_the_lists_derive_from_it():
    assert FAMILIES == ("pgd", "ifgsm", "intermediate", "apgd-ce", "apgd-t", "square", "adaptive", "cross-model",
                        "radii", "analyses", "checks")  # fmt: skip
    assert SHARDABLE_FAMILIES == tuple(f for f in FAMILIES if f not in ("analyses", "checks"))
    assert SURROGATE_FAMILIES == {"intermediate", "apgd-ce", "apgd-t", "adaptive", "analyses"}
    assert [f for f in FAMILIES if REGISTRY[f].undefended] == list(FAMILIES[:6])


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
