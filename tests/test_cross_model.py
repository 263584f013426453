"""Cross-model transfer (family ``cross-model``): another evaluation's strongest inputs count here."""

from __future__ import annotations

import pytest
import torch

from robustdeq.evaluation.suite import EvalConfig, Evaluator
from robustdeq.evaluation.transfer import WHITE_BOX_KEY, parse_source

from .test_shards import SHIPPED

BASE = dict(n=24, batch_size=12, steps=3, defenses=("2,2",), families=("pgd",))


def _run(out, **kw) -> Evaluator:
    ev = Evaluator(str(SHIPPED), str(out), EvalConfig(**{**BASE, **kw}), device="cpu", progress=False)
    ev.run()
    return ev


@pytest.fixture(scope="module")
def source(tmp_path_factory, cifar_test):
    return _run(tmp_path_factory.mktemp("source"))


def test_parse_source():
    assert parse_source("peer=/a/b") == ("peer", "/a/b")
    assert parse_source("/x/eval-peer") == ("eval-peer", "/x/eval-peer")
    with pytest.raises(ValueError):
        parse_source("=/a")


def test_transfer_counts_in_the_worst_case(source, tmp_path):
    # a fresh evaluation that runs no attack of its own receives the source's inputs: on the same
    # model they must fool it exactly where they fooled the source
    ev = _run(tmp_path / "b", families=("cross-model",), transfer_from=(f"src={source.out}",))
    rec = ev.results()["cross_model"]["src"]
    src_worst = source.best["none"].robust
    assert rec["none"]["acc"] == pytest.approx(float(src_worst.float().mean()))
    assert torch.equal(ev.best["none"].robust, src_worst)
    # the defense sees all the images, and its worst case can only fall
    assert rec["defense-T2-R2"]["n"] == 24
    assert ev.best["defense-T2-R2"].robust.sum() <= ev.jobs["clean"]["defenses"]["defense-T2-R2"]["acc"]["correct"]
    assert "cross-model/src" in ev.results()["per_sample"]
    # the receiver keeps its own white-box best apart, and passes that on (never the source's own inputs)
    assert WHITE_BOX_KEY in ev.best
    back = _run(tmp_path / "c", families=("cross-model",), transfer_from=(f"b={tmp_path / 'b'}",))
    assert back.jobs["cross-model/b"]["source"]["source_key"] == WHITE_BOX_KEY
    clean_correct = torch.tensor(ev.jobs["clean"]["margin"]) <= 0
    assert not torch.equal(src_worst, clean_correct)  # the source's attack fooled some image...
    assert torch.equal(back.best["none"].robust, clean_correct)  # ...which B does not pass on


def test_a_larger_evaluation_of_the_same_seed_is_a_source_for_its_prefix(source, tmp_path):
    ev = _run(tmp_path / "p", n=12, families=("cross-model",), transfer_from=(f"src={source.out}",))
    assert torch.equal(ev.best["none"].robust, source.best["none"].robust[:12])
    assert ev.jobs["cross-model/src"]["defenses"]["defense-T2-R2"]["n"] == 12


def test_transfer_source_must_match(source, tmp_path):
    with pytest.raises(ValueError, match="other images"):
        _run(tmp_path / "d", n=48, families=("cross-model",), transfer_from=(f"src={source.out}",))
    with pytest.raises(ValueError, match="other images"):
        _run(tmp_path / "s", seed=1, families=("cross-model",), transfer_from=(f"src={source.out}",))
    with pytest.raises(ValueError, match="eps"):
        _run(tmp_path / "e", eps=4 / 255, families=("cross-model",), transfer_from=(f"src={source.out}",))
    with pytest.raises(FileNotFoundError):
        _run(tmp_path / "f", families=("cross-model",), transfer_from=(f"x={tmp_path / 'nowhere'}",))
