"""The KServe runtime (``robustdeq serve --runtime kserve``) as a real server process.

The shipped deq-tiny archives (plain and defended lanes) under KServe's Python ModelServer on a
free loopback port: probes, OIP v2 metadata and readiness, OIP v2 BYTES and FP32 inference with
per-request options, KServe v1 ``b64`` bodies, malformed bodies (4xx naming the field), the
bearer token, the project's metrics, and 200 hostile inputs from ``robustdeq.serving.fuzz`` with
no 5xx. Skipped where no Python can import kserve (docs/serving.md, "KServe runtime").
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from robustdeq.data import PROJECT_ROOT
from robustdeq.serving.fuzz import fuzz_cases
from robustdeq.serving.kserve_runtime import runtime_python

from .serving_helpers import run_tritonclient

MODEL = "deq-tiny"
DEFENDED = "deq-tiny-defended"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, url: str, token: str, grpc_port: int = 0):
        self.url, self.token, self.grpc_port = url, token, grpc_port

    def call(self, path, body=None, token="default", content_type="application/json", headers=None):
        """(status, decoded JSON or text) for GET (no body) or POST."""
        token = self.token if token == "default" else token
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": content_type, **(headers or {})}
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=data, headers=hdrs, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory):
    python = runtime_python()
    if python is None:
        pytest.skip("no Python with kserve (set ROBUSTDEQ_KSERVE_PYTHON or build .cache/kserve-venv)")
    store = PROJECT_ROOT / "model_store"
    if not (store / f"{MODEL}.mar").is_file():
        pytest.skip("no shipped deq-tiny archives in model_store/")
    run_dir = tmp_path_factory.mktemp("kserve-run")
    port, grpc_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("ROBUSTDEQ_TOKEN", None)
    log = open(run_dir / "server.log", "wb")
    # the documented command: it replaces itself with the runtime (from the Python that has kserve)
    cmd = [sys.executable, "-m", "robustdeq", "serve", "--runtime", "kserve", "--models", MODEL, "--store", str(store)]
    cmd += ["--run-dir", str(run_dir), "--inference-port", str(port), "--grpc-ports", str(grpc_port), "0"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the KServe runtime exited ({proc.returncode}): {(run_dir / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("the KServe runtime was not ready in 180 s")
            time.sleep(0.5)
        token = json.loads((run_dir / "kserve" / "key_file.json").read_text())["inference"]["key"]
        yield Client(url, token, grpc_port), proc, port, run_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(kserve_server):
    return kserve_server[0]


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def _b64png(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _output(answer, name):
    return next(o for o in answer["outputs"] if o["name"] == name)


def test_probes_need_no_token_and_the_rest_does(client, kserve_server):
    _, proc, port, run_dir = kserve_server
    assert client.call("/v2/health/live", token=None)[0] == 200
    assert client.call("/v2/health/ready", token=None)[0] == 200
    status, body = client.call(f"/v2/models/{MODEL}", token=None)
    assert status == 401 and "token" in body["error"]
    status, body = client.call(f"/v2/models/{MODEL}/infer", {"inputs": []}, token="wrong")
    assert status == 403 and body["reason"] == "forbidden"
    status, _ = client.call(f"/v1/models/{MODEL}:predict", {"instances": [{"b64": _b64png(_image())}]}, token=None)
    assert status == 401
    assert (run_dir / "kserve" / "key_file.json").stat().st_mode & 0o077 == 0  # the token file is the owner's only


def test_the_health_check_finds_the_runtime_in_the_run_folder(kserve_server):
    """``robustdeq health`` (the Docker HEALTHCHECK) on the serve command's run folder: the
    runtime's runtime.json there, /v2/health/ready and every lane's readiness with the token."""
    _, proc, port, run_dir = kserve_server
    info = json.loads((run_dir / "kserve" / "runtime.json").read_text())
    assert info["pid"] == proc.pid and info["url"] == f"http://127.0.0.1:{port}"
    assert info["models"] == [MODEL, DEFENDED]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "robustdeq.serving.health", "--run-dir", str(run_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "2 models ready (KServe runtime)" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(cmd + ["--url", "http://127.0.0.1:1"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and "/v2/health/ready: no answer" in out.stderr


def test_listens_on_loopback_only(kserve_server):
    client, proc, port, _ = kserve_server
    for listener in (port, client.grpc_port):  # REST and gRPC
        addresses = [a for a in _listen_addresses(proc.pid) if a[1] == listener]
        assert addresses and all(host == "127.0.0.1" for host, _ in addresses), (listener, addresses)


def _listen_addresses(pid: int):
    """(host, port) of the TCP sockets ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state == "0A" and inode in inodes:  # LISTEN
                    host_hex, port_hex = local.split(":")
                    if len(host_hex) == 8:
                        host = socket.inet_ntoa(bytes.fromhex(host_hex)[::-1])
                    else:  # four little-endian 32-bit words; an IPv4-mapped address is reported as IPv4
                        words = b"".join(bytes.fromhex(host_hex[i : i + 8])[::-1] for i in range(0, 32, 8))
                        address = ipaddress.IPv6Address(words)
                        host = str(address.ipv4_mapped or address)
                    out.append((host, int(port_hex, 16)))
    return out


