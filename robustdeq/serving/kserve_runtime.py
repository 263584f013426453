"""``robustdeq serve --runtime kserve``: the shipped archives under KServe's Python ModelServer.

A thin adapter, like ``handlers/robustdeq_handler.py`` is for TorchServe: the model work is
``robustdeq.serving.engine.InferenceEngine``, the protocols are ``robustdeq.serving.protocols``.

* each archive (``model_store/<name>.mar``, plain and ``-defended`` lanes) is extracted into the
  run folder and loaded with ``InferenceEngine.from_model_dir`` from its ``model-config.yaml``;
  :class:`RobustDEQModel` is KServe's ``Model`` (load / preprocess / predict / postprocess);
* KServe serves OIP v2 REST (``/v2/health/ready``, ``/v2/models/<name>``, ``/v2/models/<name>/ready``,
  ``/v2/models/<name>/infer``) and KServe v1 (``/v1/models/<name>:predict``); both bodies go
  through ``protocols.decode``, the same limits and per-request options (body, parameters or
  ``X-`` headers) as under TorchServe;
* KServe's ModelServer has no authentication and binds ``0.0.0.0``: this module binds the REST
  listener to ``--bind`` (127.0.0.1 by default) and adds a bearer-token check to every path but
  :data:`OPEN_PATHS` (``/``, ``/v2/health/live``, ``/v2/health/ready`` for the probes, ``/metrics``
  like TorchServe's metrics port); a missing token gets 401, a wrong one 403.
  ``--no-auth`` leaves authentication to the cluster edge (docs/serving.md);
* OIP v2 over gRPC (``inference.GRPCInferenceService``) on ``--grpc-port``, bound to the same
  address and token-checked the same way (``robustdeq.serving.kserve_grpc``);
* a bad request gets its 4xx JSON error (``{"error", "reason", "status"}``), never a 5xx.

KServe 0.21 pins protobuf < 7, so it runs from its own virtual environment layered over the
project's (docs/serving.md, "KServe runtime"); :func:`runtime_python` finds it.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import secrets
import socket
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

__all__ = [
    "OPEN_PATHS",
    "extract_archive",
    "handler_section",
    "runtime_python",
    "write_token",
    "exec_kserve",
    "launch",
    "RuntimeProcess",
    "main",
]

LOOPBACK = "127.0.0.1"
#: paths open without the token: the probes, and /metrics (as TorchServe's metrics port)
OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/metrics"})
TOKEN_FILE = "key_file.json"
#: where the layered KServe environment lives by default (relative to the project root)
DEFAULT_VENV = Path(".cache") / "kserve-venv"


# ---- files: archives, token, the runtime's Python (no kserve, no torch needed) ------------------
def extract_archive(mar: Path, dest: Path) -> Path:
    """Extract a ``.mar`` (a zip) into ``dest/<archive name>`` and return that folder."""
    out = Path(dest) / Path(mar).stem
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(mar) as zf:
        for member in zf.namelist():  # zipfile strips '..' and absolute parts; refuse them anyway
            if member.startswith("/") or ".." in Path(member).parts:
                raise ValueError(f"{mar}: unsafe member path {member!r}")
        zf.extractall(out)
    return out


def handler_section(model_dir: Path) -> Dict[str, Any]:
    """The ``handler`` section of an extracted archive's ``model-config.yaml``."""
    import yaml

    path = Path(model_dir) / "model-config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return dict((config or {}).get("handler") or {})


def write_token(run_dir: Path, token: Optional[str] = None) -> Tuple[str, Path]:
    """The inference token (``token``, $ROBUSTDEQ_TOKEN or a fresh one), written to
    ``run_dir/key_file.json`` (mode 0600) in TorchServe's key-file layout, so that
    ``runfolder.read_keys`` and ``robustdeq predict`` find it."""
    token = token or os.environ.get("ROBUSTDEQ_TOKEN") or secrets.token_urlsafe(24)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"inference": {"key": token}, "management": {"key": token}}, fh)
    return token, path


