"""``robustdeq health``: is the server in a run folder answering? (the Docker HEALTHCHECK).

It reads the address from ``server.json`` and the inference token from TorchServe's
``key_file.json`` (the key changes at every start, so it cannot be baked into a probe), then
calls ``/ping``. Standard library only: ``python -m robustdeq.serving.health`` takes tens of
milliseconds, not the second that importing torch would cost every probe interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Tuple

from .runfolder import DEFAULT_RUN_DIR, ServerError, http_get, read_keys, read_server_info, unready_models

__all__ = ["check_health", "add_health_arguments", "run_health", "main"]


def check_health(run_dir: Path = DEFAULT_RUN_DIR, url: Optional[str] = None, timeout: float = 5.0) -> Tuple[bool, str]:
    """(healthy, message): ``GET /ping`` with the inference token answers 200 and status Healthy, and
    (when the run folder lists its models) every model has a READY worker."""
    info = read_server_info(Path(run_dir))
    if url is None:
        if info is None:
            return False, f"no server.json in {Path(run_dir).resolve()}: the server has not started (yet)"
        url = info.inference_url
    try:
        keys = read_keys(Path(run_dir))
    except ServerError as exc:
        return False, str(exc)
    status, body = http_get(url.rstrip("/") + "/ping", keys["inference"], timeout)
    if status == 0:
        return False, f"{url}/ping: no answer within {timeout:g} s"
    try:
        answer = json.loads(body or b"{}")
    except ValueError:
        answer = {}
    state = answer.get("status", body[:200].decode(errors="replace"))
    if status != 200 or state != "Healthy":
        return False, f"{url}/ping: {status} {state}"
    loading = unready_models(info, keys["management"]) if info is not None else []
    if loading:
        return False, f"{url}/ping: Healthy, but no READY worker yet for {', '.join(loading)}"
    return True, f"{url}/ping: Healthy; {len(info.models) if info else 0} models ready"


def add_health_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir",
        default=str(DEFAULT_RUN_DIR),
        help="run folder of 'robustdeq serve' (default: $ROBUSTDEQ_RUN_DIR or .serve)",
    )
    parser.add_argument("--url", default=None, help="inference address (default: the one in server.json)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for /ping (default 5)")
    parser.add_argument("--quiet", action="store_true", help="print nothing; only the exit code")


def run_health(args: argparse.Namespace) -> int:
    healthy, message = check_health(Path(args.run_dir), args.url, args.timeout)
    if not args.quiet:
        print(("healthy: " if healthy else "unhealthy: ") + message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m robustdeq.serving.health",
        description="Exit 0 when the server of a run folder answers /ping with Healthy (inference token from "
        "its key_file.json), else 1 with the reason.",
    )
    add_health_arguments(parser)
    return run_health(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