def test_metadata_and_model_readiness(client):
    status, meta = client.call(f"/v2/models/{MODEL}")
    assert status == 200 and meta["name"] == MODEL
    assert {(i["name"], i["datatype"]) for i in meta["inputs"]} == {("image", "BYTES"), ("array", "FP32")}
    assert next(i for i in meta["inputs"] if i["name"] == "array")["shape"] == [-1, 3, 32, 32]
    assert {"label", "probabilities", "entropy", "readout_state", "residual"} <= {o["name"] for o in meta["outputs"]}
    for name in (MODEL, DEFENDED):
        status, ready = client.call(f"/v2/models/{name}/ready")
        assert status == 200 and ready["ready"] is True
    assert client.call("/v2/models/no-such-model/ready")[0] == 404


def test_oip_bytes_image_on_the_plain_lane(client):
    body = {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64png(_image(1))]}]}
    status, answer = client.call(f"/v2/models/{MODEL}/infer", body)
    assert status == 200, answer
    assert answer["model_name"] == MODEL and answer["id"] == "r1"
    assert answer["parameters"]["defense"] == "off"
    probs = _output(answer, "probabilities")
    assert probs["shape"] == [1, 10] and abs(sum(probs["data"]) - 1) < 1e-3
    assert _output(answer, "label")["data"][0] in json.loads(_labels())


def _labels() -> str:
    import zipfile

    with zipfile.ZipFile(PROJECT_ROOT / "model_store" / f"{MODEL}.mar") as zf:
        return json.dumps(list(json.loads(zf.read("index_to_name.json")).values()))


def test_oip_fp32_batch_with_options_on_the_defended_lane(client):
    xs = np.stack([_image(2), _image(3)]).transpose(0, 3, 1, 2) / 255.0
    body = {
        "parameters": {"T_f": 1, "R": 3},
        "inputs": [{"name": "array", "datatype": "FP32", "shape": [2, 3, 32, 32], "data": xs.ravel().tolist()}],
    }
    status, answer = client.call(f"/v2/models/{DEFENDED}/infer", body)
    assert status == 200, answer
    params = answer["parameters"]
    assert (params["defense"], params["T_f"], params["R"], params["batch_size"]) == ("on", 1, 3, 2)
    assert _output(answer, "defense_ran")["data"] == [True, True]
    assert _output(answer, "label")["shape"] == [2]
    # the same options beyond the lane's bound are refused, naming the option
    body["parameters"]["R"] = 10_000
    status, answer = client.call(f"/v2/models/{DEFENDED}/infer", body)
    assert status == 400 and "R" in answer["error"]
    # the plain lane refuses the defense
    body["parameters"] = {"defense": "on"}
    status, answer = client.call(f"/v2/models/{MODEL}/infer", body)
    assert 400 <= status < 500 and "defense" in answer["error"]


