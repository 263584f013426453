"""``robustdeq loadtest``: start a server, run Locust headless, report exact figures.

Scenarios (each is one Locust run against the same server, with its own CSV/HTML):

* ``saturation``: closed-loop plain users 1, 2, 4, ... (no think time); the saturated
  throughput is the best stage, compared with the in-process throughput of the same
  handler at the plain lane's batch size (``InProcessWorker``: TorchServe's own request
  plumbing without the frontend, the socket hop and HTTP);
* ``defended``: closed-loop defended users over several T_f/R settings;
* ``isolation``: plain requests paced at 50% of saturation, alone, then with defended
  T_f=2, R=10 requests mixed in (10% of all requests) at the same plain rate;
* ``soak``: plain requests paced at 70% of saturation for five minutes;
* ``batching``: the saturation ramp once per plain-lane batching configuration (archives
  rebuilt into the output folder), to choose the shipped one;
* ``smoke``: seconds of plain and mixed traffic (the test suite runs it).

The server is TorchServe (``--runtime torchserve``, default) or the KServe runtime
(``--runtime kserve``); requests speak the project's own body or OIP v2 (``--protocol``).
``--also RUNTIME:PROTOCOL ...`` runs the saturation ramp on more servers after the main
scenario and puts them side by side in the report, each against the same in-process reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..data import PROJECT_ROOT
from .reference import in_process_reference, in_process_throughput
from .samples import Samples
from .server_clocks import BREAKDOWN_SERIES, latency_parts, mean_batch, metric_totals
from .traffic import DEFAULT_DEFENDED_SETTINGS, ENV, PLAIN, DefendedSetting, PayloadSet, Stage, build_payloads

LOCUSTFILE = PROJECT_ROOT / "loadtest" / "locustfile.py"
TARGETS = {"saturation_ratio": 0.8, "isolation_p99_ratio": 1.5, "soak_failures": 0}
MIXED = DefendedSetting(2, 10)

__all__ = ["run_loadtest", "run_locust", "in_process_throughput", "LoadTestRun", "SCENARIOS"]


@dataclass
class LoadTestRun:
    """The server and files one load test works with."""

    out: Path
    model: str
    url: str
    token: str
    payloads: Path
    metrics_url: str = ""
    settle: float = 3.0
    log: Callable[[str], None] = print
    server_pid: Optional[int] = None
    plain_workers: int = 1  # the plain archive's worker count (its model-config.yaml)
    runtime: str = "torchserve"
    protocol: str = "own"  # traffic.PROTOCOLS
    stop: Callable[[], None] = lambda: None


#: what each runtime speaks (traffic.PROTOCOLS): TorchServe both, the KServe runtime OIP v2 (and KServe v1)
RUNTIME_PROTOCOLS = {"torchserve": ("own", "oip"), "kserve": ("oip",)}


def parse_server(text: str) -> "tuple[str, str]":
    """``RUNTIME:PROTOCOL`` (or ``RUNTIME``, with its first protocol) -> (runtime, protocol)."""
    runtime, _, protocol = text.partition(":")
    if runtime not in RUNTIME_PROTOCOLS:
        raise ValueError(f"unknown runtime {runtime!r} in {text!r}: one of {', '.join(RUNTIME_PROTOCOLS)}")
    protocol = protocol or RUNTIME_PROTOCOLS[runtime][0]
    if protocol not in RUNTIME_PROTOCOLS[runtime]:
        raise ValueError(f"{runtime} does not speak {protocol!r}: use {', '.join(RUNTIME_PROTOCOLS[runtime])}")
    return runtime, protocol


def _server_cpu_seconds(pid: Optional[int]) -> Dict[str, float]:
    """Cumulative CPU seconds of the server's processes: TorchServe's Java frontend and Python
    workers, or the KServe runtime's one process (``runtime``: HTTP, decoding and the solves)."""
    import psutil

    out = {"frontend": 0.0, "workers": 0.0}
    if pid is None:
        return out
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        try:
            times, command = proc.cpu_times(), " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "java" in proc.name():
            out["frontend"] += times.user + times.system
        elif "model_service_worker" in command:
            out["workers"] += times.user + times.system
        elif "robustdeq.serving.kserve_runtime" in command:
            out["runtime"] = out.get("runtime", 0.0) + times.user + times.system
    return {k: v for k, v in out.items() if v or k != "runtime"}


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_locust(run: LoadTestRun, name: str, stages: Sequence[Stage], settings=DEFAULT_DEFENDED_SETTINGS) -> Samples:
    """One headless Locust run of ``stages``; writes ``name``_stats.csv, ``name``.html and
    ``name``.samples.csv into the output folder and returns the recorded samples."""
    prefix = run.out / name
    env = {
        **os.environ,
        ENV["payloads"]: str(run.payloads),
        ENV["stages"]: Stage.dump(stages),
        ENV["samples"]: f"{prefix}.samples.csv",
        ENV["model"]: run.model,
        ENV["token"]: run.token,
        ENV["defended"]: ",".join(f"{s.T_f}:{s.R}" for s in settings),
        ENV["protocol"]: run.protocol,
    }
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", run.url,
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary", "--loglevel", "WARNING",
        "--exit-code-on-error", "0", "--stop-timeout", "30",
    ]  # fmt: skip
    total = sum(s.duration for s in stages)
    run.log(f"[{name}] {len(stages)} stages, {total:.0f} s: " + ", ".join(_describe(s) for s in stages))
    server_before, locust_before, t0 = _server_cpu_seconds(run.server_pid), _children_cpu_seconds(), time.time()
    with open(f"{prefix}.locust.log", "w") as log_file:
        proc = subprocess.run(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=total + 180)
    wall = time.time() - t0
    server_after = _server_cpu_seconds(run.server_pid)
    if proc.returncode != 0 or not Path(f"{prefix}.samples.csv").is_file():
        tail = Path(f"{prefix}.locust.log").read_text()[-2000:]
        raise RuntimeError(f"locust run {name!r} failed (exit {proc.returncode}):\n{tail}")
    samples = Samples(f"{prefix}.samples.csv")
    # CPU cores used on average over the run, per party (they share this machine's CPUs)
    samples.cpu_cores = {
        "locust": (_children_cpu_seconds() - locust_before) / wall,
        **{k: (server_after[k] - server_before.get(k, 0.0)) / wall for k in server_after},
    }
    return samples


