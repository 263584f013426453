"""A real TorchServe on free loopback ports, started and stopped with the CLI.

Everything goes over HTTP: predictions checked against the in-process library, per-request
T_f / R, bad inputs among concurrent good ones, the Prometheus scrape of the metrics port
(parsed with prometheus-client), token protection, and a killed worker.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from robustdeq.data import PROJECT_ROOT
from robustdeq.serving.client import Client
from robustdeq.serving.metrics import METRICS
from robustdeq.serving.runfolder import http_get, read_keys

from .serving_helpers import entropy_extremes, family, png, robustdeq_cli, run_tritonclient, sample_value, scrape

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")


def test_accuracy_over_http_matches_the_library(server, client, reference, cifar_test):
    model, _ = reference
    idx = torch.randperm(len(cifar_test), generator=torch.Generator().manual_seed(1))[:100]
    images, labels = cifar_test.images[idx], cifar_test.labels[idx]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda im: client.predict("deq-tiny", png(im), "image/png"), images))
    assert all(status == 200 for status, _ in results), [a for s, a in results if s != 200][:3]
    served = torch.tensor([a["index"] for _, a in results])
    with torch.no_grad():
        local = model.trajectory(images.float() / 255).predict(model.readout_index())
    assert abs(int((served == labels).sum()) - int((local == labels).sum())) <= 1
    assert int((served == local).sum()) >= 99
    assert max(a["timing_ms"]["batch_size"] for _, a in results) > 1, "concurrent requests were never batched"
    assert all(a["state"] == 5 and a["defense"] == {"mode": "off", "ran": False} for _, a in results)
    assert {a["timing_ms"]["backend"] for _, a in results} == {"onnxruntime"}  # the plain lane's fast path


def test_per_request_T_f_and_R_change_the_work(server, client, cifar_test):
    image = png(cifar_test.images[3531])
    before = scrape(server)
    answers = {}
    for R in (0, 2, 20):
        status, answers[R] = client.predict("deq-tiny", image, "image/png", defense="on", T_f=1, R=R)
        assert status == 200, answers[R]
    assert [answers[R]["defense"]["ran"] for R in (0, 2, 20)] == [False, True, True]
    assert answers[0]["timing_ms"]["defense"] == 0.0
    assert answers[20]["timing_ms"]["defense"] > answers[2]["timing_ms"]["defense"] > 0
    assert answers[20]["defense"]["perturbation_linf"] >= answers[2]["defense"]["perturbation_linf"] > 0
    assert answers[2]["model"] == "deq-tiny-defended"  # the client routed the defended request
    after = scrape(server)
    dims = dict(ModelName="deq-tiny-defended", Mode="on")
    grew = sample_value(after, "robustdeq_defended_requests_total", **dims) - sample_value(
        before, "robustdeq_defended_requests_total", **dims
    )
    assert grew == 2
    timed = sample_value(after, "robustdeq_defense_seconds", "_count", **dims) - sample_value(
        before, "robustdeq_defense_seconds", "_count", **dims
    )
    assert timed == 2


def test_bad_inputs_get_4xx_while_concurrent_good_requests_succeed(server, client, reference, cifar_test):
    model, _ = reference
    good_idx = list(range(20))
    good_images = [cifar_test.images[i * 97] for i in good_idx]
    with torch.no_grad():
        expected = model.trajectory(torch.stack(good_images).float() / 255).predict(model.readout_index())
    nan_array = np.full((3, 32, 32), np.nan).tolist()
    bad = [
        (("deq-tiny", b"", "image/png"), {}, "empty_body"),
        (("deq-tiny", b"\x89PNG not really", "image/png"), {}, "corrupt_image"),
        (("deq-tiny", b"hello", "text/plain"), {}, "unsupported_content_type"),
        (("deq-tiny", png(good_images[0]), "image/png"), {"defense": "on", "R": 51}, "option_out_of_bounds"),
        (("deq-tiny", png(good_images[0]), "image/png"), {"defense": "on", "T_f": 0}, "option_out_of_bounds"),
        (("deq-tiny", png(good_images[0]), "image/png"), {"state": 42}, "option_out_of_bounds"),
        (("deq-tiny", png(good_images[0]), "image/png"), {"defense": "on", "eps": "one"}, "bad_option_value"),
    ]
    json_bad = [
        ({"array": np.zeros((3, 8, 8)).tolist()}, "bad_array_shape"),
        ({"array": nan_array}, "non_finite"),
        ({"image": base64.b64encode(png(good_images[0])).decode(), "R_typo": 3}, "unknown_option"),
    ]

    def send_good(i):
        return client.predict("deq-tiny", png(good_images[i]), "image/png")

    def send_bad(case):
        (model_name, body, ctype), options, _ = case
        return client.predict(model_name, body, ctype, **options)

    with ThreadPoolExecutor(8) as pool:
        good_futures = [pool.submit(send_good, i) for i in good_idx]
        bad_futures = [pool.submit(send_bad, case) for case in bad]
        json_futures = [pool.submit(client.predict_json, "deq-tiny", body) for body, _ in json_bad]
        # straight to the plain lane, past the client's routing
        headers = {"X-Defense": "on"}
        lane = pool.submit(client.request, "/predictions/deq-tiny", png(good_images[0]), "image/png", headers)
        goods = [f.result() for f in good_futures]
        bads = [f.result() for f in bad_futures] + [f.result() for f in json_futures] + [lane.result()]
    reasons = [case[2] for case in bad] + [reason for _, reason in json_bad] + ["wrong_lane"]
    for (status, answer), reason in zip(bads, reasons):
        assert 400 <= status < 500 and answer.get("reason") == reason, (reason, status, answer)
        assert answer["error"]  # a message that names the problem
    assert [s for s, _ in goods] == [200] * len(goods)
    assert [a["index"] for _, a in goods] == expected.tolist()
    families = scrape(server)
    assert sample_value(families, "robustdeq_rejected_requests_total", ModelName="deq-tiny", Reason="wrong_lane") >= 1


def test_kserve_v1_b64_and_oip_v2_over_http(server, client, cifar_test):
    """TF-Serving's b64 convention on /v1/models/<name>:predict, OIP v2 on /v2/models/<name>/infer
    (BYTES images; an FP32 batch with the options in parameters; a malformed body among good
    ones), and what TorchServe answers on OIP's health and metadata routes."""
    images = [cifar_test.images[i] for i in (3531, 17, 42, 7)]
    encoded = [base64.b64encode(png(im)).decode() for im in images]
    own = [client.predict("deq-tiny", png(im), "image/png")[1] for im in images]
    post = partial(client.request, content_type="application/json")

    def body(value) -> bytes:
        return json.dumps(value).encode()

    status, answer = post("/v1/models/deq-tiny:predict", body({"instances": [{"b64": encoded[0]}], "top_k": 2}))
    assert status == 200 and answer["predictions"][0]["label"] == own[0]["label"], answer
    assert len(answer["predictions"][0]["top_k"]) == 2
    named = {"instances": [{"image_bytes": {"b64": e}} for e in encoded[:2]]}
    status, answer = post("/v1/models/deq-tiny:predict", body(named))
    assert status == 200 and [p["label"] for p in answer["predictions"]] == [a["label"] for a in own[:2]], answer

    oip = {"id": "bytes-1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": encoded[:3]}]}
    status, answer = post("/v2/models/deq-tiny/infer", body(oip))
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert answer["model_name"] == "deq-tiny" and answer["id"] == "bytes-1"
    assert outputs["label"]["data"] == [a["label"] for a in own[:3]] and outputs["label"]["shape"] == [3]
    assert outputs["probabilities"]["datatype"] == "FP32" and outputs["probabilities"]["shape"] == [3, 10]
    assert json.loads(answer["parameters"]["robustness"])["name"] == "none"  # the card's undefended row

    batch = torch.stack(images).float().div(255)  # FP32 [4, 3, 32, 32], flat row-major
    fp32 = {
        "parameters": {"defense": "on", "T_f": 1, "R": 5},
        "inputs": [{"name": "array", "datatype": "FP32", "shape": list(batch.shape), "data": batch.flatten().tolist(),
                    "parameters": {"R": 2}}],
    }  # fmt: skip
    malformed = [
        ({"inputs": [{**fp32["inputs"][0], "datatype": "FP64"}]}, "bad_datatype", "inputs[0].datatype"),
        ({"inputs": [{**fp32["inputs"][0], "shape": [4, 3, 32]}]}, "bad_shape", "inputs[0].shape"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}, "missing_data", "inputs[0].data"),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [encoded[0], "aGVsbG8="]}]},
            "corrupt_image",
            "inputs[0].data[1]",
        ),
    ]
    with ThreadPoolExecutor(6) as pool:
        defended = pool.submit(post, "/v2/models/deq-tiny-defended/infer", body(fp32))
        goods = [pool.submit(post, "/v2/models/deq-tiny/infer", body(oip)) for _ in range(4)]
        bads = [pool.submit(post, "/v2/models/deq-tiny/infer", body(b)) for b, _, _ in malformed]
        status, answer = defended.result()
        assert all(f.result()[0] == 200 for f in goods)
        for (_, reason, field), future in zip(malformed, bads):
            status_bad, error = future.result()
            assert status_bad == 400 and error["reason"] == reason and error["error"].startswith(field), error
    assert status == 200, answer
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    assert answer["model_name"] == "deq-tiny-defended"
    params = answer["parameters"]
    assert (params["defense"], params["T_f"], params["R"]) == ("on", 1, 2)  # the input's R wins
    assert outputs["defense_ran"] == [True] * 4 and min(outputs["defense_ms"]) > 0
    assert outputs["readout_state"] == [5] * 4 and len(outputs["entropy_trajectory"]) == 4 * 8

    # OIP's health and metadata routes: TorchServe does not route them to a handler
    keys = read_keys(Path(server.run_dir))
    for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/deq-tiny", "/v2/models/deq-tiny/ready"):
        status, _ = http_get(server.inference_url + path, keys["inference"])
        assert status == 404, (path, status)


