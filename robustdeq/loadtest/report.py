"""The load test's Markdown report and its plots (latency vs. load, soak timeline, batching)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .machine import load_lines

__all__ = ["render_markdown", "write_plots"]


def _ms(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def _stats_table(rows: Sequence[Dict[str, Any]], with_stage: bool = False) -> List[str]:
    head = "| stage | users | " if with_stage else "| "
    lines = [
        head + "request type | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|" + "---:|---:|" * with_stage + "---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        prefix = f"| {r['stage']} | {r['users']} | " if with_stage else "| "
        lines.append(
            prefix + f"{r['name']} | {r['requests']} | {r['failures']} | {r['throughput']:.1f} | "
            f"{_ms(r['p50_ms'])} | {_ms(r['p95_ms'])} | {_ms(r['p99_ms'])} | {_ms(r['max_ms'])} |"
        )
    return lines


def _footer(section: Dict[str, Any]) -> List[str]:
    """CPU cores each party used on average during the run, and the commonest failures."""
    lines = [""]
    cpu = section.get("cpu_cores")
    if cpu:
        lines.append("- CPU cores used on average: " + ", ".join(f"{who} {cores:.2f}" for who, cores in cpu.items()))
    reasons = section.get("failure_reasons") or {}
    return lines + [f"- failure: {n} x {why}" for why, n in reasons.items()]


def _breakdown(b: Optional[Dict[str, Any]], in_process: Optional[Dict[str, Any]] = None) -> List[str]:
    """Where a served plain request's time goes (server_clocks.latency_parts), as a table."""
    if not b:
        return []
    rows = [
        ("the client's latency (Locust)", b["client_ms"], ""),
        ("outside the frontend's clock", b["outside_frontend_ms"], "HTTP in and out, loopback, Locust"),
        ("queued in the frontend", b["queue_ms"], "waiting for the worker and for the batch to fill"),
        ("worker round trip", b["worker_round_trip_ms"], "frontend to Python worker and back, batch of the request"),
        ("of which the handler", b["handler_ms"], "decode, solve, answer, metrics"),
        ("of which socket and TorchServe's Python plumbing", b["ipc_and_plumbing_ms"], ""),
    ]
    lines = [
        "",
        f"**Where a request's time goes** ({b['users']} closed-loop plain users, {b['seconds']:.0f} s, "
        f"{b['client']['throughput']:.0f} req/s, mean batch {b['mean_batch_size']:.1f}; means per request "
        "from TorchServe's and the handler's counters):",
        "",
        "| part | ms | what it holds |",
        "|---|---:|---|",
        *[f"| {name} | {ms:.2f} | {what} |" for name, ms, what in rows],
        "",
        (
            f"The plain worker was busy {b['worker_busy']:.0%} of the time, its handler {b['handler_busy']:.0%}."
            if b.get("workers", 1) == 1
            else f"Each of the {b['workers']} plain workers was busy {b['worker_busy']:.0%} of the time on average, "
            f"its handler {b['handler_busy']:.0%}."
        ),
    ]
    if in_process:
        batch_ms = in_process["batch_ms"]
        lines.append(
            f"In-process with {in_process.get('worker_threads', 1)} thread(s), a full batch of "
            f"{in_process['batch_size']} takes {batch_ms:.2f} ms; served batches of "
            f"{b['mean_batch_size']:.1f} took {b['handler_ms']:.2f} ms in the handler and "
            f"{b['worker_round_trip_ms']:.2f} ms round trip."
        )
    return lines


_PROTOCOL_NAMES = {"own": "project's own body (a PNG)", "oip": "OIP v2 JSON (a base64 BYTES image)"}


