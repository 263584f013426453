"""The ``robustdeq loadtest`` command line."""

from __future__ import annotations

import argparse

from ..serving.runfolder import DEFAULT_MODELS
from .runner import RUNTIME_PROTOCOLS, SCENARIOS, run_loadtest
from .traffic import DEFAULT_DEFENDED_SETTINGS, PROTOCOLS

__all__ = ["add_loadtest_arguments", "run_loadtest"]


def add_loadtest_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Start TorchServe (or the KServe runtime) with the model's archives on free loopback ports, run Locust "
        "headless (loadtest/locustfile.py) with real CIFAR-10 test images whose answers are checked against the "
        "library, and write Locust's CSV/HTML reports, every request's latency, results.json, report.md (exact "
        "nearest-rank p50/p95/p99, throughput and failures per request type, the targets) and plots. "
        "'full' runs saturation, defended, isolation and soak (about 12 minutes); 'batching' compares "
        "plain-lane batching configurations."
    )
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--scenario", choices=SCENARIOS, default="full", help="what to run")
    p.add_argument(
        "--model", default=DEFAULT_MODELS[0], help="the model's endpoint name: MODEL.mar and MODEL-defended.mar"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="the model.pt behind the archives, which labels the payloads in-process (default: the shipped "
        "checkpoint of MODEL; needed for any other model, e.g. one built with 'robustdeq archive --name')",
    )
    p.add_argument(
        "--store", default=None, help="model store with MODEL.mar and MODEL-defended.mar (default: model_store/)"
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/loadtest/MODEL)")
    p.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                   help="closed-loop plain users per saturation stage")  # fmt: skip
    p.add_argument("--defended-users", type=int, nargs="+", default=[1, 2, 4],
                   help="closed-loop defended users per stage")  # fmt: skip
    p.add_argument("--defended", default=",".join(f"{s.T_f}:{s.R}" for s in DEFAULT_DEFENDED_SETTINGS),
                   help="defended request types as T_f:R pairs")  # fmt: skip
    p.add_argument("--stage-seconds", type=float, default=20.0, help="length of each ramp stage")
    p.add_argument("--settle", type=float, default=3.0, help="seconds at the start of a stage left out of its figures")
    p.add_argument("--isolation-seconds", type=float, default=60.0, help="length of each isolation stage")
    p.add_argument("--soak-seconds", type=float, default=300.0, help="length of the soak at 70%% of saturation")
    p.add_argument("--saturated-rate", type=float, default=None,
                   help="saturated plain req/s, for --scenario isolation or soak without a saturation run")  # fmt: skip
    p.add_argument("--plain-lanes", nargs="+",
                   default=["1,0,30,1", "4,5,30,1", "8,5,30,1", "16,5,30,1", "32,5,30,1", "16,5,30,2"],
                   help="batching scenario: plain-lane BATCH,DELAY_MS,TIMEOUT_S[,WORKERS] configurations")  # fmt: skip
    p.add_argument("--payloads", type=int, default=64, help="distinct test images sent")
    p.add_argument("--runtime", choices=tuple(RUNTIME_PROTOCOLS), default="torchserve",
                   help="the server: TorchServe or the KServe runtime (from its own environment)")  # fmt: skip
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="what requests speak: 'own' (a PNG to /predictions/MODEL, TorchServe only) or 'oip' (OIP v2 "
                   "JSON with a BYTES image); default: own on TorchServe, oip on kserve")  # fmt: skip
    p.add_argument("--also", nargs="+", default=[], metavar="RUNTIME:PROTOCOL",
                   help="after the main scenario, the saturation ramp on these servers too, side by side in the "
                   "report (e.g. torchserve:oip kserve:oip)")  # fmt: skip
