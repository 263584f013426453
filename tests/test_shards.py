"""Scale-out of the evaluation: ``--shard i/k`` in separate processes, merged, equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustdeq.evaluation.shards import Shard, ShardMergeError, merge_shards

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "training" / "shipped" / "deq-tiny-trades-rs" / "model.pt"

# every family a shard runs, at toy strength; 24 images in 2 blocks of 12, batches of 5 (so a
# block ends inside a batch) and APGD-T / Square through both defenses
ARGS = [
    "--checkpoint", str(SHIPPED), "--n", "24", "--batch-size", "5", "--block", "12", "--steps", "2",
    "--states", "2", "5", "--unrolls", "2", "--defense", "2,2", "--defense", "2,2,gated",
    "--apgd-iters", "3", "--apgd-targets", "1", "--square-queries", "10", "--defended-square-queries", "4",
    "--defended-apgd-iters", "2", "--defended-apgd-targets", "2", "--adaptive-steps", "2", "--select-n", "20",
    "--device", "cpu", "--threads", "1", "--no-progress",
]  # fmt: skip


def _evaluate(*extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "robustdeq", "evaluate", *ARGS, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def single_and_sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    # the two shards run as two processes at once, the single run afterwards
    shards = [_evaluate("--out", str(tmp / f"s{i}"), "--shard", f"{i}/2") for i in range(2)]
    logs = [_wait(p) for p in shards]
    single = _wait(_evaluate("--out", str(tmp / "single"), "--attacks", *_shard_families()))
    merge = [
        sys.executable,
        "-m",
        "robustdeq",
        "merge-shards",
        "--out",
        str(tmp / "merged"),
        str(tmp / "s1"),
        str(tmp / "s0"),
    ]
    merged = subprocess.run(merge, capture_output=True, text=True, timeout=600)
    assert merged.returncode == 0, merged.stderr[-3000:]
    return tmp, logs, single, merged.stdout


def _shard_families():
    from robustdeq.evaluation.suite import DEFAULT_SHARD_FAMILIES

    return list(DEFAULT_SHARD_FAMILIES)


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _without_timing(obj):
    """Drop what two runs can never share: wall-clock figures, dates and paths."""
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items()
                if k not in ("seconds", "finished", "cost_vs_plain", "date", "checkpoint", "evaluated")}  # fmt: skip
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def test_shard_bounds_are_whole_blocks():
    assert [Shard(i, 3).bounds(10_000, 1000) for i in range(3)] == [(0, 3000), (3000, 6000), (6000, 10_000)]
    assert [Shard(i, 2).bounds(25, 12) for i in range(2)] == [(0, 12), (12, 25)]  # 3 blocks, the last short
    assert Shard.parse(" 1 / 4 ") == Shard(1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError):
            Shard.parse(bad)
    with pytest.raises(ValueError, match="at most 2 shards"):
        Shard(0, 3).bounds(24, 12)


def test_sharded_run_equals_one_process(single_and_sharded):
    tmp, logs, _, _ = single_and_sharded
    assert "images 0..11" in logs[0] and "images 12..23" in logs[1]
    single, merged = _results(tmp / "single"), _results(tmp / "merged")
    # per-sample results, image for image, for every attack and every setting
    assert merged["per_sample"] == single["per_sample"]
    assert len(single["per_sample"]["clean"]) == 24
    assert {"attack/apgd-t", "attack/square", "attack/eq11-i5-k2-l0.5", "worst/gated-T2-R2"} <= set(
        single["per_sample"]
    )
    # the card and every count, interval and mean (means to float rounding)
    card_single = json.loads((tmp / "single" / "robustness_card.json").read_text())
    card_merged = json.loads((tmp / "merged" / "robustness_card.json").read_text())
    assert _without_timing(card_merged) == _without_timing(card_single)
    assert _without_timing(merged["settings"]) == _without_timing(single["settings"])
    assert _without_timing(merged["paper_tables"]["radii"]) == _without_timing(single["paper_tables"]["radii"])
    for a, b in zip(merged["attacks"], single["attacks"]):
        assert (a["name"], a["acc"]) == (b["name"], b["acc"])
        # means are float32 sums in the suite: equal to float32 rounding
        assert a["acc_per_state"] == pytest.approx(b["acc_per_state"], abs=1e-6)
        assert a["P"] == pytest.approx(b["P"], abs=1e-6)
    # the defended worst case went through APGD-T (BPDA and unroll) and Square on the survivors
    chain = [c["attack"] for c in next(s for s in single["settings"] if s["name"] == "defense-T2-R2")["chain"]]
    assert chain == ["bpda", "unroll", "apgd-t-bpda", "apgd-t-unroll", "square"]
    assert single["surrogate_choice"]["val_n"] == 20


def test_merged_folder_resumes_as_an_ordinary_evaluation(single_and_sharded):
    tmp, _, _, merge_log = single_and_sharded
    assert "worst case" in merge_log
    state = json.loads((tmp / "merged" / "state.json").read_text())
    assert state["identity"]["shard"] is None
    # the same settings resume the merged folder without recomputing anything
    out = _wait(_evaluate("--out", str(tmp / "merged"), "--attacks", *_shard_families()))
    assert _results(tmp / "merged")["per_sample"] == _results(tmp / "single")["per_sample"]
    assert "worst case" in out


def test_merge_refuses_incomplete_or_mismatched_shards(single_and_sharded, tmp_path):
    tmp = single_and_sharded[0]
    with pytest.raises(ShardMergeError, match="exactly once"):
        merge_shards([tmp / "s0"], tmp_path / "m1")
    with pytest.raises(ShardMergeError, match="not a shard"):
        merge_shards([tmp / "s0", tmp / "single"], tmp_path / "m2")
    r = subprocess.run([sys.executable, "-m", "robustdeq", "merge-shards", "--out", str(tmp_path / "m3"),
                        str(tmp / "s0"), str(tmp / "s0")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "exactly once" in r.stderr


def test_shard_refuses_whole_subset_families(tmp_path):
    r = subprocess.run([sys.executable, "-m", "robustdeq", "evaluate", *ARGS, "--out", str(tmp_path / "x"),
                        "--shard", "0/2", "--attacks", "pgd", "checks"], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode != 0 and "run them in one process" in r.stderr