def _describe(stage: Stage) -> str:
    rate = "closed loop" if stage.rate is None else f"{stage.rate:.0f} req/s"
    return f"{stage.users} {stage.user} ({rate}, {stage.duration:.0f} s)"


def breakdown(run: LoadTestRun, users: int, seconds: float, name: str = "breakdown") -> Dict[str, Any]:
    """One closed-loop plain stage at ``users`` with the server's clocks read before and after:
    :func:`latency_parts` of the plain model, the client's figures and each party's CPU."""
    before = metric_totals(run.metrics_url, BREAKDOWN_SERIES)
    samples = run_locust(run, name, [Stage(seconds, users, "PlainUser")])
    after = metric_totals(run.metrics_url, BREAKDOWN_SERIES)
    client = samples.stats(PLAIN)  # window_s: first request sent to last answer received
    parts = latency_parts(before, after, run.model, client.mean_ms, client.window_s, run.plain_workers)
    return {"users": users, "seconds": seconds, **parts, "client": client.to_dict(), "cpu_cores": samples.cpu_cores}


def _stage_rows(samples: Samples, stages: Sequence[Stage], settle: float, names=None) -> List[Dict[str, Any]]:
    rows = []
    for index, stage in enumerate(stages):
        if index >= len(samples.stage_starts):
            break
        for name in names or samples.names:
            stats = samples.stats(name, index, settle)
            if stats.requests:
                rows.append({"stage": index, "users": stage.users, "user": stage.user, **stats.to_dict()})
    return rows


