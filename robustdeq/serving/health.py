"""``robustdeq health``: is the server answering, with every model loaded?

Two ways to find the server:
- a run folder of ``robustdeq serve`` (the Docker HEALTHCHECK): the address from ``server.json``
  and the keys from TorchServe's ``key_file.json`` (they change at every start, so they cannot
  be baked into a probe);
- ``--ts-config``: a TorchServe config.properties with a ``model_snapshot`` and token
  authorization off (the KServe pod's readiness probe, serving/k8s/).

Healthy means ``/ping`` answers Healthy *and* every model has a READY worker: TorchServe's
``/ping`` alone says Healthy while the workers are still loading. When the run folder holds a
running KServe runtime instead (``robustdeq serve --runtime kserve``), healthy means
``/v2/health/ready`` answers 200 and every model's ``/v2/models/<name>/ready`` says ready. Standard library only:
``python -m robustdeq.serving.health`` takes tens of milliseconds, not the second that
importing torch would cost every probe interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Tuple

from .runfolder import (
    DEFAULT_RUN_DIR,
    ServerError,
    ServerInfo,
    http_get,
    parse_properties,
    read_keys,
    read_kserve_info,
    read_server_info,
    unready_models,
)

__all__ = ["check_health", "add_health_arguments", "run_health", "main"]


def config_server_info(ts_config: Path) -> ServerInfo:
    """Addresses and models of a config.properties with a ``model_snapshot`` (loopback for 0.0.0.0)."""
    props = parse_properties(Path(ts_config).read_text())
    if "model_snapshot" not in props:
        raise ServerError(f"{ts_config} has no model_snapshot: which models should be ready?")

    def local(key: str) -> str:
        return props[key].replace("0.0.0.0", "127.0.0.1")

    models = list(json.loads(props["model_snapshot"])["models"])
    return ServerInfo(0, str(Path(ts_config).parent), local("inference_address"), local("management_address"),
                      local("metrics_address"), models, key_file="")  # fmt: skip


def check_health(
    run_dir: Path = DEFAULT_RUN_DIR, url: Optional[str] = None, timeout: float = 5.0, ts_config: Optional[Path] = None
) -> Tuple[bool, str]:
    """(healthy, message): ``GET /ping`` answers 200 Healthy and every model has a READY worker."""
    try:
        if ts_config is not None:
            info, keys = config_server_info(Path(ts_config)), {"inference": None, "management": None}
        else:
            kserve = read_kserve_info(Path(run_dir))
            if kserve is not None:
                return _kserve_health(kserve, url, timeout)
            info = read_server_info(Path(run_dir))
            if info is None:
                return False, f"no server.json in {Path(run_dir).resolve()}: the server has not started (yet)"
            keys = read_keys(Path(run_dir))
    except (ServerError, OSError, ValueError) as exc:
        return False, str(exc)
    url = (url or info.inference_url).rstrip("/")
    status, body = http_get(url + "/ping", keys["inference"], timeout)
    if status == 0:
        return False, f"{url}/ping: no answer within {timeout:g} s"
    try:
        answer = json.loads(body or b"{}")
    except ValueError:
        answer = {}
    state = answer.get("status", body[:200].decode(errors="replace"))
    if status != 200 or state != "Healthy":
        return False, f"{url}/ping: {status} {state}"
    loading = unready_models(info, keys["management"])
    if loading:
        return False, f"{url}/ping: Healthy, but no READY worker yet for {', '.join(loading)}"
    return True, f"{url}/ping: Healthy; {len(info.models)} models ready"


def _kserve_health(info, url: Optional[str], timeout: float) -> Tuple[bool, str]:
    """The KServe runtime: ``/v2/health/ready`` and each model's ``/v2/models/<name>/ready``."""
    url = (url or info["url"]).rstrip("/")
    status, _ = http_get(url + "/v2/health/ready", None, timeout)
    if status != 200:
        return False, f"{url}/v2/health/ready: " + ("no answer" if status == 0 else f"{status}")
    token = read_keys(Path(info["folder"]))["inference"]
    for model in info["models"]:
        status, body = http_get(f"{url}/v2/models/{model}/ready", token, timeout)
        try:
            ready = status == 200 and json.loads(body).get("ready") is True
        except ValueError:
            ready = False
        if not ready:
            return False, f"{url}/v2/models/{model}/ready: {status} {body[:200].decode(errors='replace')}"
    return True, f"{url}/v2/health/ready: ready; {len(info['models'])} models ready (KServe runtime)"


def add_health_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Read the address and the keys from the run folder (or --ts-config), call /ping and ask the "
        "management API for a READY worker per model; exit 0 when both hold and 1 otherwise (with the reason). "
        "Like 'python -m robustdeq.serving.health', it does not import torch."
    )
    parser.add_argument(
        "--run-dir",
        default=str(DEFAULT_RUN_DIR),
        help="run folder of 'robustdeq serve' (default: $ROBUSTDEQ_RUN_DIR or .serve)",
    )
    parser.add_argument(
        "--ts-config",
        default=None,
        metavar="PATH",
        help="instead of a run folder: a TorchServe config.properties with a model_snapshot and token "
        "authorization off (the KServe pod: /mnt/models/config/config.properties)",
    )
    parser.add_argument("--url", default=None, help="inference address (default: the one in server.json)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for /ping (default 5)")
    parser.add_argument("--quiet", action="store_true", help="print nothing; only the exit code")


def run_health(args: argparse.Namespace) -> int:
    healthy, message = check_health(Path(args.run_dir), args.url, args.timeout, args.ts_config)
    if not args.quiet:
        print(("healthy: " if healthy else "unhealthy: ") + message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robustdeq.serving.health")
    add_health_arguments(parser)
    parser.description = (
        "Exit 0 when the server of a run folder answers /ping with Healthy (inference token from "
        "its key_file.json), else 1 with the reason."
    )
    return run_health(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