def test_kserve_v1_b64_and_named_binary_field(client):
    b64 = _b64png(_image(4))
    body = {"instances": [{"b64": b64}, {"image_bytes": {"b64": b64}}]}
    status, answer = client.call(f"/v1/models/{MODEL}:predict", body)
    assert status == 200, answer
    first, second = answer["predictions"]
    assert first["index"] == second["index"] and first["model"] == MODEL
    status, answer = client.call(f"/v1/models/{DEFENDED}:predict", {"instances": [{"b64": b64}]}, headers={"X-R": "2"})
    assert status == 200 and answer["predictions"][0]["defense"]["R"] == 2


@pytest.mark.parametrize(
    "body, field",
    [
        ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["x"]}]}, "inputs[0].datatype"),
        ({"inputs": [{"name": "array", "datatype": "FP32", "shape": [1, 3, 32, 31], "data": [0.0]}]}, "shape"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]}, "data[0]"),
        ({"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, "inputs[0].name"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}, "data"),
        ({"parameters": {"bogus": 1}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
         "bogus"),
    ],
)  # fmt: skip
def test_a_malformed_oip_body_gets_a_4xx_naming_the_field(client, body, field):
    status, answer = client.call(f"/v2/models/{MODEL}/infer", body)
    assert 400 <= status < 500, (status, answer)
    assert field in json.dumps(answer), answer


def test_a_malformed_v1_body_gets_a_4xx_naming_the_instance(client):
    status, answer = client.call(f"/v1/models/{MODEL}:predict", {"instances": [{"b64": _b64png(_image())}, {"b64": 7}]})
    assert status == 400 and answer["error"].startswith("instances[1]"), answer
    status, answer = client.call(f"/v1/models/{MODEL}:predict", b"{not json")
    assert 400 <= status < 500


def _route(case):
    """A fuzz case as a KServe request: JSON bodies as they are (OIP ones to /infer), raw image
    bytes wrapped as KServe v1 ``b64`` or OIP ``BYTES`` (KServe takes JSON bodies only)."""
    if case.content_type == "application/json":
        oip = b'"inputs"' in case.payload
        return (f"/v2/models/{MODEL}/infer" if oip else f"/v1/models/{MODEL}:predict"), case.payload
    b64 = base64.b64encode(case.payload).decode()
    if len(case.payload) % 2:
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}
        return f"/v2/models/{MODEL}/infer", json.dumps(body).encode()
    return f"/v1/models/{MODEL}:predict", json.dumps({"instances": [{"b64": b64}]}).encode()


def test_fuzz_the_kserve_runtime(client, kserve_server):
    """200 hostile inputs over HTTP: each answered 200 or a JSON 4xx, never 5xx; the server lives."""
    _, proc, _, _ = kserve_server
    seeds = [_image(s) for s in range(3)] + [np.tile(np.arange(32, dtype=np.uint8)[:, None, None] * 8, (1, 32, 3))]
    statuses, failures = Counter(), []
    for case in fuzz_cases(seeds, 200, seed=5):
        path, payload = _route(case)
        status, answer = client.call(path, payload)
        statuses[status] += 1
        if not (status == 200 or (400 <= status < 500 and isinstance(answer, dict))):
            failures.append(f"{case.kind}: {status} {str(answer)[:200]}")
    assert failures == [], failures[:10]
    assert sum(statuses.values()) == 200 and all(s < 500 for s in statuses)
    assert statuses[200] > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 100, statuses
    assert proc.poll() is None
    status, answer = client.call(f"/v1/models/{MODEL}:predict", {"instances": [{"b64": _b64png(_image(9))}]})
    assert status == 200 and answer["predictions"][0]["model"] == MODEL