TRITONCLIENT_TORCHSERVE_SCRIPT = r"""
import tritonclient.grpc as g
import tritonclient.http as http

url, grpc_url, token, b64 = sys.argv[1:]
h = {"Authorization": "Bearer " + token}
c = http.InferenceServerClient(url)


image = http.InferInput("image", [1], "BYTES")
image.set_data_from_numpy(np.array([b64.encode()], dtype=np.object_), binary_data=False)
r = c.infer("deq-tiny", [image], headers=h, request_id="ts-1",
            outputs=[http.InferRequestedOutput(n, binary_data=False) for n in ("label", "probabilities")])
out = {"bytes": {"label": [x.decode() if isinstance(x, bytes) else x for x in r.as_numpy("label").tolist()],
                 "probabilities_shape": list(r.as_numpy("probabilities").shape), "id": r.get_response()["id"]}}
x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
array = http.InferInput("array", [2, 3, 32, 32], "FP32")
array.set_data_from_numpy(x, binary_data=False)
r = c.infer("deq-tiny-defended", [array], parameters={"T_f": 1, "R": 3}, headers=h,
            outputs=[http.InferRequestedOutput("defense_ran", binary_data=False)])
out["fp32"] = {"parameters": r.get_response()["parameters"], "defense_ran": r.as_numpy("defense_ran").tolist()}
bad = http.InferInput("image", [1], "FP32")
bad.set_data_from_numpy(np.zeros(1, dtype=np.float32), binary_data=False)
out["malformed"] = error(lambda: c.infer("deq-tiny", [bad], headers=h))
binary = http.InferInput("array", [2, 3, 32, 32], "FP32")
binary.set_data_from_numpy(x)  # tritonclient's default: the binary tensor extension
out["binary"] = error(lambda: c.infer("deq-tiny", [binary], headers=h))
out["ready"] = c.is_server_ready(headers=h)  # False: tritonclient reads the 404 as not ready
out["metadata"] = error(lambda: c.get_model_metadata("deq-tiny", headers=h))
grpc_client = g.InferenceServerClient(grpc_url)
out["grpc"] = error(lambda: grpc_client.is_server_ready(headers={"authorization": h["Authorization"]}))
out["grpc_infer"] = error(lambda: grpc_client.infer("deq-tiny", [], headers={"authorization": h["Authorization"]}))
print(json.dumps(out))
"""