def runtime_python(project_root: Optional[Path] = None) -> Optional[str]:
    """The Python that can import kserve: $ROBUSTDEQ_KSERVE_PYTHON, the layered venv under
    ``.cache/kserve-venv``, or this one; None when none can."""
    import subprocess

    root = Path(project_root or Path(__file__).resolve().parents[2])
    candidates = [
        os.environ.get("ROBUSTDEQ_KSERVE_PYTHON"),
        str(root / DEFAULT_VENV / "bin" / "python"),
        sys.executable,
    ]
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", "import kserve, torch"], capture_output=True, timeout=120)
        if probe.returncode == 0:
            return python
    return None


class RuntimeProcess:
    """A KServe runtime started in the background by :func:`launch` (the load test's second server)."""

    def __init__(self, proc, url: str, token: str, log_path: Path):
        self.proc, self.url, self.token, self.log_path = proc, url, token, log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch(
    models: List[str],
    store: Path,
    run_dir: Path,
    http_port: int,
    grpc_port: int = 0,
    timeout: float = 180.0,
    env: Optional[Dict[str, str]] = None,
) -> RuntimeProcess:
    """Start the runtime on loopback in the background (from :func:`runtime_python`), wait until
    ``/v2/health/ready`` answers 200, and return it with its URL and token; its console goes to
    ``run_dir/runtime.log``. Raises RuntimeError when it exits or is not ready in ``timeout`` s."""
    import subprocess

    from .runfolder import http_get

    python = runtime_python()
    if python is None:
        raise RuntimeError(f"no Python with kserve found: set ROBUSTDEQ_KSERVE_PYTHON or build {DEFAULT_VENV}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[2])
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, full_env.get("PYTHONPATH")]))
    cmd = [python, "-m", "robustdeq.serving.kserve_runtime", "--models", ",".join(models), "--store", str(store)]
    cmd += ["--run-dir", str(run_dir), "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    log_path = run_dir / "runtime.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    url = f"http://{LOOPBACK}:{http_port}"
    deadline = time.monotonic() + timeout
    while http_get(url + "/v2/health/ready", timeout=2)[0] != 200:
        if proc.poll() is not None:
            raise RuntimeError(f"the KServe runtime exited ({proc.returncode}); see {log_path}")
        if time.monotonic() > deadline:
            RuntimeProcess(proc, url, "", log_path).stop()
            raise RuntimeError(f"the KServe runtime was not ready in {timeout:.0f} s; see {log_path}")
        time.sleep(0.25)
    token = json.loads((run_dir / TOKEN_FILE).read_text())["inference"]["key"]
    return RuntimeProcess(proc, url, token, log_path)


# ---- the server (needs kserve) -----------------------------------------------------------------
def _oip_body(request) -> Dict[str, Any]:
    """KServe's parsed ``InferRequest`` back to the OIP JSON body ``protocols.decode`` reads."""
    inputs = []
    for tensor in request.inputs:
        item: Dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
        if tensor.data is not None:
            item["data"] = tensor.data
        if tensor.parameters:
            item["parameters"] = dict(tensor.parameters)
        inputs.append(item)
    body: Dict[str, Any] = {"inputs": inputs}
    if request.id is not None:
        body["id"] = request.id
    if request.parameters:
        body["parameters"] = dict(request.parameters)
    if request.request_outputs:
        body["outputs"] = [{"name": o.name} for o in request.request_outputs]
    return body


def build_model_class():
    """KServe's ``Model`` subclass (built here so that importing this module needs no kserve)."""
    import kserve
    import yaml

    from .engine import InferenceEngine
    from .microbatch import MicroBatcher
    from .oip import INPUTS, OUTPUTS
    from .options import RequestError
    from .protocols import decode

    class RobustDEQModel(kserve.Model):
        """One archive (one lane) behind KServe's load / preprocess / predict / postprocess."""

        def __init__(self, name: str, model_dir: Path):
            super().__init__(name)
            self.model_dir = Path(model_dir)
            self.engine: Optional[InferenceEngine] = None
            self.batcher: Optional[MicroBatcher] = None

        def load(self) -> bool:
            self.engine = InferenceEngine.from_model_dir(
                str(self.model_dir), handler_section(self.model_dir), "cpu", self.name
            )
            config = yaml.safe_load((self.model_dir / "model-config.yaml").read_text()) or {}
            rows, delay_ms = int(config.get("batchSize", 1)), float(config.get("maxBatchDelay", 0))
            workers = int(config.get("minWorkers", 1))  # TorchServe's worker processes; solver threads here
            self.batcher = MicroBatcher(self._solve, rows, delay_ms / 1000.0, workers)
            logger.info("RobustDEQ %s loaded, lane %s, batches of up to %d within %g ms, %d at a time",
                        self.name, self.engine.limits.lane, rows, delay_ms, workers)  # fmt: skip
            self.ready = True
            return self.ready

        async def get_input_types(self) -> List[Dict[str, Any]]:
            shape = [-1, *self.engine.input_shape]
            return [{"name": "image", "datatype": INPUTS["image"], "shape": [-1]},
                    {"name": "array", "datatype": INPUTS["array"], "shape": shape}]  # fmt: skip

        async def get_output_types(self) -> List[Dict[str, Any]]:
            return [{"name": name, "datatype": datatype, "shape": [-1]} for name, datatype, _ in OUTPUTS]

        def preprocess(self, payload, headers: Optional[Dict[str, str]] = None):
            """The body (KServe v1 dict or OIP ``InferRequest``) -> (protocols.Request, options)."""
            engine, headers = self.engine, dict(headers or {})
            arrived = time.perf_counter()
            _frontend("ts_inference_requests_total", self.name, 1)
            value = payload if isinstance(payload, (dict, list, str, bytes)) else _oip_body(payload)
            limits = engine.limits
            try:
                request = decode(value, "application/json", engine.input_shape, limits.max_image_side,
                                 limits.max_image_pixels, headers)  # fmt: skip
                if request.protocol == "describe":
                    return request, [], arrived
                return request, request.options(headers, engine), arrived
            except RequestError as err:
                _observe(self.name, [], [err], 0.0)
                raise
            except Exception:  # a payload the decoder did not foresee is still the client's
                logger.exception("a request could not be decoded")
                err = RequestError(400, "undecodable_request", "the request could not be decoded")
                _observe(self.name, [], [err], 0.0)
                raise err from None

        def _solve(self, items):
            """One batch of requests (``MicroBatcher``): one ``engine.predict`` call, answers split back."""
            import torch

            start = time.perf_counter()
            for *_, queued in items:  # the wait between arriving at the lane's queue and this batch
                _frontend("ts_queue_latency_microseconds", self.name, (start - queued) * 1e6)
            xs = [x for inputs, _, _ in items for x in inputs]
            options = [o for _, opts, _ in items for o in opts]
            try:
                answers, _ = self.engine.predict(torch.stack(xs), options)
            except RequestError:
                raise
            except Exception:
                logger.exception("%s: the model failed on a batch", self.name)
                raise RequestError(500, "internal_error", "the model failed on this request (see the log)") from None
            _observe(self.engine.name, answers, [], time.perf_counter() - start)
            out, at = [], 0
            for inputs, _, _ in items:
                out.append(answers[at : at + len(inputs)])
                at += len(inputs)
            return out

        async def predict(self, decoded, headers=None, response_headers=None):
            request, options, arrived = decoded
            if request.protocol == "describe":
                return self.engine.describe()
            # batched with concurrent requests of this lane, as TorchServe's batchSize / maxBatchDelay
            queued = time.perf_counter()
            answers = await self.batcher.submit((request.inputs, options, queued), rows=len(request.inputs))
            _frontend("ts_inference_latency_microseconds", self.name, (time.perf_counter() - arrived) * 1e6)
            response = request.respond(answers, self.engine)
            if request.protocol == "oip-v2" and "id" not in response:  # KServe's response model requires one
                response = {"id": str(uuid.uuid4()), **response}
            return response

        def postprocess(self, result, headers=None, response_headers=None):
            return result

    return RobustDEQModel


_PROM: Dict[str, Any] = {}


#: TorchServe's frontend counters, kept by this runtime with TorchServe's names, labels and meaning, so
#: that the dashboard, the alerts and the autoscaler rule that read them work unchanged (docs/serving.md)
FRONTEND_COUNTERS = {
    "ts_inference_requests_total": "Requests that reached the model's lane (errors included)",
    "ts_queue_latency_microseconds": "Total time requests waited for their batch, in microseconds",
    "ts_inference_latency_microseconds": "Total time from arrival at the lane to the answer, in microseconds",
}


_HOSTNAME = socket.gethostname()  # the counters' hostname label, looked up once


def _frontend(name: str, model: str, value: float) -> None:
    try:
        import prometheus_client as prom

        metric = _PROM.get(name)
        if metric is None:
            labels = ["model_name", "model_version", "hostname"]
            # prometheus-client appends _total to a Counter's samples; TorchServe's microsecond counters have
            # none, so those are kept as gauges that only grow (rate() reads both alike)
            if name.endswith("_total"):
                metric = prom.Counter(name.removesuffix("_total"), FRONTEND_COUNTERS[name], labels)
            else:
                metric = prom.Gauge(name, FRONTEND_COUNTERS[name], labels)
            _PROM[name] = metric
        metric.labels(model, "default", _HOSTNAME).inc(value)
    except Exception:  # metrics must never fail a request
        logger.exception("could not record metrics")


def _observe(model: str, answers, rejected, elapsed: float) -> None:
    """The project's metrics (``robustdeq.serving.metrics``, same names and labels) on KServe's
    Prometheus registry, served at ``/metrics`` next to KServe's own."""
    try:
        import prometheus_client as prom

        from .metrics import METRICS, observations

        specs = {m.name: m for m in METRICS}
        for name, value, dims in observations(model, answers, rejected, elapsed, len(answers)):
            if name == "robustdeq_batch_size" and not answers:
                continue
            spec, metric = specs[name], _PROM.get(name)
            if metric is None:
                cls = {"counter": prom.Counter, "gauge": prom.Gauge, "histogram": prom.Histogram}[spec.kind]
                metric = _PROM[name] = cls(name, spec.help, labelnames=list(spec.dimensions))
            labelled = metric.labels(*[str(v) for v in dims])
            getattr(labelled, {"counter": "inc", "gauge": "set", "histogram": "observe"}[spec.kind])(value)
    except Exception:  # metrics must never fail a request
        logger.exception("could not record metrics")


class _Guard:
    """Pure ASGI middleware in front of KServe's app (a Starlette ``BaseHTTPMiddleware`` costs an
    extra task and stream per request: two of them took a third of the event loop at saturation):

    * an OIP ``/infer`` request without the binary extension's header is JSON whatever its
      Content-Type (tritonclient sends none; KServe would take the body for binary tensors);
    * with a token, the bearer check (constant-time) on every path but :data:`OPEN_PATHS`:
      none gets 401, a wrong one 403, in the project's JSON error shape."""

    def __init__(self, app, token: Optional[str] = None):
        self.app = app
        self.expected = None if token is None else f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        if scope["method"] == "POST" and scope["path"].endswith("/infer"):
            if not any(k == b"inference-header-content-length" for k, _ in headers):
                headers = [(k, v) for k, v in headers if k != b"content-type"]
                headers.append((b"content-type", b"application/json"))
                scope = {**scope, "headers": headers}
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            sent = next((v for k, v in headers if k == b"authorization"), None)
            if not sent:
                body = {"error": "missing token: send 'Authorization: Bearer <token>'", "reason": "unauthorized",
                        "status": 401}  # fmt: skip
                return await _json(send, 401, body, [(b"www-authenticate", b"Bearer")])
            if not hmac.compare_digest(sent, self.expected):
                return await _json(send, 403, {"error": "invalid token", "reason": "forbidden", "status": 403})
        return await self.app(scope, receive, send)


async def _json(send, status: int, body: Dict[str, Any], headers=()) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _install_auth_and_errors(app, token: Optional[str]) -> None:
    """The :class:`_Guard` middleware, and the project's JSON error shape for ``RequestError``."""
    from fastapi.responses import JSONResponse

    from .options import RequestError

    async def request_error(request, exc: RequestError):
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    app.add_exception_handler(RequestError, request_error)
    app.add_middleware(_Guard, token=token)


def _bind_rest_server(host: str) -> None:
    """KServe's RESTServer hard-codes host 0.0.0.0: bind it to ``host`` instead. It also leaves out
    KServe's timing middleware, which logs a line of timings per request (a tenth of the event
    loop at saturation; the project's latency histograms and the ``ts_*`` counters measure the same)."""
    import kserve.model_server as model_server

    base = model_server.RESTServer

    class BoundRESTServer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.host = host

        def _add_middlewares(self, app):
            pass

    model_server.RESTServer = BoundRESTServer


def add_kserve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="deq-small,lyadeq-small", help="models (each with its -defended lane)")
    p.add_argument("--store", default="model_store")
    p.add_argument("--run-dir", default=".serve-kserve", help="run folder: extracted archives and the token file")
    p.add_argument("--http-port", type=int, default=8085)
    p.add_argument("--grpc-port", type=int, default=8086, help="OIP v2 gRPC port (default 8086; 0: no gRPC)")
    p.add_argument("--bind", default=LOOPBACK, help="REST and gRPC listener address (default 127.0.0.1)")
    p.add_argument("--lanes", default="plain,defended")
    p.add_argument(
        "--no-auth", action="store_true", help="no token check: authentication is the cluster edge's (docs/serving.md)"
    )


