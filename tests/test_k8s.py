"""serving/k8s/: the KServe layout and config, the manifests against the Kubernetes schemas, and their
cross-references; one test runs the KServe config in a real TorchServe (paths and ports rewritten)."""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import promql_parser
import pytest
import yaml

from robustdeq.executables import find_executable
from robustdeq.serving.archive import DEFAULT_STORE, LANE_DEFAULTS, archive_name
from robustdeq.serving.kserve import (
    COMMITTED_CONFIG,
    K8S_DIR,
    KSERVE_PORTS,
    KSERVE_ROOT,
    PVC_NAME,
    PVC_SUBPATH,
    SNAPSHOT_KEYS,
    add_kserve_layout_arguments,
    build_layout,
    render_kserve_config,
    run_kserve_layout,
)
from robustdeq.serving.metrics import FRONTEND_METRICS, METRICS
from robustdeq.serving.runfolder import parse_properties
from robustdeq.serving.server import (
    DEFAULT_METRICS,
    DEFAULT_MODELS,
    LOOPBACK,
    Ports,
    ServerInfo,
    _short_tmp,
    http_get,
    stop_server,
)

from .k8s_schemas import build_crd_validators, builtin_errors, crd_errors, load_manifests

KSERVE_GROUP = "serving.kserve.io/"
CRD_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): K8S_DIR / "schemas" / "servingruntime-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): K8S_DIR / "schemas" / "inferenceservice-v1beta1.json",
}
EXAMPLE = Path(__file__).resolve().parents[1] / "serving" / "examples" / "ship.png"


# ---- loading ------------------------------------------------------------------------------------
def _manifests():
    """[(path, resource)] of every Kubernetes resource under serving/k8s/ (not kustomize or Helm files)."""
    return load_manifests(K8S_DIR)


