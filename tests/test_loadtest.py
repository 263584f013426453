"""The load test: exact statistics, the answer checks, and short real Locust runs against a real
TorchServe (``robustdeq loadtest --scenario smoke`` end to end, and a run whose expected labels are
wrong, which must count every such request as a failure), and the saturation ramp on both runtimes
and both protocols side by side (``--also``)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from robustdeq.data import PROJECT_ROOT
from robustdeq.loadtest.samples import SampleRecorder, Samples, nearest_rank
from robustdeq.loadtest.traffic import (
    ENV,
    PLAIN,
    DefendedSetting,
    PayloadSet,
    Stage,
    build_payloads,
    check_answer,
    check_oip_answer,
    oip_request,
)
from robustdeq.serving.archive import SHIPPED

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")


def test_nearest_rank_percentiles_are_exact():
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert (nearest_rank(values, 50), nearest_rank(values, 99), nearest_rank(values, 100)) == (50, 99, 100)
    assert nearest_rank([7.0], 99) == 7.0 and nearest_rank(values, 0.5) == 1
    assert nearest_rank([], 50) != nearest_rank([], 50)  # NaN
    with pytest.raises(ValueError):
        nearest_rank(values, 0)


def _answer(index=3, mode="off", ran=False, **defense):
    return json.dumps(
        {
            "index": index,
            "label": "cat",
            "top_k": [{"index": index, "label": "cat", "probability": 0.9}],
            "defense": {"mode": mode, "ran": ran, **defense},
        }
    )


def test_answer_check_accepts_only_the_right_label_shape_and_defense():
    t2r10 = DefendedSetting(2, 10)
    assert check_answer(200, _answer(), 3) is None
    assert check_answer(200, _answer(mode="on", ran=True, T_f=2, R=10), 3, t2r10) is None
    assert "where the library says 5" in check_answer(200, _answer(), 5)
    assert check_answer(503, '{"code": 503}', 3).startswith("HTTP 503")
    assert "not JSON" in check_answer(200, "<html>", 3)
    assert "'index'" in check_answer(200, json.dumps({"label": "cat"}), 3)
    assert "'index'" in check_answer(200, _answer().replace('"index": 3,', '"index": true,', 1), 3)
    assert "plain request was defended" in check_answer(200, _answer(mode="on", ran=True), 3)
    assert "not the requested" in check_answer(200, _answer(mode="on", ran=True, T_f=2, R=5), 3, t2r10)
    assert "not the requested" in check_answer(200, _answer(mode="on", ran=False, T_f=2, R=10), 3, t2r10)


def _oip_answer(index=3, defense="off", ran=False, **params) -> str:
    outputs = [{"name": "index", "datatype": "INT32", "shape": [1], "data": [index]},
               {"name": "defense_ran", "datatype": "BOOL", "shape": [1], "data": [ran]}]  # fmt: skip
    return json.dumps({"model_name": "m", "id": "1", "parameters": {"defense": defense, **params}, "outputs": outputs})


def test_the_oip_answer_check_and_request():
    t2r10 = DefendedSetting(2, 10)
    assert check_oip_answer(200, _oip_answer(), 3) is None
    assert check_oip_answer(200, _oip_answer(defense="on", ran=True, T_f=2, R=10), 3, t2r10) is None
    assert "where the library says 5" in check_oip_answer(200, _oip_answer(), 5)
    assert check_oip_answer(400, '{"error": "inputs[0]"}', 3).startswith("HTTP 400")
    assert "not an OIP v2 answer" in check_oip_answer(200, '{"predictions": []}', 3)
    assert "plain request was defended" in check_oip_answer(200, _oip_answer(defense="on", ran=True), 3)
    assert "not the requested" in check_oip_answer(200, _oip_answer(defense="on", ran=True, T_f=2, R=5), 3, t2r10)
    assert "not the requested" in check_oip_answer(200, _oip_answer(defense="on", ran=False, T_f=2, R=10), 3, t2r10)
    body = oip_request("aGVsbG8=", t2r10)
    assert body["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]
    assert body["parameters"] == {"defense": "on", "T_f": 2, "R": 10} and "parameters" not in oip_request("x")


def test_servers_name_a_runtime_and_a_protocol_it_speaks():
    from robustdeq.loadtest.runner import parse_server

    assert parse_server("torchserve") == ("torchserve", "own") and parse_server("kserve") == ("kserve", "oip")
    assert parse_server("torchserve:oip") == ("torchserve", "oip")
    with pytest.raises(ValueError, match="does not speak 'own'"):
        parse_server("kserve:own")
    with pytest.raises(ValueError, match="unknown runtime 'triton'"):
        parse_server("triton:oip")


def test_stages_and_settings_validate():
    assert [s.key for s in DefendedSetting.parse_list("2:10, 1:5")] == ["T2R10", "T1R5"]
    for bad in ("2-10", "0:5", "", "2:x"):
        with pytest.raises(ValueError):
            DefendedSetting.parse_list(bad)
    stages = [Stage(10, 4, "PlainUser", 40.0), Stage(5, 2, "PlainUser", None, "DefendedUser", 3, 6.0)]
    assert Stage.load_list(Stage.dump(stages)) == stages and stages[0].per_user_rate("PlainUser") == 10.0
    assert stages[1].classes == {"PlainUser": 2, "DefendedUser": 3} and stages[1].total_users == 5
    assert stages[1].per_user_rate("DefendedUser") == 2.0 and stages[1].per_user_rate("PlainUser") is None
    with pytest.raises(ValueError):
        Stage(10, 2, also_user="DefendedUser")
    with pytest.raises(ValueError):
        Stage(10, 0)
    with pytest.raises(ValueError):
        Stage(10, 2, rate=-1.0)


def test_samples_give_per_stage_windows_throughput_and_failures(tmp_path):
    rec = SampleRecorder()
    rec.start_stage(0, 1000.0)
    for i in range(100):  # 10 s of stage 0: 10 requests/s, 1..100 ms
        rec.on_request("plain", 1000.0 + i * 0.1, float(i + 1))
    rec.start_stage(1, 1010.0)
    for i in range(40):  # stage 1: 20 requests/s, every 4th one failed
        rec.on_request("plain", 1010.0 + i * 0.05, 5.0, None if i % 4 else RuntimeError("HTTP 503"))
    samples = Samples(rec.save(tmp_path / "s.csv"))
    first = samples.stats("plain", stage=0)
    assert (first.requests, first.failures, first.p50_ms, first.p99_ms) == (100, 0, 50.0, 99.0)
    assert first.throughput == pytest.approx(10.0)
    settled = samples.stats("plain", stage=0, settle=5.0)
    assert settled.requests == 50 and settled.p50_ms == 75.0
    second = samples.stats("plain", stage=1)
    assert (second.requests, second.failures) == (40, 10) and second.throughput == pytest.approx(30 / 1.955, rel=0.01)
    assert samples.failure_reasons() == {"HTTP 503": 10}


def test_latency_parts_split_a_request_by_the_servers_clocks():
    from robustdeq.loadtest.server_clocks import latency_parts

    m = "deq-tiny"
    before = {
        "ts_inference_requests_total": {m: 100.0, "other": 7.0},
        "ts_inference_latency_microseconds": {m: 1e6},
        "ts_queue_latency_microseconds": {m: 2e5},
        "robustdeq_handler_latency_seconds_sum": {m: 0.5},
        "robustdeq_handler_latency_seconds_count": {m: 100.0},
        "robustdeq_batch_size_sum": {m: 100.0},
        "robustdeq_batch_size_count": {m: 25.0},
    }
    # 400 more requests in 50 batches of 8 over 2 s: 20 ms in the frontend each, 5 ms of it
    # queued; the handler took 9 ms per batch
    after = {
        "ts_inference_requests_total": {m: 500.0, "other": 9.0},
        "ts_inference_latency_microseconds": {m: 1e6 + 400 * 20e3},
        "ts_queue_latency_microseconds": {m: 2e5 + 400 * 5e3},
        "robustdeq_handler_latency_seconds_sum": {m: 0.5 + 400 * 9e-3},
        "robustdeq_handler_latency_seconds_count": {m: 500.0},
        "robustdeq_batch_size_sum": {m: 500.0},
        "robustdeq_batch_size_count": {m: 75.0},
    }
    p = latency_parts(before, after, m, client_mean_ms=23.0, wall_s=2.0)
    assert p["requests"] == 400 and p["mean_batch_size"] == 8.0
    assert p["frontend_ms"] == pytest.approx(20.0) and p["queue_ms"] == pytest.approx(5.0)
    assert p["outside_frontend_ms"] == pytest.approx(3.0) and p["worker_round_trip_ms"] == pytest.approx(15.0)
    assert p["handler_ms"] == pytest.approx(9.0) and p["ipc_and_plumbing_ms"] == pytest.approx(6.0)
    assert p["worker_busy"] == pytest.approx(50 * 15e-3 / 2.0) and p["handler_busy"] == pytest.approx(50 * 9e-3 / 2.0)
    two = latency_parts(before, after, m, client_mean_ms=23.0, wall_s=2.0, workers=2)  # busy: a mean per worker
    assert two["worker_busy"] == pytest.approx(p["worker_busy"] / 2) and two["handler_ms"] == p["handler_ms"]
    with pytest.raises(RuntimeError, match="no requests"):
        latency_parts(before, before, m, 1.0, 1.0)


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    path = tmp_path_factory.mktemp("payloads") / "payloads.json"
    built = build_payloads(SHIPPED["deq-tiny"], "deq-tiny", n=12, settings=[DefendedSetting(2, 10)])
    assert len(built) == 12 and set(built.expected) == {PLAIN, "T2R10"}
    assert PayloadSet.load(built.save(path)).expected == built.expected
    return built


def test_a_model_outside_the_shipped_set_needs_its_checkpoint(tmp_path, capsys):
    from robustdeq.cli import main

    assert main(["loadtest", "--model", "mine", "--out", str(tmp_path)]) == 2
    assert "give its --checkpoint" in capsys.readouterr().err
    assert main(["loadtest", "--model", "mine", "--checkpoint", str(tmp_path / "no.pt"), "--out", str(tmp_path)]) == 2
    assert "no.pt does not exist" in capsys.readouterr().err


@needs_java
def test_smoke_run_end_to_end_has_no_failures_and_exact_counts(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, "-m", "robustdeq", "loadtest", "--scenario", "smoke", "--stage-seconds", "4",
         "--payloads", "16", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["smoke"]["overall"]}
    assert set(rows) == {PLAIN, "defended T_f=2 R=10"}, rows
    assert all(r["failures"] == 0 and r["requests"] > 0 for r in rows.values()), results["smoke"]
    # the last stage runs plain and defended users side by side (class weights = user counts)
    assert {r["name"] for r in results["smoke"]["stages"] if r["stage"] == 2} == set(rows)
    assert rows[PLAIN]["p50_ms"] <= rows[PLAIN]["p95_ms"] <= rows[PLAIN]["p99_ms"] <= rows[PLAIN]["max_ms"]
    # every request Locust counted is in our samples (a few more may finish during shutdown,
    # after Locust's last CSV write)
    with open(out / "smoke_stats.csv", newline="") as fh:
        locust_total = next(int(r["Request Count"]) for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    recorded = sum(r["requests"] for r in rows.values())
    assert recorded == results["smoke"]["requests"] and locust_total <= recorded <= locust_total + 4
    # the machine's load is stated (issue 31 §4): the test's own cores are part of the busy ones
    machine = results["machine"]
    assert 0 < machine["test_cores"] and machine["others_cores"] >= 0 and machine["cpus"] == os.cpu_count()
    assert "- machine load: 1-minute load average" in (out / "report.md").read_text()
    assert (out / "smoke.html").stat().st_size > 1000 and "## Smoke" in (out / "report.md").read_text()
    # the server's clocks, read from the real metrics port around one more plain stage
    b = results["smoke"]["breakdown"]
    assert b["requests"] > 0 and b["mean_batch_size"] >= 1, b
    assert 0 < b["queue_ms"] < b["frontend_ms"] < b["client_ms"], b
    assert 0 < b["handler_ms"] < b["worker_round_trip_ms"] and b["ipc_and_plumbing_ms"] > 0, b
    assert 0 < b["handler_busy"] < b["worker_busy"] <= 1.05, b
    assert "Where a request's time goes" in (out / "report.md").read_text()
    assert not (out / "serve" / "server.json").exists() or "pid" in (out / "serve" / "server.json").read_text()


@needs_java
def test_a_wrong_label_counts_as_a_failed_request(tmp_path, payloads):
    from robustdeq.loadtest.runner import LoadTestRun, run_locust
    from robustdeq.serving.runfolder import read_keys
    from robustdeq.serving.server import Ports, start_server, stop_server

    wrong = replace(payloads, expected={k: [(i + 1) % 10 for i in v] for k, v in payloads.expected.items()})
    run_dir = tmp_path / "serve"
    info = start_server(run_dir, ["deq-tiny"], PROJECT_ROOT / "model_store", Ports.free(), log=lambda *_: None)
    try:
        run = LoadTestRun(tmp_path, "deq-tiny", info.inference_url, read_keys(run_dir)["inference"],
                          wrong.save(tmp_path / "wrong.json"), log=lambda *_: None)  # fmt: skip
        samples = run_locust(run, "wrong", [Stage(3, 2, "PlainUser")])
    finally:
        stop_server(run_dir, log=lambda *_: None)
    stats = samples.stats(PLAIN)
    assert stats.requests > 0 and stats.failures == stats.requests
    assert all("where the library says" in why for why in samples.failure_reasons())


def test_the_locustfile_does_not_load_torch():
    """Locust runs beside the server on the same cores: its processes import the light modules
    only (with torch, 0.5 GB and 2 s of start-up each), yet still name the served default model."""
    from robustdeq.serving.server import DEFAULT_MODELS

    code = "import sys; sys.path.insert(0, 'loadtest'); import locustfile; "
    code += "print('torch' in sys.modules, locustfile.MODEL)"
    env = {k: v for k, v in os.environ.items() if k != ENV["model"]}
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.split() == ["False", DEFAULT_MODELS[0]]


def test_the_report_warns_when_the_machine_was_not_idle():
    from robustdeq.loadtest.machine import IDLE_OTHERS_CORES, MachineLoad, load_lines

    idle = {"load_1min_before": 0.1, "machine_busy_cores": 1.9, "test_cores": 1.85, "others_cores": 0.05, "cpus": 2}
    assert len(load_lines(idle)) == 1 and "warning" not in load_lines(idle)[0]
    busy = {**idle, "others_cores": IDLE_OTHERS_CORES + 0.5}
    assert "the machine was not idle" in load_lines(busy)[-1]
    loaded_before = {**idle, "load_1min_before": 3.0}
    assert "the machine was not idle" in load_lines(loaded_before)[-1]
    assert load_lines(None) == []
    # a real measurement: this process spinning is the test's own work, not another's
    import time

    probe = MachineLoad()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    measured = probe.finish(server_seconds=0.0)
    assert measured["test_cores"] > 0.3 and measured["machine_busy_cores"] >= measured["test_cores"] - 0.2


@needs_java
def test_both_runtimes_and_protocols_side_by_side(tmp_path):
    """The saturation ramp on TorchServe (own body), then on TorchServe and the KServe runtime with
    OIP v2 (``--also``): every answer checked, no failure, one row per server in the report."""
    from robustdeq.serving.kserve_runtime import runtime_python

    if runtime_python() is None:
        pytest.skip("no Python with kserve (the KServe environment, pyproject extra 'kserve')")
    out = tmp_path / "sbs"
    proc = subprocess.run(
        [sys.executable, "-m", "robustdeq", "loadtest", "--scenario", "saturation", "--users", "1", "4",
         "--stage-seconds", "5", "--settle", "1", "--payloads", "16", "--out", str(out),
         "--also", "torchserve:oip", "kserve:oip"],
        capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["side_by_side"]
    assert [(r["runtime"], r["protocol"]) for r in rows] == [("torchserve", "own"), ("torchserve", "oip"),
                                                             ("kserve", "oip")]  # fmt: skip
    for row in rows:
        assert row["failures"] == 0 and row["saturated_throughput"] > 0 and row["ratio_to_in_process"] > 0, row
    assert rows[2]["mean_batch_size"] >= 1  # the runtime's own robustdeq_batch_size, scraped from its /metrics
    report = (out / "report.md").read_text()
    assert "## Runtimes side by side" in report and "| kserve | oip |" in report
    assert "- server: torchserve, requests in the project's own body" in report