def test_tritonclient_on_torchserve(server, client, cifar_test):
    """tritonclient (a client this project did not write) on TorchServe: OIP v2 inference over
    HTTP works (a BYTES image, an FP32 batch with options as parameters, a malformed request and
    the binary tensor extension each a 400 naming the field); OIP's readiness and metadata routes
    and OIP over gRPC are not TorchServe's (404, UNIMPLEMENTED: docs/serving.md says why)."""
    config = (Path(server.run_dir) / "config.properties").read_text()
    grpc_port = re.search(r"^grpc_inference_port=(\d+)", config, re.M).group(1)
    url = server.inference_url.removeprefix("http://")
    image = base64.b64encode(png(cifar_test.images[3])).decode()
    out = run_tritonclient(TRITONCLIENT_TORCHSERVE_SCRIPT, url, f"127.0.0.1:{grpc_port}", client.token, image)
    own = client.predict("deq-tiny", png(cifar_test.images[3]), "image/png")[1]
    assert out["bytes"] == {"label": [own["label"]], "probabilities_shape": [1, 10], "id": "ts-1"}
    params = out["fp32"]["parameters"]
    assert (params["defense"], params["T_f"], params["R"], params["batch_size"]) == ("on", 1, 3, 2)
    assert out["fp32"]["defense_ran"] == [True, True]
    assert out["malformed"]["status"] == "400" and "inputs[0].datatype" in out["malformed"]["message"]
    assert out["binary"]["status"] == "400" and "binary" in out["binary"]["message"]
    assert out["ready"] is False and out["metadata"]["status"] == "404", out
    assert out["grpc"]["status"] == out["grpc_infer"]["status"] == "StatusCode.UNIMPLEMENTED", out


