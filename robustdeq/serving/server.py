"""``robustdeq serve`` / ``robustdeq stop``: TorchServe with the shipped archives, on loopback.

The server runs from a *run folder* (default ``.serve`` in the current directory) that
holds everything of one instance: the rendered ``config.properties``, TorchServe's
``key_file.json`` (the tokens; TorchServe writes it into its working directory), the
logs, a private temporary folder (TorchServe's pid file and worker sockets, so two
instances never collide) and ``server.json`` (pid, addresses, models) for the client and
for ``robustdeq stop``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

from ..data import PROJECT_ROOT
from ..executables import find_executable
from .archive import DEFAULT_STORE, archive_name
from .runfolder import (
    DEFAULT_MODELS,
    DEFAULT_RUN_DIR,
    ServerError,
    ServerInfo,
    http_get,
    parse_properties,
    pid_alive,
    read_keys,
    read_server_info,
    unready_models,
)

DEFAULT_CONFIG = PROJECT_ROOT / "serving" / "config.properties"
DEFAULT_METRICS = PROJECT_ROOT / "serving" / "metrics.yaml"
LOOPBACK = "127.0.0.1"
_SOCKET_PATH_LIMIT = 90  # AF_UNIX paths are limited to 108 bytes; TorchServe appends /.ts.sock.NNNN

__all__ = ["Ports", "render_config", "start_server", "stop_server", "DEFAULT_MODELS"]


@dataclass
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071

    @classmethod
    def free(cls) -> "Ports":
        """Five ports the OS reports free on 127.0.0.1 now (for test and load-test servers)."""
        import socket

        socks = [socket.socket() for _ in range(5)]
        try:
            for sock in socks:
                sock.bind(("127.0.0.1", 0))
            return cls(*(sock.getsockname()[1] for sock in socks))
        finally:
            for sock in socks:
                sock.close()


def allowed_urls(store: str) -> str:
    """TorchServe's ``allowed_urls``: only ``.mar`` files directly inside ``store`` (a Java regex,
    escaped once more for the .properties value)."""
    return "^file://" + re.escape(store).replace("\\", "\\\\") + "/[^/]+\\\\.mar$"


def render_config(
    template: Path,
    store: Path,
    registrations: List[str],
    ports: Ports,
    metrics_config: Path,
    system_metrics: bool,
    java_tmpdir: Optional[Path] = None,
    host: str = LOOPBACK,
    gpus: Optional[int] = None,
) -> str:
    """The template with addresses, absolute paths and the models to load filled in.

    ``host`` is where the inference and metrics listeners (and gRPC inference) bind: loopback by
    default, ``0.0.0.0`` inside a container whose ports are published. The management API
    always stays on loopback. ``gpus`` sets ``number_of_gpu`` (None: TorchServe's default,
    every visible GPU; 0: CPU workers only)."""
    text = Path(template).read_text()
    store = Path(store).resolve()
    overrides = {
        "inference_address": f"http://{host}:{ports.inference}",
        "management_address": f"http://{LOOPBACK}:{ports.management}",
        "metrics_address": f"http://{host}:{ports.metrics}",
        "grpc_inference_address": host,
        "grpc_management_address": LOOPBACK,
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_port": str(ports.grpc_management),
        "model_store": str(store),
        "allowed_urls": allowed_urls(str(store)),
        "load_models": ",".join(f"{r}.mar" for r in registrations),
        "metrics_config": str(Path(metrics_config).resolve()),
        "disable_system_metrics": "false" if system_metrics else "true",
    }
    if gpus is not None:
        overrides["number_of_gpu"] = str(int(gpus))
    if java_tmpdir is not None:
        overrides["vmargs"] = f"{parse_properties(text).get('vmargs', '')} -Djava.io.tmpdir={java_tmpdir}".strip()
    lines, seen = [], set()
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
        if key in overrides:
            lines.append(f"{key}={overrides[key]}")
            seen.add(key)
        else:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    return "\n".join(lines) + "\n"


def registrations_for(models: List[str], store: Path, lanes: tuple = ("plain", "defended")) -> List[str]:
    """Archive names to load: each model's plain lane and its ``-defended`` lane."""
    names = []
    for model in models:
        for lane in lanes:
            name = archive_name(model, lane)
            if not (Path(store) / f"{name}.mar").is_file():
                raise ServerError(
                    f"archive {name}.mar is not in {store}; build it with `robustdeq archive` or `make archives`"
                )
            names.append(name)
    return names


def _java_ok() -> None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise ServerError("TorchServe needs Java 17: install a JDK/JRE 17 (e.g. apt install openjdk-17-jre-headless)")


def _pid_alive(pid: int) -> bool:
    _reap(pid)
    return pid_alive(pid)


def _ports_free(ports: Ports, host: str = LOOPBACK) -> None:
    """Fail early, naming the port, when one of them is taken (on ``host`` or on loopback)."""
    import socket

    for name, port in asdict(ports).items():
        where = LOOPBACK if name in ("management", "grpc_management") else host
        with socket.socket() as sock:
            try:
                sock.bind((where, port))
            except OSError:
                flag = "--grpc-ports" if name.startswith("grpc") else f"--{name}-port"
                raise ServerError(f"{name} port {port} on {where} is in use; choose another with {flag}") from None


def _short_tmp(run_dir: Path) -> Path:
    tmp = run_dir / "tmp"
    if len(str(tmp.resolve())) > _SOCKET_PATH_LIMIT:
        tmp = Path(tempfile.mkdtemp(prefix="rdeq-"))
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp.resolve()