def archives_for(models: List[str], store: Path, lanes: Tuple[str, ...]) -> List[Path]:
    out = []
    for model in models:
        for lane in lanes:
            name = model if lane == "plain" else f"{model}-{lane}"
            mar = Path(store) / f"{name}.mar"
            if not mar.is_file():
                raise FileNotFoundError(f"no archive {mar} (build it with 'robustdeq archive --shipped')")
            out.append(mar)
    return out


def exec_kserve(args: argparse.Namespace) -> int:
    """``robustdeq serve --runtime kserve``: replace this process with the runtime, started from
    the Python that has kserve (:func:`runtime_python`), with the serve command's models, store,
    inference port, first gRPC port and bind address; its files go to ``RUN_DIR/kserve`` (a TorchServe started from
    the same run folder keeps its own key file)."""
    python = runtime_python()
    if python is None:
        print(
            "robustdeq serve: error: no Python with kserve found: set ROBUSTDEQ_KSERVE_PYTHON or build "
            f"{DEFAULT_VENV} (docs/serving.md, 'KServe runtime')",
            file=sys.stderr,
        )
        return 1
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    argv = [python, "-m", "robustdeq.serving.kserve_runtime", "--models", args.models, "--store", str(args.store)]
    argv += ["--run-dir", str(Path(args.run_dir) / "kserve"), "--http-port", str(args.inference_port)]
    argv += ["--grpc-port", str(args.grpc_ports[0]), "--bind", args.bind]
    sys.stdout.flush()
    os.execv(python, argv)
    return 0  # not reached


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="robustdeq serve --runtime kserve", description=__doc__.split("\n")[0])
    add_kserve_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    import kserve
    import kserve.model_server as model_server

    from .runfolder import write_kserve_info

    run_dir = Path(args.run_dir)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    lanes = tuple(x.strip() for x in args.lanes.split(",") if x.strip())
    mars = archives_for(models, Path(args.store), lanes)
    token = None
    if not args.no_auth:
        token, path = write_token(run_dir)
        print(f"token in {path} (inference.key)", flush=True)
    _bind_rest_server(args.bind)
    if args.grpc_port:
        from .kserve_grpc import grpc_server_class

        model_server.GRPCServer = grpc_server_class(args.bind, token)
    _install_auth_and_errors(model_server.app, token)
    model_cls = build_model_class()
    served = []
    for mar in mars:
        model = model_cls(mar.stem, extract_archive(mar, run_dir / "models"))
        model.load()
        served.append(model)
    grpc_note = f" and grpc://{args.bind}:{args.grpc_port}" if args.grpc_port else ""
    names = ", ".join(m.name for m in served)
    grpc_address = f"{args.bind}:{args.grpc_port}" if args.grpc_port else None
    write_kserve_info(run_dir, f"http://{args.bind}:{args.http_port}", grpc_address, [m.name for m in served])
    print(f"KServe ModelServer on http://{args.bind}:{args.http_port}{grpc_note}: {names}", flush=True)
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port or 8081,
        enable_grpc=bool(args.grpc_port),
        workers=1,
        enable_latency_logging=False,  # a log line per request; the metrics carry the latencies
    )
    server.start(served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
