"""``robustdeq bench``: structure of the results, the floor, stage markers, the gate on
perturbed inputs, ONNX rows, trials that fail, and the files written. No timing assertions."""

from __future__ import annotations

import json
import time

import pytest
import torch

from robustdeq import create_model
from robustdeq.bench.subject import cifar_test_images, default_checkpoint, load_subject
from robustdeq.bench.timing import operation_floor
from robustdeq.cli import build_parser, main
from robustdeq.defense import entropy_reduction
from robustdeq.stages import STAGES, stage, timing_stages

TINY = ["--batch-sizes", "2", "--T_f", "2", "--R", "0", "1", "--repeats", "1", "--gate-n", "4"]


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory):
    """The served default checkpoint (deq-small, with its robustness card) on a tiny grid."""
    out = tmp_path_factory.mktemp("bench") / "deq-small.json"
    assert main(["bench", *TINY, "--stages", "2,1", "2,1,gated", "--out", str(out)]) == 0
    return json.loads(out.read_text()), out


@pytest.fixture(scope="module")
def lyadeq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "lyadeq.json"
    assert main(["bench", "--model", "lyadeq-tiny", *TINY, "--stages", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_grid_rows_cover_every_setting_with_a_positive_floor(shipped_run):
    r, _ = shipped_run
    assert [p["batch_size"] for p in r["plain"]] == [2]
    assert [(d["T_f"], d["R"]) for d in r["defense"]] == [(2, 0), (2, 1)]
    for d in r["defense"]:
        assert d["floor_s"] > 0 and d["t_f_s"] > 0 and d["t_step_s"] > 0
        assert d["floor_s"] == pytest.approx(operation_floor(r["N"], d["T_f"], d["R"], d["t_f_s"], d["t_step_s"]))
        assert d["ratio_to_floor"] == pytest.approx(d["seconds"] / d["floor_s"])
        assert d["slowdown_vs_plain"] == pytest.approx(d["seconds"] / r["plain"][0]["seconds"])


def test_operation_floor_counts_interventions_with_integer_division():
    assert operation_floor(8, 2, 10, t_f=1.0, t_step=2.0) == 8 + 4 * 10 * 2
    assert operation_floor(8, 3, 1, t_f=1.0, t_step=2.0) == 8 + 2 * 2  # interventions after steps 3 and 6
    assert operation_floor(8, 1, 0, t_f=1.0, t_step=2.0) == 8


def test_stage_markers_sit_where_algorithm_1_spends_its_time():
    torch.manual_seed(0)
    model = create_model("deq-tiny").eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with stage("head"):  # no timer active: a no-op
        pass
    with timing_stages() as timer:
        res = entropy_reduction(model, x, T_f=2, R=3, with_plain=False)
        res.trajectory.logits(model.readout_state)
    N = model.n_steps
    assert timer.calls["defense"] == N // 2  # one intervention every T_f steps
    assert timer.calls["stem"] == 1  # re-injections inside the defense count as defense
    assert timer.calls["head"] == 1 and timer.calls["solve"] == 1 + 2 * N
    assert set(timer.seconds) == set(STAGES) and all(v > 0 for v in timer.seconds.values())


def test_stage_rows_cover_the_call(shipped_run):
    r, _ = shipped_run
    assert [s["setting"] for s in r["stages"]] == ["plain", "defense-T2-R1", "gated-T2-R1 (clean)"]
    for s in r["stages"]:
        marked = sum(s[k] for k in STAGES)
        assert 0.5 * s["total"] <= marked <= 1.1 * s["total"], s
        assert s["stem"] > 0 and s["solve"] > 0 and s["head"] > 0
    plain, defended = r["stages"][0], r["stages"][1]
    assert plain["defense"] == 0 and defended["defense"] > 0


def test_gate_is_measured_on_clean_and_actually_perturbed_inputs(shipped_run):
    g = shipped_run[0]["gated"]
    assert g["setting"]["gated"] and g["setting"]["T_f"] == 2 and g["setting"]["R"] == 10
    assert g["setting"]["threshold"] > 0 and g["setting"]["gate_state"] == shipped_run[0]["readout_state"]
    for inputs in ("clean", "pgd"):
        t = g[inputs]
        assert t["n"] == 4 and 0 <= t["triggered"] <= t["n"]
        assert 0.0 <= t["ci95"][0] <= t["trigger_rate"] <= t["ci95"][1] <= 1.0
    linf = g["pgd"]["perturbation_linf"]
    assert 0 < linf["min"] <= linf["max"] <= g["pgd"]["eps"] + 1e-6
    assert all(v > 0 for v in g["timing"].values())
    # the card's adaptive rows, not its non-adaptive (transferred) row of the same setting
    card = g["card_robust"]
    assert card["gated"]["name"] == "gated-T2-R10" and card["ungated"]["kind"].startswith("adaptive")
    assert card["points"] == pytest.approx(100 * (card["gated"]["acc"] - card["ungated"]["acc"]))


def test_onnx_rows_and_targets(shipped_run, lyadeq_run):
    r, _ = shipped_run
    assert [o["batch_size"] for o in r["onnx"]] == [2]
    assert r["onnx"][0]["speedup_vs_eager"] > 0 and "skipped" not in r["onnx"][0]
    assert {t["id"]: t["status"] for t in r["targets"]}["a"] == "SKIP"  # batch 64 not measured
    assert [t["id"] for t in r["targets"]] == ["a", "b", "c"]
    assert all(t["status"] in ("PASS", "FAIL", "SKIP") for t in r["targets"])
    assert "cannot be exported" in lyadeq_run["onnx"][0]["skipped"]
    assert "no robustness card" in lyadeq_run["gated"]["skipped"]
    assert {t["id"]: t["status"] for t in lyadeq_run["targets"]} == {"a": "SKIP", "b": "SKIP", "c": "SKIP"}


def test_markdown_and_plots_are_written(shipped_run):
    r, out = shipped_run
    md = out.with_suffix(".md").read_text()
    for heading in ("| T_f | R |", "## Where the time goes", "## Entropy-gated defense", "## Targets"):
        assert heading in md
    assert set(r["plots"]) == {"throughput vs R", "robust accuracy vs cost"}
    for name in r["plots"].values():
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md


def test_labels_of_settings_at_nearly_equal_cost_do_not_overlap():
    """T2-R5 and T1-R5 of deq-small sit at ~20.4x and ~20.6x with equal accuracy: their labels stack."""
    from robustdeq.bench.plots import _free_label_offset

    placed: list = []
    first = _free_label_offset(placed, 1.310, 33.0)
    second = _free_label_offset(placed, 1.314, 33.0)
    third = _free_label_offset(placed, 1.312, 33.0)
    assert len({first, second, third}) == 3
    assert _free_label_offset(placed, 1.7, 33.0) == first  # far enough away: the usual place
    assert _free_label_offset(placed, 1.312, 30.0) == first  # same cost, another accuracy


def test_failing_and_slow_trials_are_reported_not_raised(monkeypatch):
    from robustdeq.bench import trials

    def broken(model):
        raise RuntimeError("no backend\nsecond line")

    def sleepy(model):
        return lambda x: time.sleep(5)

    monkeypatch.setattr(trials, "TRIALS", {"channels-last": trials.channels_last, "broken": broken, "slow": sleepy})
    torch.manual_seed(0)
    model = create_model("deq-tiny").eval()
    rows = trials.run_trials(model, [torch.rand(2, 3, 32, 32)], repeats=1, timeout_s=0.3, tick=lambda: None)
    by_name = {row["trial"]: row for row in rows}
    assert by_name["channels-last"]["speedup_vs_eager"] > 0
    assert by_name["channels-last"]["max_abs_logit_diff"] < 1e-4
    assert by_name["broken"]["error"] == "RuntimeError: no backend"
    assert by_name["slow"]["error"].startswith("TimeoutError")


def test_default_checkpoint_and_card_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subject = load_subject(None, None, None, 2, None)
    assert subject.checkpoint == default_checkpoint() and subject.card["model"] == "deq-small"
    assert subject.images.shape == (2, 3, 32, 32)


def test_random_noise_only_when_no_data_is_found(monkeypatch):
    import robustdeq.data

    def missing(*args, **kwargs):
        raise FileNotFoundError("no archive here")

    monkeypatch.setattr(robustdeq.data, "load_cifar10", missing)
    images, note = cifar_test_images(3, source=None)
    assert images.shape == (3, 3, 32, 32) and note.startswith("RANDOM NOISE") and "no archive here" in note
    with pytest.raises(FileNotFoundError):
        cifar_test_images(3, source="/nonexistent/cifar.tar.gz")


def test_help_explains_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    bench = sub.choices["bench"]
    for action in bench._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--batch-size", "4", "--batch-sizes", "1", "8"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--model", "deq-tiny", "--checkpoint", "x.pt"])