def _side_by_side(rows: Optional[Sequence[Dict[str, Any]]]) -> List[str]:
    """The runtimes table of ``--also``: each server's saturation against the same in-process reference."""
    if not rows:
        return []
    out = [
        "",
        "## Runtimes side by side (the saturation ramp, same payloads and answer checks, one server at a time)",
        "",
        "| server | requests | saturated req/s | x in-process | at users | p50 | p99 | mean batch | failed "
        "| others' cores during it |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['ratio_to_in_process']:.2f}" if r.get("ratio_to_in_process") else "-"
        batch = f"{r['mean_batch_size']:.1f}" if r.get("mean_batch_size") else "-"
        others = (r.get("machine") or {}).get("others_cores")
        out.append(
            f"| {r['runtime']} | {r['protocol']} | {r['saturated_throughput']:.0f} | {ratio} "
            f"| {r['saturated_at_users']} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {batch} | {r['failures']} "
            f"| {'-' if others is None else f'{others:.2f}'} |"
        )
    return out


def render_markdown(results: Dict[str, Any], plots: Sequence[Path] = ()) -> str:
    lines = [
        f"# Load test: {results['model']} ({results['scenario']})",
        "",
        f"- date {results['date']}, {results['cpus']} CPUs, shared by Locust, the TorchServe frontend and the workers",
        f"- command: `{results['command']}`",
        f"- payloads: {results['payloads']['images']} CIFAR-10 test images, each answer checked against the "
        f"library's label ({results['payloads']['dropped_near_ties']} near-ties left out)",
        "- percentiles: nearest rank over every recorded request (not Locust's rounded buckets)",
        *load_lines(results.get("machine")),
    ]
    server = results.get("server")
    if server:
        lines.insert(3, f"- server: {server['runtime']}, requests in the {_PROTOCOL_NAMES[server['protocol']]}")
    verdicts = results.get("verdicts") or {}
    if verdicts:
        lines += ["", "## Targets", "", "| target | measured | goal | verdict |", "|---|---:|---|---|"]
        for key, v in verdicts.items():
            value = v["value"]
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} | {v['target']} | {'PASS' if v['pass'] else 'FAIL'} |")
    ip = results.get("in_process")
    if ip:
        lines += [
            "",
            "## In-process handler (same archive, TorchServe's request plumbing, no server)",
            "",
            f"{ip['samples_per_s']:.0f} samples/s at batch {ip['batch_size']} with {ip.get('threads', 1)} thread(s), "
            "the reference of the saturation target"
            + (
                " ("
                + "; ".join(
                    f"{t} thread(s): {r['samples_per_s']:.0f} samples/s, {r['batch_ms']:.2f} ms per batch"
                    for t, r in ip["by_threads"].items()
                )
                + f"; medians of {ip['rounds']} interleaved rounds of {ip['repeats']} batches)"
                if ip.get("by_threads")
                else f" ({ip['batch_ms']:.2f} ms per batch, median of {ip['repeats']})"
            ),
        ]
    sat = results.get("saturation")
    if sat:
        mean_batch = sat.get("mean_batch_size")
        lines += [
            "",
            "## Saturation (closed-loop plain users)",
            "",
            f"Saturated throughput {sat['saturated_throughput']:.0f} req/s at {sat['saturated_at_users']} users; "
            + (f"mean served batch {mean_batch:.1f}." if mean_batch else "mean batch unknown."),
            "",
            *_stats_table(sat["stages"], with_stage=True),
            *_footer(sat),
            *_breakdown(sat.get("breakdown"), ip),
        ]
    lines += _side_by_side(results.get("side_by_side"))
    dfd = results.get("defended")
    if dfd:
        lines += ["", "## Defended traffic (closed loop)", "", *_stats_table(dfd["stages"], True), *_footer(dfd)]
    iso = results.get("isolation")
    if iso:
        rows = [
            {**iso["plain_alone"], "name": "plain, alone"},
            {**iso["plain_with_defended"], "name": "plain, with defended"},
            {**iso["defended"], "name": iso["defended"]["name"] + ", mixed in"},
        ]
        lines += [
            "",
            f"## Isolation (plain at {iso['plain_rate_target']:.0f} req/s = 50% of saturation; then defended "
            f"T_f=2 R=10 offered beside it at {iso['defended_rate_target']:.0f} req/s = "
            f"{iso['defended_fraction']:.0%} of requests)",
            "",
            *_stats_table(rows),
            "",
            f"Plain p99 changes {iso['p99_ratio']:.2f}x with the defended traffic; the defended lane answered "
            f"{iso['defended']['throughput']:.1f} req/s ({iso['defended_share_achieved']:.1%} of all answers).",
            *_footer(iso),
        ]
    s = results.get("soak")
    if s:
        lines += [
            "",
            f"## Soak ({s['seconds']:.0f} s of plain requests at {s['rate_target']:.0f} req/s = 70% of saturation)",
            "",
            *_stats_table([s["plain"]]),
            *_footer(s),
        ]
    if results.get("smoke"):
        smoke = results["smoke"]
        lines += [
            "",
            "## Smoke",
            "",
            *_stats_table(smoke["overall"]),
            *_footer(smoke),
            *_breakdown(smoke.get("breakdown")),
        ]
    if results.get("batching"):
        lines += [
            "",
            "## Plain-lane batching (saturation per configuration)",
            "",
            "| batchSize | maxBatchDelay ms | workers | in-process samples/s (threads) | server req/s | ratio | "
            "mean batch | p50 ms | p99 ms | CPU cores: locust / frontend / workers |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for b in results["batching"]:
            lane = b["plain_lane"]
            mb = b["mean_batch_size"]
            lines.append(
                f"| {lane['batch_size']} | {lane['max_batch_delay_ms']} | {lane.get('workers', 1)} | "
                f"{b['in_process_samples_per_s']:.0f} ({b.get('in_process_threads', 1)}) | "
                f"{b['saturated_throughput']:.0f} | {b['ratio']:.2f} | {'-' if mb is None else f'{mb:.1f}'} | "
                f"{_ms(b['p50_ms_at_saturation'])} | {_ms(b['p99_ms_at_saturation'])} | "
                + " / ".join(f"{c:.2f}" for c in (b.get("cpu_cores") or {}).values())
                + " |"
            )
    if plots:
        lines += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    lines += ["", f"Took {results.get('seconds', 0):.0f} s."]
    return "\n".join(lines)


def _lane_label(lane: Dict[str, Any]) -> str:
    workers = lane.get("workers", 1)
    return f"{lane['batch_size']}/{lane['max_batch_delay_ms']}ms" + (f" x{workers}" if workers > 1 else "")


def write_plots(results: Dict[str, Any], out: Path) -> List[Path]:
    """latency_vs_load.png (saturation ramp + soak timeline) and batching.png when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sat, soak = results.get("saturation"), results.get("soak")
    if sat or soak:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        ax = axes[0]
        if sat:
            rows = sat["stages"]
            x = [r["throughput"] for r in rows]
            for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^-")):
                ax.plot(x, [r[key] for r in rows], style, label=key.split("_")[0])
            for r in rows:
                ax.annotate(f"{r['users']}u", (r["throughput"], r["p99_ms"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
            ip = results.get("in_process")
            if ip:
                ax.axvline(ip["samples_per_s"], color="gray", ls=":", label="in-process")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        ax.set(xlabel="achieved plain throughput (req/s)", ylabel="latency (ms)", title="latency vs. load")
        ax = axes[1]
        if soak:
            t = soak["timeline"]
            ax.plot(t["t_s"], t["p99_ms"], "-", label="p99 (10 s slices)")
            ax2 = ax.twinx()
            ax2.plot(t["t_s"], t["requests_per_s"], color="tab:green", alpha=0.6, label="req/s")
            ax2.set_ylabel("req/s")
            ax.legend(loc="upper left", fontsize=8)
        ax.set(xlabel="seconds", ylabel="p99 latency (ms)", title="soak at 70% of saturation")
        fig.tight_layout()
        path = out / "latency_vs_load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if results.get("batching"):
        rows = results["batching"]
        labels = [_lane_label(b["plain_lane"]) for b in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(labels, [b["saturated_throughput"] for b in rows], color="tab:blue", label="server req/s")
        ax.plot(labels, [b["in_process_samples_per_s"] for b in rows], "k^--", label="in-process samples/s")
        ax.set(xlabel="plain lane batchSize / maxBatchDelay (workers)", ylabel="throughput",
               title="batching configuration")  # fmt: skip
        ax2 = ax.twinx()
        ax2.plot(labels, [b["p99_ms_at_saturation"] for b in rows], "ro-", label="p99 ms at saturation")
        ax2.set_ylabel("p99 ms")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        path = out / "batching.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