def test_project_metrics_on_the_metrics_path(client):
    client.call(f"/v1/models/{MODEL}:predict", {"instances": [{"b64": _b64png(_image(11))}]})
    client.call(
        f"/v2/models/{MODEL}/infer", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["x"]}]}
    )
    status, text = client.call("/metrics", token=None)
    assert status == 200
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["robustdeq_requests"]
    assert any(s.labels.get("ModelName") == MODEL and s.value >= 1 for s in requests.samples)
    rejected = families["robustdeq_rejected_requests"]
    assert any(s.labels.get("Reason") == "bad_datatype" and s.value >= 1 for s in rejected.samples)
    assert "robustdeq_prediction_entropy" in families and "robustdeq_handler_latency_seconds" in families
    # TorchServe's frontend counters under their own names and labels (the dashboard, alerts and HPA read them)
    samples = {(s.name, s.labels["model_name"]): s.value for f in families.values() for s in f.samples
               if s.name.startswith("ts_")}  # fmt: skip
    assert samples[("ts_inference_requests_total", MODEL)] >= 2  # the rejected request counts too
    assert samples[("ts_queue_latency_microseconds", MODEL)] >= 0
    assert samples[("ts_inference_latency_microseconds", MODEL)] > 0
    exposed = r'^ts_queue_latency_microseconds\{(?=.*model_name="deq-tiny")(?=.*model_version="default").*\} '
    assert re.search(exposed, text, re.M), [x for x in text.splitlines() if x.startswith("ts_")]  # no _total


def test_serve_runtime_kserve_is_the_runtime_process(kserve_server):
    """``robustdeq serve --runtime kserve`` became the runtime itself (exec), under the kserve Python."""
    _, proc, _, run_dir = kserve_server
    cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().split(b"\0")
    assert b"robustdeq.serving.kserve_runtime" in cmdline
    assert cmdline[0].decode() == runtime_python()  # the venv path, not the realpath: the venv matters
    assert (run_dir / "kserve" / "models" / DEFENDED / "model-config.yaml").is_file()


def test_the_kserve_environment_layers_over_the_project():
    """The runtime's Python has kserve 0.21.0 with protobuf < 7, and the project's own torch."""
    import torch

    python = runtime_python()
    if python is None:
        pytest.skip("no Python with kserve")
    code = "import importlib.metadata as m, kserve, torch; "
    code += "print(m.version('kserve'), torch.__version__, m.version('protobuf'))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out[0] == "0.21.0" and out[1] == torch.__version__ and int(out[2].split(".")[0]) < 7