def start_server(
    run_dir: Path = DEFAULT_RUN_DIR,
    models: Optional[List[str]] = None,
    store: Path = DEFAULT_STORE,
    ports: Optional[Ports] = None,
    template: Path = DEFAULT_CONFIG,
    metrics_config: Path = DEFAULT_METRICS,
    timeout: float = 300.0,
    log=print,
    host: str = LOOPBACK,
    console_to_stdout: bool = False,
    gpus: Optional[int] = None,
) -> ServerInfo:
    """Start TorchServe in the background and wait until every model has a ready worker.

    TorchServe's console output goes to ``logs/console.log`` in the run folder, or to this
    process's stdout with ``console_to_stdout`` (a container's log)."""
    run_dir = Path(run_dir).resolve()
    models = list(models or DEFAULT_MODELS)
    ports = ports or Ports()
    existing = read_server_info(run_dir)
    if existing and _pid_alive(existing.pid):
        raise ServerError(f"a server from {run_dir} is already running (pid {existing.pid}); `robustdeq stop` first")
    _java_ok()
    _ports_free(ports, host)
    registrations = registrations_for(models, store)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "key_file.json").unlink(missing_ok=True)
    try:
        import pynvml  # noqa: F401

        system_metrics = True
    except ImportError:
        system_metrics = False
    tmp = _short_tmp(run_dir)
    config = render_config(template, store, registrations, ports, metrics_config, system_metrics, tmp, host, gpus)
    (run_dir / "config.properties").write_text(config)
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "LOG_LOCATION": str(run_dir / "logs"),
        "METRICS_LOCATION": str(run_dir / "logs"),
        "TS_DISABLE_TOKEN_AUTHORIZATION": "false",
        # forward JSON bodies undecoded: the handler parses them strictly (robustdeq.serving.inputs)
        "TS_DECODE_INPUT_REQUEST": "false",
    }
    env.pop("TS_CONFIG_FILE", None)
    try:
        torchserve = find_executable("torchserve", "pip install torchserve==0.12.0 pyyaml")
    except FileNotFoundError as exc:
        raise ServerError(str(exc)) from None
    cmd = [
        torchserve,
        "--start",
        "--foreground",
        "--ncs",
        "--ts-config",
        str(run_dir / "config.properties"),
        "--model-store",
        str(Path(store).resolve()),
    ]
    console = None if console_to_stdout else open(run_dir / "logs" / "console.log", "ab")
    proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
    info = ServerInfo(
        pid=proc.pid,
        run_dir=str(run_dir),
        inference_url=f"http://{LOOPBACK}:{ports.inference}",
        management_url=f"http://{LOOPBACK}:{ports.management}",
        metrics_url=f"http://{LOOPBACK}:{ports.metrics}",
        models=registrations,
        key_file=str(run_dir / "key_file.json"),
    )
    info.save()
    try:
        wait_ready(info, proc, timeout, log)
    except BaseException:
        stop_server(run_dir, log=lambda *_: None)
        raise
    return info


def sigterm_as_interrupt() -> None:
    """Make SIGTERM (``docker stop``, a Kubernetes pod shutdown) raise KeyboardInterrupt like Ctrl-C,
    so that a foreground ``robustdeq serve`` stops TorchServe's process group before it exits, also
    while it is still starting."""

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)


def wait_until_stopped(info: ServerInfo, poll: float = 1.0) -> int:
    """Block while the server runs (``robustdeq serve --foreground``); Ctrl-C (or SIGTERM after
    :func:`sigterm_as_interrupt`) stops TorchServe's whole process group. Returns 0 after such a
    stop, 1 when TorchServe died by itself."""
    try:
        while _pid_alive(info.pid):
            _reap(info.pid)
            time.sleep(poll)
        return 1
    except KeyboardInterrupt:
        stop_server(Path(info.run_dir))
        return 0


def wait_ready(info: ServerInfo, proc: Optional[subprocess.Popen], timeout: float, log=print) -> None:
    """Poll until the key file exists, /ping is healthy and every model has a READY worker."""
    deadline = time.monotonic() + timeout
    pending = list(info.models)
    log(f"starting TorchServe (pid {info.pid}), waiting for {len(pending)} models: {', '.join(pending)}")
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"TorchServe exited with code {proc.returncode}; see {info.run_dir}/logs/")
        failure = _worker_failure(Path(info.run_dir) / "logs" / "model_log.log")
        if failure:
            raise ServerError(f"model workers keep dying: {failure}; see {info.run_dir}/logs/model_log.log")
        if Path(info.key_file).is_file():
            keys = read_keys(Path(info.run_dir))
            pending = unready_models(info, keys["management"], pending)
            if not pending:
                status, body = http_get(f"{info.inference_url}/ping", keys["inference"])
                if status == 200:
                    return
        time.sleep(0.5)
    raise ServerError(f"models not ready after {timeout:.0f} s: {pending}; see {info.run_dir}/logs/")


def _worker_failure(model_log: Path, repeats: int = 3) -> Optional[str]:
    """The last error line of the model log once workers died ``repeats`` times, else None."""
    if not model_log.is_file():
        return None
    text = model_log.read_text(errors="replace")
    if text.count("Backend worker process died") < repeats:
        return None
    errors = re.findall(r"MODEL_LOG - (\w*(?:Error|Exception)\b.*)", text)
    return errors[-1].strip() if errors else "no error message in the log"


def stop_server(run_dir: Path = DEFAULT_RUN_DIR, timeout: float = 30.0, log=print) -> bool:
    """Stop the instance of ``run_dir`` (its whole process group); False when none ran."""
    info = read_server_info(Path(run_dir))
    if info is None or not _pid_alive(info.pid):
        log(f"no server running from {Path(run_dir).resolve()}")
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(info.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(info.pid):
            _reap(info.pid)
            time.sleep(0.2)
        if not _group_alive(info.pid):
            break
    log(f"stopped TorchServe (pid {info.pid}) from {info.run_dir}")
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