def _overall(samples: Samples) -> List[Dict[str, Any]]:
    return [samples.stats(name).to_dict() for name in samples.names]


# ---- scenarios --------------------------------------------------------------------------------
def saturation(
    run: LoadTestRun, users: Sequence[int], seconds: float, name: str = "saturation", with_breakdown: bool = True
) -> Dict[str, Any]:
    stages = [Stage(seconds, u, "PlainUser") for u in users]
    batch_series = ("robustdeq_batch_size_sum", "robustdeq_batch_size_count")
    before = metric_totals(run.metrics_url, batch_series)
    samples = run_locust(run, name, stages)
    after = metric_totals(run.metrics_url, batch_series)
    rows = _stage_rows(samples, stages, run.settle, [PLAIN])
    if not rows:
        raise ValueError(
            f"no plain request started after the {run.settle:.0f} s settle window of any {seconds:.0f} s stage; "
            "give --stage-seconds more than --settle"
        )
    best = max(rows, key=lambda r: r["throughput"])
    return {
        "stages": rows,
        "overall": _overall(samples),
        "saturated_throughput": best["throughput"],
        "saturated_at_users": best["users"],
        "mean_batch_size": mean_batch(before, after, run.model),
        "failure_reasons": samples.failure_reasons(),
        "cpu_cores": samples.cpu_cores,
        # where a request's time goes at the saturated load (one more stage at that user count; it reads
        # TorchServe's frontend clocks)
        "breakdown": breakdown(run, best["users"], seconds, f"{name}-breakdown") if with_breakdown else None,
    }


def defended(run: LoadTestRun, users: Sequence[int], seconds: float, settings) -> Dict[str, Any]:
    stages = [Stage(seconds, u, "DefendedUser") for u in users]
    samples = run_locust(run, "defended", stages, settings)
    return {
        "stages": _stage_rows(samples, stages, run.settle),
        "overall": _overall(samples),
        "failure_reasons": samples.failure_reasons(),
        "cpu_cores": samples.cpu_cores,
    }


def isolation(run: LoadTestRun, plain_rate: float, seconds: float, users: int = 32) -> Dict[str, Any]:
    """Plain p99 at ``plain_rate`` alone, then with defended T_f=2, R=10 requests offered beside
    it at 1/9 of the plain rate (10% of all requests). The two kinds are separate users, so the
    plain load stays the same; defended users wait for their answers, so when the defended
    lane saturates they send fewer than offered (the achieved share is reported)."""
    fraction = 0.1
    defended_rate = plain_rate * fraction / (1 - fraction)
    stages = [
        Stage(seconds, users, "PlainUser", plain_rate),
        Stage(seconds, users, "PlainUser", plain_rate, "DefendedUser", 16, defended_rate),
    ]
    samples = run_locust(run, "isolation", stages, settings=[MIXED])
    alone = samples.stats(PLAIN, 0, run.settle)
    mixed = samples.stats(PLAIN, 1, run.settle)
    defended_stats = samples.stats(MIXED.name, 1, run.settle)
    ratio = mixed.p99_ms / alone.p99_ms
    return {
        "plain_rate_target": plain_rate,
        "defended_rate_target": defended_rate,
        "defended_fraction": fraction,
        "defended_share_achieved": defended_stats.throughput / max(defended_stats.throughput + mixed.throughput, 1e-9),
        "plain_alone": alone.to_dict(),
        "plain_with_defended": mixed.to_dict(),
        "defended": defended_stats.to_dict(),
        "p99_ratio": ratio,
        "pass": ratio <= TARGETS["isolation_p99_ratio"],
        "failure_reasons": samples.failure_reasons(),
        "cpu_cores": samples.cpu_cores,
    }