def test_the_documented_curls(kserve_server):
    """The curl block of docs/serving.md, pointed at this server, answers as documented."""
    _, _, port, run_dir = kserve_server
    text = (PROJECT_ROOT / "docs" / "serving.md").read_text()
    block = next(b for b in text.split("```bash\n")[1:] if "kserve/key_file.json" in b).split("```")[0]
    block = block.replace(".serve/kserve/key_file.json", str(run_dir / "kserve" / "key_file.json"))
    block = block.replace("localhost:8085", f"127.0.0.1:{port}").replace("curl -s ", "curl -sS --fail-with-body ")
    out = subprocess.run(["bash", "-ec", block], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stderr + out.stdout
    assert '"name":"deq-tiny"' in out.stdout
    assert '"model_name":"deq-tiny-defended"' in out.stdout and '"T_f":1' in out.stdout
    assert '"predictions":[{"model":"deq-tiny"' in out.stdout


# ---- conformance: tritonclient (a client this project did not write), run by the kserve Python ----
TRITONCLIENT_SCRIPT = r"""
import tritonclient.http as http

url, token, model, defended, b64 = sys.argv[1:]
h = {"Authorization": "Bearer " + token}
c = http.InferenceServerClient(url)
out = {"live": c.is_server_live(headers=h), "ready": c.is_server_ready(headers=h),
       "model_ready": c.is_model_ready(defended, headers=h)}
meta = c.get_model_metadata(model, headers=h)
out["meta"] = {"name": meta["name"], "inputs": sorted((i["name"], i["datatype"]) for i in meta["inputs"])}
image = http.InferInput("image", [1], "BYTES")
image.set_data_from_numpy(np.array([b64.encode()], dtype=np.object_), binary_data=False)
wanted = [http.InferRequestedOutput(n, binary_data=False) for n in ("label", "probabilities", "entropy")]
r = c.infer(model, [image], outputs=wanted, headers=h, request_id="tc-1")
out["bytes"] = {"label": [x.decode() if isinstance(x, bytes) else x for x in r.as_numpy("label").tolist()],
                "probabilities_shape": list(r.as_numpy("probabilities").shape),
                "id": r.get_response()["id"]}
x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
array = http.InferInput("array", [2, 3, 32, 32], "FP32")
array.set_data_from_numpy(x, binary_data=False)
r = c.infer(defended, [array], parameters={"T_f": 1, "R": 3}, headers=h,
            outputs=[http.InferRequestedOutput("defense_ran", binary_data=False)])
out["fp32"] = {"parameters": r.get_response()["parameters"], "defense_ran": r.as_numpy("defense_ran").tolist()}
bad = http.InferInput("image", [1], "FP32")
bad.set_data_from_numpy(np.zeros(1, dtype=np.float32), binary_data=False)
try:
    c.infer(model, [bad], headers=h)
    out["malformed"] = None
except InferenceServerException as exc:
    out["malformed"] = {"status": exc.status(), "message": exc.message()}
try:
    c.get_model_metadata(model, headers={"Authorization": "Bearer wrong"})
    out["wrong_token"] = None
except InferenceServerException as exc:
    out["wrong_token"] = {"status": exc.status(), "message": exc.message()}
print(json.dumps(out))
"""


def test_tritonclient_http_conformance(kserve_server):
    """tritonclient's HTTP client: readiness, metadata, a BYTES image, an FP32 batch with options
    as parameters, a malformed request (400 naming the field) and a wrong token (403)."""
    client, _, port, _ = kserve_server
    args = [f"127.0.0.1:{port}", client.token, MODEL, DEFENDED, _b64png(_image(21))]
    out = run_tritonclient(TRITONCLIENT_SCRIPT, *args, modules=("http",))
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["meta"] == {"name": MODEL, "inputs": [["array", "FP32"], ["image", "BYTES"]]}
    assert out["bytes"]["probabilities_shape"] == [1, 10] and out["bytes"]["id"] == "tc-1"
    assert out["bytes"]["label"][0] in json.loads(_labels())
    params = out["fp32"]["parameters"]
    assert (params["defense"], params["T_f"], params["R"], params["batch_size"]) == ("on", 1, 3, 2)
    assert out["fp32"]["defense_ran"] == [True, True]
    assert out["malformed"]["status"] == "400" and "inputs[0].datatype" in out["malformed"]["message"]
    assert out["wrong_token"]["status"] == "403"


TRITONCLIENT_GRPC_SCRIPT = r"""
import tritonclient.grpc as g

url, token, model, defended, b64 = sys.argv[1:]
h = {"authorization": "Bearer " + token}
c = g.InferenceServerClient(url)
out = {"live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready(defended, headers=h)}
meta = c.get_model_metadata(model, headers=h, as_json=True)
out["meta"] = {"name": meta["name"], "inputs": sorted((i["name"], i["datatype"]) for i in meta["inputs"])}


def params(result):
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in result.get_response().parameters.items()}


image = g.InferInput("image", [1], "BYTES")
image.set_data_from_numpy(np.array([base64.b64decode(b64)], dtype=np.object_))  # raw image bytes
wanted = [g.InferRequestedOutput(n) for n in ("label", "probabilities", "entropy")]
r = c.infer(model, [image], outputs=wanted, headers=h, request_id="tc-g1")
out["bytes"] = {"label": [x.decode() for x in r.as_numpy("label").tolist()],
                "probabilities_shape": list(r.as_numpy("probabilities").shape),
                "outputs": [o.name for o in r.get_response().outputs], "id": r.get_response().id}
x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
array = g.InferInput("array", [2, 3, 32, 32], "FP32")
array.set_data_from_numpy(x)
r = c.infer(defended, [array], parameters={"T_f": 1, "R": 3, "beta": "2/255"}, headers=h,
            outputs=[g.InferRequestedOutput("defense_ran")])
out["fp32"] = {"parameters": params(r), "defense_ran": r.as_numpy("defense_ran").tolist()}
bad = g.InferInput("image", [1], "FP32")
bad.set_data_from_numpy(np.zeros(1, dtype=np.float32))
out["malformed"] = error(lambda: c.infer(model, [bad], headers=h))
junk = g.InferInput("image", [1], "BYTES")
junk.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
out["not_an_image"] = error(lambda: c.infer(model, [junk], headers=h))
out["float_parameter"] = error(lambda: c.infer(defended, [image], parameters={"beta": 0.01}, headers=h))
out["absurd_R"] = error(lambda: c.infer(defended, [image], parameters={"R": 10**6}, headers=h))
out["unknown_model"] = error(lambda: c.infer("no-such-model", [image], headers=h))
out["no_token"] = error(lambda: c.get_model_metadata(model))
out["wrong_token"] = error(lambda: c.get_model_metadata(model, headers={"authorization": "Bearer wrong"}))
print(json.dumps(out))
"""


def test_tritonclient_grpc_conformance(kserve_server):
    """tritonclient's gRPC client on the runtime's OIP v2 gRPC port: probes without a token,
    readiness and metadata, a BYTES image (raw bytes), an FP32 batch with options as parameters,
    and the errors (INVALID_ARGUMENT naming the field, NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED)."""
    client, proc, _, _ = kserve_server
    args = [f"127.0.0.1:{client.grpc_port}", client.token, MODEL, DEFENDED, _b64png(_image(22))]
    out = run_tritonclient(TRITONCLIENT_GRPC_SCRIPT, *args, modules=("grpc",))
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["meta"] == {"name": MODEL, "inputs": [["array", "FP32"], ["image", "BYTES"]]}
    assert out["bytes"]["outputs"] == ["label", "probabilities", "entropy"] and out["bytes"]["id"] == "tc-g1"
    assert out["bytes"]["probabilities_shape"] == [1, 10] and out["bytes"]["label"][0] in json.loads(_labels())
    params = out["fp32"]["parameters"]
    assert (params["defense"], params["T_f"], params["R"], params["batch_size"]) == ("on", 1, 3, 2)
    assert abs(float(params["beta"]) - 2 / 255) < 1e-6  # a float goes back as a string
    assert out["fp32"]["defense_ran"] == [True, True]
    invalid = "StatusCode.INVALID_ARGUMENT"
    assert out["malformed"]["status"] == invalid and "inputs[0].datatype" in out["malformed"]["message"]
    assert out["not_an_image"]["status"] == invalid and "inputs[0].data[0]" in out["not_an_image"]["message"]
    assert out["float_parameter"]["status"] == invalid and "parameters.beta" in out["float_parameter"]["message"]
    assert out["absurd_R"]["status"] == invalid and "R" in out["absurd_R"]["message"]
    assert out["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert out["no_token"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert out["wrong_token"]["status"] == "StatusCode.PERMISSION_DENIED"
    assert proc.poll() is None  # the runtime survived every error


# ---- the Kubernetes overlay (serving/k8s-kserve), rendered by kustomize and validated ---------------
def _rendered_overlay():
    import shutil

    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl to render the kustomize overlay")
    out = subprocess.run(
        [kubectl, "kustomize", str(PROJECT_ROOT / "serving" / "k8s-kserve")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_the_kserve_overlay_validates_and_its_probes_match_the_runtime():
    from robustdeq.serving.kserve import K8S_DIR
    from robustdeq.serving.kserve_runtime import OPEN_PATHS, add_kserve_arguments

    from .k8s_schemas import build_crd_validators, builtin_errors, crd_errors

    validators = build_crd_validators(
        {
            ("serving.kserve.io/v1alpha1", "ServingRuntime"): K8S_DIR / "schemas" / "servingruntime-v1alpha1.json",
            ("serving.kserve.io/v1beta1", "InferenceService"): K8S_DIR / "schemas" / "inferenceservice-v1beta1.json",
        }
    )
    docs = _rendered_overlay()
    for doc in docs:
        errors = crd_errors(validators, doc) if "kserve.io" in doc["apiVersion"] else builtin_errors(doc)
        assert errors == [], (doc["kind"], errors)
    by_kind = {d["kind"]: d for d in docs}
    runtime, isvc = by_kind["ServingRuntime"], by_kind["InferenceService"]
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"] == "robustdeq-kserve"
    assert "v2" in runtime["spec"]["protocolVersions"] and isvc["spec"]["predictor"]["model"]["protocolVersion"] == "v2"
    container = runtime["spec"]["containers"][0]
    argv = container["args"]
    assert argv[:3] == ["python", "-m", "robustdeq.serving.kserve_runtime"]
    import argparse

    parser = argparse.ArgumentParser()
    add_kserve_arguments(parser)
    args = parser.parse_args(argv[3:])  # the runtime's own parser accepts the manifest's arguments
    ports = [p["containerPort"] for p in container["ports"]]
    assert ports[0] == args.http_port and args.bind == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == args.http_port and get["path"] in OPEN_PATHS
    assert isvc["spec"]["predictor"]["annotations"]["prometheus.io/port"] == str(args.http_port)
    policy = by_kind["NetworkPolicy"]
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {args.http_port}
    # --no-auth is only there because the network policy decides who reaches the pod
    assert args.no_auth and policy["spec"]["ingress"]


def test_a_long_defended_request_does_not_hold_up_the_plain_lane_or_the_probes(client):
    """The defended lane solves in a worker thread: the plain lane and readiness answer meanwhile.

    Judged by ratios, not clocks: a plain request sent while the defended one runs must take a
    small part of the defended request's time (were it queued behind it, it would take most)."""
    import threading

    xs = np.random.default_rng(5).random((16, 3, 32, 32)).astype(np.float32)
    body = {
        "parameters": {"T_f": 1, "R": 50},
        "inputs": [{"name": "array", "datatype": "FP32", "shape": [16, 3, 32, 32], "data": xs.ravel().tolist()}],
    }
    done = {}

    def defended():
        try:
            done["result"] = client.call(f"/v2/models/{DEFENDED}/infer", body)
        finally:
            done["at"] = time.monotonic()

    started = time.monotonic()
    worker = threading.Thread(target=defended)
    worker.start()
    time.sleep(0.3)
    plain = {"instances": [{"b64": _b64png(_image(31))}]}
    plain_sent = time.monotonic()
    status, answer = client.call(f"/v1/models/{MODEL}:predict", plain)
    plain_took = time.monotonic() - plain_sent
    ready = client.call("/v2/health/ready", token=None)[0]
    worker.join(timeout=300)
    assert status == 200 and ready == 200
    assert done.get("result", (None,))[0] == 200, done
    defended_took = done["at"] - started
    assert plain_took < 0.5 * defended_took, f"plain {plain_took:.1f} s during a defended {defended_took:.1f} s"