def _one(kind):
    found = [doc for _, doc in _manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in serving/k8s/, found {len(found)}"
    return found[0]


def _runtime_container():
    return _one("ServingRuntime")["spec"]["containers"][0]


def _adapter_rules():
    return yaml.safe_load((K8S_DIR / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]


def _committed():
    return parse_properties(COMMITTED_CONFIG.read_text())


def _port(address):
    return int(address.rsplit(":", 1)[1])


# ---- CRD schemas on the real Kubernetes definitions (tests/k8s_schemas.py) ----------------------
@pytest.fixture(scope="module")
def crd_validators():
    return build_crd_validators(CRD_SCHEMAS)


# ---- every manifest is valid --------------------------------------------------------------------
def test_manifests_parse_and_the_kustomization_lists_them():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    for name in listed:
        assert (K8S_DIR / name).is_file(), f"kustomization.yaml lists {name}, which is missing"
    top_level = {p.name for p, _ in _manifests() if p.parent == K8S_DIR}
    assert top_level == set(listed), "every manifest in serving/k8s/ (not upload/) belongs in kustomization.yaml"
    assert kustomization["namespace"] == _one("Namespace")["metadata"]["name"]
    assert _one("Pod")["metadata"]["namespace"] == kustomization["namespace"]  # upload/, applied on its own


def test_builtin_kinds_validate_against_the_kubernetes_schemas():
    builtin = [(p, d) for p, d in _manifests() if not d["apiVersion"].startswith(KSERVE_GROUP)]
    assert {d["kind"] for _, d in builtin} >= {"HorizontalPodAutoscaler", "NetworkPolicy", "PersistentVolumeClaim"}
    for path, doc in builtin:
        assert builtin_errors(doc) == [], f"{path.name} {doc['kind']}"


def test_kserve_resources_validate_against_their_schemas(crd_validators):
    kserve = [(p, d) for p, d in _manifests() if d["apiVersion"].startswith(KSERVE_GROUP)]
    assert {(d["apiVersion"], d["kind"]) for _, d in kserve} == set(CRD_SCHEMAS)
    for path, doc in kserve:
        assert crd_errors(crd_validators, doc) == [], path.name


def _rename(obj, old, new):
    obj[new] = obj.pop(old)


def _c(doc):
    return doc["spec"]["containers"][0]


def _m(doc):
    return doc["spec"]["predictor"]["model"]


@pytest.mark.parametrize(
    "kind, mutate, where",
    [
        ("ServingRuntime", lambda d: _rename(_c(d), "readinessProbe", "readinesProbe"), "readines"),
        ("ServingRuntime", lambda d: _c(d)["livenessProbe"]["httpGet"].update(port=[8080]), "port"),
        ("ServingRuntime", lambda d: _c(d)["livenessProbe"].update(periodSeconds="20"), "period"),
        ("ServingRuntime", lambda d: _rename(d["spec"], "supportedModelFormats", "supportedModelFormat"), "Format"),
        ("InferenceService", lambda d: _m(d).update(livenesProbe={}), "livenes"),
        ("InferenceService", lambda d: _m(d)["resources"].update(limit={}), "limit"),
        ("InferenceService", lambda d: d["spec"]["predictor"].update(tolerations={"key": "x"}), "tolerations"),
        ("InferenceService", lambda d: _rename(_m(d), "storageUri", "storageURI"), "URI"),
        ("InferenceService", lambda d: _m(d).update(protocolVersion="v3"), "v3"),
    ],
)
def test_the_schemas_reject_typos_and_bad_types(crd_validators, kind, mutate, where):
    doc = copy.deepcopy(_one(kind))
    mutate(doc)
    errors = crd_errors(crd_validators, doc)
    assert errors and any(where in e for e in errors), errors


# ---- cross-references ---------------------------------------------------------------------------
def test_the_hpa_scales_the_deployment_kserve_creates():
    isvc, hpa = _one("InferenceService"), _one("HorizontalPodAutoscaler")
    notes = isvc["metadata"]["annotations"]
    assert notes["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert notes["serving.kserve.io/autoscalerClass"] == "external"  # KServe creates no HPA of its own
    deployment = f"{isvc['metadata']['name']}-predictor"  # constants.PredictorServiceName in raw mode
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment}
    assert hpa["metadata"]["name"] != deployment, "KServe may delete an HPA named like the component"
    predictor = isvc["spec"]["predictor"]
    assert "minReplicas" not in predictor and "maxReplicas" not in predictor, "the HPA owns the replica count"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert isvc["spec"]["predictor"]["model"]["runtime"] == _one("ServingRuntime")["metadata"]["name"]


def _template_query(query, series):
    """An adapter metricsQuery with its Go template filled in, as prometheus-adapter would."""
    filled = query.replace("<<.Series>>", series).replace("<<.GroupBy>>", "pod")
    return filled.replace("<<.LabelMatchers>>", 'namespace="robustdeq",pod=~"robustdeq-predictor-.*"')


def _selected_metrics(expr):
    names = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_hpa_metrics_come_from_adapter_rules_on_exported_metrics():
    exported = {m.name for m in METRICS} | {name for name, *_ in FRONTEND_METRICS}
    rules = {}
    for rule in _adapter_rules():
        (series,) = _selected_metrics(rule["seriesQuery"])
        assert series in exported, f"adapter rule reads {series}, which the server does not export"
        assert re.fullmatch(rule["name"]["matches"], series)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        query = _template_query(rule["metricsQuery"], series)
        assert set(_selected_metrics(query)) <= exported, query
        assert "rate(" in query, "the HPA scales on rates, not on raw counters"
        rules[rule["name"]["as"]] = series
    hpa_metrics = [m["pods"]["metric"]["name"] for m in _one("HorizontalPodAutoscaler")["spec"]["metrics"]]
    assert all(m["type"] == "Pods" for m in _one("HorizontalPodAutoscaler")["spec"]["metrics"])
    assert set(hpa_metrics) <= set(rules), f"no adapter rule serves {set(hpa_metrics) - set(rules)}"
    assert rules["robustdeq_requests_per_second"] == "robustdeq_requests_total"
    assert rules["robustdeq_requests_per_second"] in {m.name for m in METRICS}


def test_probes_ports_and_paths_match_the_rendered_config():
    config, container = _committed(), _runtime_container()
    inference, metrics = _port(config["inference_address"]), _port(config["metrics_address"])
    assert (inference, metrics) == (KSERVE_PORTS.inference, KSERVE_PORTS.metrics)
    assert container["ports"][0]["containerPort"] == inference  # KServe's Service targets the first port
    assert {p["containerPort"] for p in container["ports"]} == {inference, metrics}
    live = container["livenessProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/ping", inference)
    ready, startup = container["readinessProbe"]["exec"]["command"], container["startupProbe"]["exec"]["command"]
    assert (
        ready
        == startup
        == ["python", "-m", "robustdeq.serving.health", "--ts-config", f"{KSERVE_ROOT}/config/config.properties"]
    )
    assert config["management_address"].startswith(f"http://{LOOPBACK}:")  # reachable by the exec probe only
    assert f"--ts-config={KSERVE_ROOT}/config/config.properties" in container["args"]
    assert f"--model-store={config['model_store']}" in container["args"]
    assert f"--log-config={KSERVE_ROOT}/config/log4j2.xml" in container["args"]
    assert "--foreground" in container["args"], "TorchServe must stay the container's process"
    annotations = _one("InferenceService")["spec"]["predictor"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == metrics
    policy = _one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "robustdeq"}
    assert sorted(p["port"] for rule in policy["ingress"] for p in rule["ports"]) == sorted([inference, metrics])


def test_the_storage_uri_names_the_pvc_the_upload_writes():
    model = _one("InferenceService")["spec"]["predictor"]["model"]
    assert model["storageUri"] == f"pvc://{PVC_NAME}/{PVC_SUBPATH}"
    assert _one("PersistentVolumeClaim")["metadata"]["name"] == PVC_NAME
    assert _one("Pod")["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == PVC_NAME


def test_model_snapshot_names_the_archives_with_their_batching():
    snapshot = json.loads(_committed()["model_snapshot"])
    expected = {archive_name(m, lane) for m in DEFAULT_MODELS for lane in LANE_DEFAULTS}
    assert set(snapshot["models"]) == expected and snapshot["modelCount"] == len(expected)
    for name, versions in snapshot["models"].items():
        with zipfile.ZipFile(DEFAULT_STORE / f"{name}.mar") as zf:
            manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
            config = yaml.safe_load(zf.read("model-config.yaml"))
        (version, entry), *others = versions.items()
        assert not others and version == manifest["modelVersion"] and entry["defaultVersion"] is True
        assert entry["marName"] == f"{name}.mar"
        assert {k: entry[k] for k in SNAPSHOT_KEYS} == {k: config[k] for k in SNAPSHOT_KEYS}
        lane = "defended" if name.endswith("-defended") else "plain"
        assert entry["batchSize"] == LANE_DEFAULTS[lane].batch_size


def test_the_committed_config_is_the_rendered_one():
    assert COMMITTED_CONFIG.read_text() == render_kserve_config(), (
        "serving/k8s/config.properties is stale: python -c 'from robustdeq.serving.kserve import *; "
        "COMMITTED_CONFIG.write_text(render_kserve_config())'"
    )


def test_the_kserve_config_keeps_the_hardening():
    config = _committed()
    assert config["enable_model_api"] == "false" and config["install_py_dep_per_model"] == "false"
    assert config["enable_envvars_config"] == "false", "no environment variable may change the config"
    assert config["disable_token_authorization"] == "true"  # auth at the edge: serving/k8s/README.md
    assert "load_models" not in config and "service_envelope" not in config
    assert config["grpc_inference_address"] == config["grpc_management_address"] == LOOPBACK
    assert config["model_store"] == f"{KSERVE_ROOT}/model-store"
    assert config["metrics_config"] == f"{KSERVE_ROOT}/config/metrics.yaml"
    allowed = re.compile(config["allowed_urls"].replace("\\\\", "\\"))  # .properties unescaping
    assert allowed.match(f"file://{KSERVE_ROOT}/model-store/deq-small.mar")
    for url in ("file:///etc/passwd", "https://example.com/x.mar", f"file://{KSERVE_ROOT}/model-store/a/b.mar"):
        assert not allowed.match(url), url


# ---- the layout builder -------------------------------------------------------------------------
def _differing_keys(a: str, b: str):
    pa, pb = parse_properties(a), parse_properties(b)
    assert pa.keys() == pb.keys()
    return {k for k in pa if pa[k] != pb[k]}


def test_the_layout_builder_writes_config_metrics_and_archives(tmp_path, capsys):
    stale = tmp_path / "out" / "model-store" / "old.mar"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    parser = argparse.ArgumentParser()
    add_kserve_layout_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out")])
    assert run_kserve_layout(args) == 0
    out = tmp_path / "out"
    assert (out / "config" / "config.properties").read_text() == COMMITTED_CONFIG.read_text()
    assert (out / "config" / "metrics.yaml").read_bytes() == DEFAULT_METRICS.read_bytes()
    log_config = ElementTree.fromstring((out / "config" / "log4j2.xml").read_text())
    assert [a.tag for a in log_config.find("Appenders")] == ["Console"], "logs go to stdout, no files in the pod"
    archives = sorted(p.name for p in (out / "model-store").iterdir())
    assert archives == sorted(f"{archive_name(m, lane)}.mar" for m in DEFAULT_MODELS for lane in LANE_DEFAULTS)
    for name in archives:
        assert (out / "model-store" / name).read_bytes() == (DEFAULT_STORE / name).read_bytes()
    printed = capsys.readouterr().out
    assert f"/data/{PVC_SUBPATH}" in printed and "kubectl apply -k serving/k8s" in printed
    # elsewhere (the integration test below) only the paths and ports may differ
    moved = build_layout(tmp_path / "moved", root=str(tmp_path / "moved"), ports=Ports.free(), host=LOOPBACK)
    changed = _differing_keys(COMMITTED_CONFIG.read_text(), moved[0].read_text())
    assert changed == {
        "inference_address", "management_address", "metrics_address", "grpc_inference_port",
        "grpc_management_port", "model_store", "allowed_urls", "metrics_config",
    }  # fmt: skip


def test_the_layout_command_names_a_missing_archive(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_kserve_layout_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--store", str(tmp_path)])
    assert run_kserve_layout(args) == 1
    assert "deq-small.mar is not in" in capsys.readouterr().err


# ---- the KServe config in a real TorchServe ------------------------------------------------------
def _post(url, body: bytes, content_type: str):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body.startswith((b"{", b"[")) else body


def _wait_ready(probe: list, proc, log_dir, timeout=240.0):
    """Run the manifest's readiness probe command until it passes (the server's logs on failure)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"TorchServe exited with {proc.returncode}: {_tail(log_dir)}")
        last = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        if last.returncode == 0:
            return
        time.sleep(1.0)
    pytest.fail(f"readiness probe still failing after {timeout:.0f} s: {last.stderr[-500:]} {_tail(log_dir)}")


def _tail(log_dir: Path) -> str:
    logs = [p.read_text(errors="replace")[-1500:] for p in sorted(log_dir.glob("*.log"))]
    return "\n".join(logs)


@pytest.mark.slow
def test_the_kserve_config_serves_in_torchserve(tmp_path):
    """The layout with /mnt/models and the ports rewritten (listeners on 127.0.0.1), started with the
    ServingRuntime's own arguments; the readiness probe script, /ping, both request paths and metrics."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17")
    torchserve = find_executable("torchserve", "pip install torchserve==0.12.0")
    layout, run, ports = tmp_path / "mnt-models", tmp_path / "run", Ports.free()
    build_layout(layout, root=str(layout), ports=ports, host=LOOPBACK)
    (run / "logs").mkdir(parents=True)
    container = _runtime_container()
    args = [a.replace(KSERVE_ROOT, str(layout)) for a in container["args"]]
    assert args[0] == "torchserve"
    env = {**os.environ, **{e["name"]: e["value"].replace("/tmp", str(run)) for e in container["env"]}}
    env.update(TMPDIR=str(_short_tmp(run)), LOG_LOCATION=str(run / "logs"), METRICS_LOCATION=str(run / "logs"))
    for key in ("TS_CONFIG_FILE", "TS_DISABLE_TOKEN_AUTHORIZATION"):
        env.pop(key, None)  # the pod sets neither
    with open(run / "logs" / "console.log", "ab") as console:
        proc = subprocess.Popen(
            [torchserve, *args[1:]], cwd=run, env=env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True
        )
    base, metrics = f"http://{LOOPBACK}:{ports.inference}", f"http://{LOOPBACK}:{ports.metrics}"
    ServerInfo(proc.pid, str(run), base, f"http://{LOOPBACK}:{ports.management}", metrics, [], "").save()
    try:
        probe = [a.replace(KSERVE_ROOT, str(layout)) for a in container["readinessProbe"]["exec"]["command"]]
        assert probe[0] == "python"
        before = subprocess.run([sys.executable, *probe[1:]], capture_output=True, text=True, timeout=30)
        assert before.returncode == 1, "ready before TorchServe answered"
        _wait_ready([sys.executable, *probe[1:]], proc, run / "logs")
        status, body = http_get(base + container["livenessProbe"]["httpGet"]["path"])  # no token: auth is off
        assert status == 200 and json.loads(body)["status"] == "Healthy"
        image = EXAMPLE.read_bytes()
        status, answer = _post(f"{base}/predictions/deq-small", image, "image/png")
        assert status == 200 and answer["label"] == "ship", answer
        encoded = json.dumps({"image": base64.b64encode(image).decode()}).encode()
        status, v1 = _post(f"{base}/v1/models/deq-small:predict", encoded, "application/json")
        assert status == 200 and v1["label"] == answer["label"], v1
        # KServe v1's {"instances": [...]} reaches the handler unchanged, as one request with two inputs
        instances = json.dumps({"instances": [{"data": base64.b64encode(image).decode()}] * 2}).encode()
        status, v1 = _post(f"{base}/v1/models/deq-small:predict", instances, "application/json")
        assert status == 200 and [p["label"] for p in v1["predictions"]] == [answer["label"]] * 2, v1
        status, text = http_get(metrics + "/metrics")
        assert status == 200
        assert re.search(r'robustdeq_requests_total\{ModelName="deq-small",Mode="off"', text.decode()), text[:500]
        status, _ = _post(f"http://{LOOPBACK}:{ports.management}/models?url=x.mar", b"", "text/plain")
        assert status == 405, "the model registration API must be off"
        written = sorted(p.name for p in run.rglob("*.log"))
        assert written == ["console.log"], f"--log-config should keep TorchServe's logs on stdout: {written}"
    finally:
        stop_server(run, log=lambda *_: None)
