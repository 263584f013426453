"""The run folder of a ``robustdeq serve`` instance, read with the standard library only.

``server.json`` (pid, addresses, models) and TorchServe's ``key_file.json`` (the tokens) are
what the client, the health check and ``robustdeq stop`` need (the KServe runtime's
``runtime.json`` and key file, what its health check needs); keeping them here, free of
torch, lets a container health check run in milliseconds.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

# ``.serve`` in the current directory, or $ROBUSTDEQ_RUN_DIR (set in the Docker image).
DEFAULT_RUN_DIR = Path(os.environ.get("ROBUSTDEQ_RUN_DIR") or ".serve")
#: what ``make serve`` loads: the long-trained default DEQ and the LyaDEQ of its size and recipe
#: (archive.SHIPPED); the tiny archives stay in model_store/ as a fast lane (``--models deq-tiny``).
#: Kept here, free of torch, so that the Locust processes can name the default without importing it.
DEFAULT_MODELS = ("deq-small", "lyadeq-small")

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_RUN_DIR",
    "ServerError",
    "ServerInfo",
    "read_server_info",
    "KSERVE_INFO",
    "write_kserve_info",
    "read_kserve_info",
    "pid_alive",
    "read_keys",
    "http_get",
    "unready_models",
    "parse_properties",
]


class ServerError(RuntimeError):
    """The server could not be started, reached or stopped; the message says why."""


@dataclass
class ServerInfo:
    pid: int
    run_dir: str
    inference_url: str
    management_url: str
    metrics_url: str
    models: List[str]
    key_file: str
    started: float = field(default_factory=time.time)

    def save(self) -> None:
        Path(self.run_dir, "server.json").write_text(json.dumps(asdict(self), indent=1) + "\n")


def read_server_info(run_dir: Path = DEFAULT_RUN_DIR) -> Optional[ServerInfo]:
    path = Path(run_dir) / "server.json"
    if not path.is_file():
        return None
    return ServerInfo(**json.loads(path.read_text()))


#: the KServe runtime's record in its run folder (``RUN_DIR/kserve`` under ``robustdeq serve``)
KSERVE_INFO = "runtime.json"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_kserve_info(run_dir: Path, url: str, grpc: Optional[str], models: List[str]) -> Path:
    """What the health check needs of a running KServe runtime: its pid, REST address (loopback
    for 0.0.0.0), gRPC address and models."""
    path = Path(run_dir) / KSERVE_INFO
    info = {"pid": os.getpid(), "url": url.replace("0.0.0.0", "127.0.0.1"), "grpc": grpc, "models": models}
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path


def read_kserve_info(run_dir: Path = DEFAULT_RUN_DIR) -> Optional[Dict]:
    """The record of a KServe runtime that is still running from ``run_dir`` (or its ``kserve/``
    subfolder, where ``robustdeq serve --runtime kserve`` puts it), with ``folder`` added; None if none."""
    for folder in (Path(run_dir) / "kserve", Path(run_dir)):
        path = folder / KSERVE_INFO
        if path.is_file():
            info = json.loads(path.read_text())
            if pid_alive(int(info["pid"])):
                return {**info, "folder": str(folder)}
    return None


def read_keys(run_dir: Path = DEFAULT_RUN_DIR, wait: float = 2.0) -> Dict[str, str]:
    """``{"management", "inference", "api"}`` keys from TorchServe's key_file.json (waiting up
    to ``wait`` seconds while TorchServe is still writing it)."""
    path = Path(run_dir) / "key_file.json"
    if not path.is_file():
        raise ServerError(f"no key file at {path}: is the server running from {run_dir}?")
    deadline = time.monotonic() + wait
    while True:
        try:
            data = json.loads(path.read_text())
            break
        except ValueError:
            if time.monotonic() > deadline:
                raise ServerError(f"the key file {path} is not valid JSON") from None
            time.sleep(0.1)
    return {
        "management": data["management"]["key"],
        "inference": data["inference"]["key"],
        "api": data.get("API", {}).get("key", ""),
    }


def http_get(url: str, token: Optional[str] = None, timeout: float = 5.0) -> "tuple[int, bytes]":
    """GET with an optional bearer token -> (status, body); connection errors give status 0."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def unready_models(info: ServerInfo, management_key: str, models: Optional[List[str]] = None) -> List[str]:
    """The registrations (default: all of ``info.models``) without a READY worker, asked of the
    management API. TorchServe's ``/ping`` says Healthy while workers are still loading."""
    pending = []
    for name in info.models if models is None else models:
        status, body = http_get(f"{info.management_url}/models/{name}", management_key)
        workers = json.loads(body)[0].get("workers", []) if status == 200 else []
        if not any(w.get("status") == "READY" for w in workers):
            pending.append(name)
    return pending


def parse_properties(text: str) -> Dict[str, str]:
    """``key=value`` lines of a Java properties file such as TorchServe's config.properties."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out