def test_every_declared_metric_is_exported(server, client, reference, cifar_test):
    high, low = entropy_extremes(reference, cifar_test, n=300, seed=2)
    assert client.predict("deq-tiny", png(high), "image/png", defense="gated")[1]["defense"]["ran"]
    assert not client.predict("deq-tiny", png(low), "image/png", defense="gated")[1]["defense"]["ran"]
    assert client.predict("deq-tiny", b"junk", "image/png")[0] == 400
    families = scrape(server)
    for metric in METRICS:
        fam = family(families, metric.name)
        assert fam is not None, f"{metric.name} is not on the metrics port"
        assert fam.type == ("unknown" if metric.kind == "gauge" else metric.kind) or fam.type == metric.kind
        assert all(set(metric.dimensions) <= set(s.labels) for s in fam.samples), metric.name
    assert sample_value(families, "robustdeq_high_entropy_inputs_total", ModelName="deq-tiny-defended") >= 1
    assert sample_value(families, "robustdeq_gated_through_requests_total", ModelName="deq-tiny-defended") >= 1
    assert family(families, "ts_inference_requests_total") is not None


def test_tokens_guard_the_apis_and_registration_is_off(server, client):
    keys = read_keys(Path(server.run_dir))
    for url, token in (
        (server.management_url + "/models", None),
        (server.management_url + "/models", "wrong"),
        (server.management_url + "/models", keys["inference"]),
        (server.inference_url + "/ping", None),
    ):
        status, body = http_get(url, token)
        assert 400 <= status < 500 and b"Token Authorization failed" in body, (url, status, body)
    status, _ = http_get(server.management_url + "/models", keys["management"])
    assert status == 200
    status, answer = Client(server.inference_url, None).predict("deq-tiny", b"x", "image/png")
    assert 400 <= status < 500
    import urllib.request

    req = urllib.request.Request(
        server.management_url + "/models?url=https://example.com/evil.mar",
        method="POST",
        headers={"Authorization": f"Bearer {keys['management']}"},
    )
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("model registration over the API must be off")
    except urllib.error.HTTPError as exc:
        assert exc.code == 405