def soak(run: LoadTestRun, rate: float, seconds: float, users: int = 32) -> Dict[str, Any]:
    stages = [Stage(seconds, users, "PlainUser", rate)]
    samples = run_locust(run, "soak", stages)
    stats = samples.stats(PLAIN)
    xs, p99, per_s = samples.timeline(PLAIN, bucket=10.0)
    return {
        "rate_target": rate,
        "seconds": seconds,
        "plain": stats.to_dict(),
        "timeline": {"t_s": xs.tolist(), "p99_ms": p99.tolist(), "requests_per_s": per_s.tolist()},
        "pass": stats.failures == TARGETS["soak_failures"] and stats.requests > 0,
        "failure_reasons": samples.failure_reasons(),
        "cpu_cores": samples.cpu_cores,
    }


def smoke(run: LoadTestRun, seconds: float = 6.0) -> Dict[str, Any]:
    stages = [
        Stage(seconds, 2, "PlainUser"),
        Stage(seconds, 2, "MixedUser"),
        Stage(seconds, 2, "PlainUser", 40.0, "DefendedUser", 1, 5.0),
    ]
    samples = run_locust(run, "smoke", stages, settings=[MIXED])
    return {
        "overall": _overall(samples),
        "stages": _stage_rows(samples, stages, 0.0),
        "failure_reasons": samples.failure_reasons(),
        "requests": len(samples),
        "cpu_cores": samples.cpu_cores,
        "breakdown": breakdown(run, 2, seconds, "smoke-breakdown"),
    }


SCENARIOS = ("full", "smoke", "saturation", "defended", "isolation", "soak", "batching")


# ---- orchestration ---------------------------------------------------------------------------
def _start(
    out: Path,
    run_dir: Path,
    model: str,
    store: Path,
    payloads: Path,
    settle: float,
    log,
    runtime: str = "torchserve",
    protocol: str = "own",
) -> LoadTestRun:
    """The server (TorchServe or the KServe runtime) with ``model``'s archives from ``store``, as the
    :class:`LoadTestRun` that drives it; ``run.stop()`` stops it."""
    from ..serving.archive import read_model_config

    workers = int(read_model_config(store / f"{model}.mar").get("minWorkers", 1))
    common = dict(payloads=payloads, settle=settle, log=log, runtime=runtime, protocol=protocol)
    if runtime == "kserve":
        from ..serving.kserve_runtime import launch
        from ..serving.server import Ports

        served = launch([model], store, run_dir, Ports.free().inference)
        return LoadTestRun(
            out, model, served.url, served.token, metrics_url=served.url, server_pid=served.pid, plain_workers=1,
            stop=served.stop, **common,
        )  # fmt: skip
    from ..serving.runfolder import read_keys
    from ..serving.server import Ports, start_server, stop_server

    info = start_server(run_dir, [model], store, Ports.free(), log=log)
    token = read_keys(run_dir)["inference"]
    return LoadTestRun(
        out, model, info.inference_url, token, metrics_url=info.metrics_url, server_pid=info.pid,
        plain_workers=workers, stop=lambda: stop_server(run_dir, log=lambda *_: None), **common,
    )  # fmt: skip


def _side_by_side(
    run: LoadTestRun, sat: Dict[str, Any], machine: Dict[str, Any], inproc: Optional[Dict[str, Any]]
) -> Dict[str, Any]:
    """One row of the runtimes table: a server's saturation beside the in-process reference."""
    best = next(r for r in sat["stages"] if r["users"] == sat["saturated_at_users"])
    reference = inproc["samples_per_s"] if inproc else None
    return {
        "runtime": run.runtime,
        "protocol": run.protocol,
        "saturated_throughput": sat["saturated_throughput"],
        "saturated_at_users": sat["saturated_at_users"],
        "ratio_to_in_process": sat["saturated_throughput"] / reference if reference else None,
        "p50_ms": best["p50_ms"],
        "p99_ms": best["p99_ms"],
        "failures": sum(r["failures"] for r in sat["stages"]),
        "mean_batch_size": sat["mean_batch_size"],
        "machine": machine,
    }