def test_the_robustness_card_is_served(server, client):
    keys = read_keys(Path(server.run_dir))
    status, body = http_get(server.management_url + "/models/deq-tiny-defended?customized=true", keys["management"])
    assert status == 200
    custom = json.loads(body)[0]["customizedMetadata"]
    custom = json.loads(custom) if isinstance(custom, str) else custom
    assert custom["robustness_card"]["schema"] == "robustdeq.robustness_card/1"
    names = {s["name"] for s in custom["robustness_card"]["settings"]}
    assert {"none", "defense-T2-R10", "gated-T2-R10"} <= names
    status, described = client.describe("deq-tiny")  # with the inference token only
    assert status == 200 and described["limits"]["lane"] == "plain" and described["gate"]["state"] == 5
    status, answer = client.predict("deq-tiny", (PROJECT_ROOT / "serving/examples/ship.png").read_bytes(), defense="on")
    assert status == 200 and answer["robustness"]["name"] == "defense-T2-R10"
    assert answer["robustness"]["cost_vs_plain"] > 1


def test_python_client_cli(server):
    env_run = ["--run-dir", server.run_dir]
    proc = robustdeq_cli("predict", "serving/examples/ship.png", "serving/examples/cat.png", "--model", "deq-tiny",
                         "--defense", "on", "--R", "3", *env_run)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("defense on (T_f=2, R=3)") == 2
    # without --model: the first model this server loaded (deq-tiny), not the default one it lacks
    proc = robustdeq_cli("predict", "serving/examples/ship.png", "--R", "99", "--defense", "on", "--json", *env_run)
    assert proc.returncode == 1 and json.loads(proc.stdout)["reason"] == "option_out_of_bounds"


def test_a_key_rotates_as_the_readme_says(server):
    """The README's rotation call (curl -X POST .../token?type=... with the API key): TorchServe
    rewrites the key file, the old key stops working and the new one works."""
    import urllib.request

    run_dir = Path(server.run_dir)
    old = read_keys(run_dir)
    req = urllib.request.Request(
        server.management_url + "/token?type=management", method="POST",
        headers={"Authorization": f"Bearer {old['api']}"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    new = read_keys(run_dir)
    assert new["management"] != old["management"] and new["inference"] == old["inference"]
    assert http_get(server.management_url + "/models", old["management"])[0] >= 400
    assert http_get(server.management_url + "/models", new["management"])[0] == 200


def test_health_check(server, tmp_path):
    proc = robustdeq_cli("health", "--run-dir", server.run_dir)
    assert proc.returncode == 0 and "Healthy; 2 models ready" in proc.stdout, proc.stdout + proc.stderr
    proc = robustdeq_cli("health", "--run-dir", str(tmp_path))
    assert proc.returncode == 1 and "no server.json" in proc.stderr
    shutil.copy(Path(server.run_dir) / "server.json", tmp_path)
    (tmp_path / "key_file.json").write_text(json.dumps({k: {"key": "stale"} for k in ("management", "inference")}))
    proc = robustdeq_cli("health", "--run-dir", str(tmp_path))
    assert proc.returncode == 1 and "Token Authorization failed" in proc.stderr, proc.stderr


def _ready_workers(server, model: str) -> set:
    status, body = http_get(f"{server.management_url}/models/{model}", read_keys(Path(server.run_dir))["management"])
    workers = json.loads(body)[0]["workers"] if status == 200 else []
    return {w["pid"] for w in workers if w["status"] == "READY"}


def test_two_plain_workers_and_a_defended_worker_that_yields_the_cpu(server):
    import psutil

    plain, defended = _ready_workers(server, "deq-tiny"), _ready_workers(server, "deq-tiny-defended")
    assert len(plain) == 2 and len(defended) == 1, (plain, defended)
    base = psutil.Process(server.pid).nice()  # the frontend's: 0, or more when the tests run under nice
    assert [psutil.Process(pid).nice() for pid in plain] == [base, base]
    assert [psutil.Process(pid).nice() for pid in defended] == [max(base, 10)]  # cpu_nice of the defended lane


def test_a_killed_worker_is_restarted(server, client, cifar_test):
    before = _ready_workers(server, "deq-tiny")
    old = min(before)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 180
    now = before
    while time.monotonic() < deadline:
        now = _ready_workers(server, "deq-tiny")
        if len(now) == len(before) and old not in now:
            break
        time.sleep(0.5)
    assert len(now) == len(before) and old not in now, f"TorchServe did not restart the worker: {before} -> {now}"
    image = png(cifar_test.images[0])
    for _ in range(3):
        status, answer = client.predict("deq-tiny", image, "image/png")
        assert status == 200, answer