def _verdicts(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    sat, inproc = results.get("saturation"), results.get("in_process")
    if sat and inproc:
        ratio = sat["saturated_throughput"] / inproc["samples_per_s"]
        out["saturation"] = {
            "value": ratio,
            "target": f">= {TARGETS['saturation_ratio']}x in-process",
            "pass": ratio >= TARGETS["saturation_ratio"],
        }
    if results.get("soak"):
        s = results["soak"]
        out["soak"] = {"value": s["plain"]["failures"], "target": "0 failed requests", "pass": s["pass"]}
    if results.get("isolation"):
        i = results["isolation"]
        out["isolation"] = {
            "value": i["p99_ratio"],
            "target": f"plain p99 x <= {TARGETS['isolation_p99_ratio']}",
            "pass": i["pass"],
        }
    return out


def _batching(args, out: Path, payloads: PayloadSet, settings, log) -> List[Dict[str, Any]]:
    from ..serving.archive import build_archives, parse_lane_config

    lanes = {}
    for text in args.plain_lanes:
        lane = parse_lane_config(text)
        tag = f"b{lane.batch_size}-d{lane.max_batch_delay_ms}-w{lane.workers}"
        store = out / "batching" / tag / "store"
        build_archives(args.checkpoint, args.model, store, lane_configs={"plain": lane})
        lanes[tag] = (lane, store)
    # every in-process reference first, while no server runs: one left behind skews it
    references = {tag: in_process_reference(store / f"{args.model}.mar", payloads) for tag, (_, store) in lanes.items()}
    rows = []
    for tag, (lane, store) in lanes.items():
        inproc = references[tag]
        run_dir = out / "batching" / tag / "serve"
        run = _start(out / "batching" / tag, run_dir, args.model, store, out / "payloads.json", args.settle, log)
        try:
            sat = saturation(run, args.users, args.stage_seconds)
        finally:
            run.stop()
        best = next(r for r in sat["stages"] if r["users"] == sat["saturated_at_users"])
        rows.append(
            {
                "plain_lane": asdict(lane),
                "in_process_samples_per_s": inproc["samples_per_s"],
                "in_process_threads": inproc["threads"],
                "saturated_throughput": sat["saturated_throughput"],
                "ratio": sat["saturated_throughput"] / inproc["samples_per_s"],
                "p50_ms_at_saturation": best["p50_ms"],
                "p99_ms_at_saturation": best["p99_ms"],
                "mean_batch_size": sat["mean_batch_size"],
                "cpu_cores": sat["cpu_cores"],
                "stages": sat["stages"],
            }
        )
        log(f"[batching {tag}] {sat['saturated_throughput']:.0f} req/s, in-process {inproc['samples_per_s']:.0f}/s")
    return rows


def run_loadtest(args: argparse.Namespace) -> int:
    from ..serving.archive import DEFAULT_STORE, SHIPPED
    from .machine import MachineLoad
    from .report import render_markdown, write_plots

    log = print
    if args.checkpoint is None:
        if args.model not in SHIPPED:
            raise ValueError(
                f"unknown model {args.model!r}: the shipped ones are {', '.join(SHIPPED)}; "
                "for another model, give its --checkpoint"
            )
        args.checkpoint = SHIPPED[args.model]
    args.checkpoint = Path(args.checkpoint)
    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist")
    out = Path(args.out or f"runs/loadtest/{args.model}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = Path(args.store or DEFAULT_STORE).resolve()
    settings = DefendedSetting.parse_list(args.defended)
    started = datetime.now(timezone.utc)
    log(f"payloads: {args.payloads} CIFAR-10 test images labelled in-process (plain + {len(settings)} settings)")
    payloads = build_payloads(args.checkpoint, args.model, args.payloads, [*settings, MIXED])
    payloads.save(out / "payloads.json")
    results: Dict[str, Any] = {
        "model": args.model,
        "scenario": args.scenario,
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["robustdeq", "loadtest", *sys.argv[2:]]) if len(sys.argv) > 1 else "robustdeq loadtest",
        "cpus": os.cpu_count(),
        "payloads": {"images": len(payloads), "dropped_near_ties": payloads.dropped_near_ties},
        "store": str(store),
    }
    scenario = args.scenario
    if scenario == "batching":
        results["batching"] = _batching(args, out, payloads, settings, log)
    else:
        if scenario in ("full", "saturation"):
            results["in_process"] = ip = in_process_reference(store / f"{args.model}.mar", payloads)
            log(
                f"in-process handler: {ip['samples_per_s']:.0f} samples/s at batch {ip['batch_size']}, "
                f"{ip['threads']} thread(s)"
            )
        runtime, protocol = parse_server(f"{args.runtime}:{args.protocol or ''}")
        run = _start(out, out / "serve", args.model, store, out / "payloads.json", args.settle, log, runtime, protocol)
        results["server"] = {"runtime": runtime, "protocol": protocol}
        machine = MachineLoad()
        server_before = sum(_server_cpu_seconds(run.server_pid).values())
        try:
            if scenario == "smoke":
                results["smoke"] = smoke(run, args.stage_seconds)
            if scenario in ("full", "saturation"):
                results["saturation"] = saturation(
                    run, args.users, args.stage_seconds, with_breakdown=runtime != "kserve"
                )
            if scenario in ("full", "defended"):
                results["defended"] = defended(run, args.defended_users, args.stage_seconds, settings)
            saturated = args.saturated_rate or (results.get("saturation") or {}).get("saturated_throughput")
            if scenario in ("isolation", "soak") and not saturated:
                raise ValueError(f"--scenario {scenario} needs --saturated-rate (or run --scenario full)")
            if scenario in ("full", "isolation"):
                results["isolation"] = isolation(run, 0.5 * saturated, args.isolation_seconds)
            if scenario in ("full", "soak"):
                results["soak"] = soak(run, 0.7 * saturated, args.soak_seconds)
        finally:
            server_seconds = sum(_server_cpu_seconds(run.server_pid).values()) - server_before
            results["machine"] = machine.finish(server_seconds)
            run.stop()
        if results.get("saturation") and args.also:
            inproc = results.get("in_process")
            rows = [_side_by_side(run, results["saturation"], results["machine"], inproc)]
            for text in args.also:
                runtime, protocol = parse_server(text)
                tag = f"{runtime}-{protocol}"
                (out / tag).mkdir(parents=True, exist_ok=True)
                other = _start(out / tag, out / tag / "serve", args.model, store, out / "payloads.json", args.settle,
                               log, runtime, protocol)  # fmt: skip
                machine, before = MachineLoad(), sum(_server_cpu_seconds(other.server_pid).values())
                try:
                    sat = saturation(other, args.users, args.stage_seconds, with_breakdown=False)
                finally:
                    used = machine.finish(sum(_server_cpu_seconds(other.server_pid).values()) - before)
                    other.stop()
                rows.append(_side_by_side(other, sat, used, inproc))
                log(f"[{tag}] {sat['saturated_throughput']:.0f} req/s at {sat['saturated_at_users']} users")
            results["side_by_side"] = rows
    results["verdicts"] = _verdicts(results)
    results["seconds"] = (datetime.now(timezone.utc) - started).total_seconds()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots = write_plots(results, out)
    report = render_markdown(results, plots)
    (out / "report.md").write_text(report + "\n")
    print("\n" + report)
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'}, " + ", ".join(str(p) for p in plots))
    # the smoke run (the test suite's) fails the command on any failed request
    smoke_failures = sum(r["failures"] for r in (results.get("smoke") or {}).get("overall", []))
    return 1 if smoke_failures else 0
