"""The Prometheus metrics the handler exports, and what each request contributes to them.

TorchServe drops any custom metric that ``serving/metrics.yaml`` does not declare, and
its histograms use fixed buckets from 0.005 to 10: times are recorded in seconds and
entropies in nats (ln 10 = 2.30 for a uniform guess over CIFAR-10). This module is the
one list of names; ``serving/metrics.yaml`` is rendered from it (``render_model_metrics``)
and a test keeps the two equal. Nothing here imports TorchServe: the handler forwards
the observations to ``context.metrics``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from .options import RequestError

__all__ = ["Metric", "METRICS", "FRONTEND_METRICS", "observations", "entropy_band", "render_metrics_yaml"]


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter | gauge | histogram
    unit: str
    dimensions: Tuple[str, ...]
    help: str


_MODE = ("ModelName", "Mode")
METRICS: Tuple[Metric, ...] = (
    Metric("robustdeq_requests_total", "counter", "Count", _MODE, "answered requests per mode (off / on / gated)"),
    Metric("robustdeq_handler_latency_seconds", "histogram", "Seconds", _MODE, "handler time of the request's batch"),
    Metric("robustdeq_solve_seconds", "histogram", "Seconds", _MODE, "plain fixed-point solve of the request's batch"),
    Metric("robustdeq_defense_seconds", "histogram", "Seconds", _MODE, "Algorithm 1 time, for requests it ran on"),
    Metric("robustdeq_prediction_entropy", "histogram", "Nats", _MODE, "entropy at the readout state (Eq. 6)"),
    Metric(
        "robustdeq_prediction_entropy_band_total",
        "counter",
        "Count",
        ("ModelName", "Mode", "Band"),
        "requests per 0.25-nat entropy band (TorchServe's fixed histogram buckets are too coarse for 0..2.3)",
    ),
    Metric(
        "robustdeq_entropy_reduction", "histogram", "Nats", _MODE, "entropy lowered by the defense at the readout state"
    ),
    Metric("robustdeq_defended_requests_total", "counter", "Count", _MODE, "requests on which Algorithm 1 ran"),
    Metric(
        "robustdeq_gated_through_requests_total",
        "counter",
        "Count",
        ("ModelName",),
        "gated requests answered without the defense (entropy under the threshold)",
    ),
    Metric(
        "robustdeq_high_entropy_inputs_total",
        "counter",
        "Count",
        _MODE,
        "inputs whose plain entropy exceeds the card's gate threshold (likely perturbed)",
    ),
    Metric("robustdeq_solver_residual", "histogram", "Ratio", _MODE, "relative residual at the readout state"),
    Metric("robustdeq_batch_size", "histogram", "Count", ("ModelName",), "requests per handled batch"),
    Metric(
        "robustdeq_rejected_requests_total",
        "counter",
        "Count",
        ("ModelName", "Reason", "Status"),
        "requests answered with an error, by reason (4xx: the request; 500 internal_error: the model)",
    ),
)
_BY_NAME = {m.name: m for m in METRICS}

#: TorchServe's own frontend metrics kept on the metrics port (name, kind, unit, dimensions)
FRONTEND_METRICS: Tuple[Tuple[str, str, str, Tuple[str, ...]], ...] = (
    ("ts_inference_requests_total", "counter", "Count", ("model_name", "model_version", "hostname")),
    ("ts_inference_latency_microseconds", "counter", "Microseconds", ("model_name", "model_version", "hostname")),
    ("ts_queue_latency_microseconds", "counter", "Microseconds", ("model_name", "model_version", "hostname")),
    ("Requests2XX", "counter", "Count", ("Level", "Hostname")),
    ("Requests4XX", "counter", "Count", ("Level", "Hostname")),
    ("Requests5XX", "counter", "Count", ("Level", "Hostname")),
    ("QueueTime", "gauge", "Milliseconds", ("Level", "Hostname")),
    ("WorkerThreadTime", "gauge", "Milliseconds", ("Level", "Hostname")),
    ("WorkerLoadTime", "gauge", "Milliseconds", ("WorkerName", "Level", "Hostname")),
    ("CPUUtilization", "gauge", "Percent", ("Level", "Hostname")),
    ("MemoryUsed", "gauge", "Megabytes", ("Level", "Hostname")),
    ("MemoryUtilization", "gauge", "Percent", ("Level", "Hostname")),
    ("GPUMemoryUtilization", "gauge", "Percent", ("Level", "DeviceId", "Hostname")),
    ("GPUMemoryUsed", "gauge", "Megabytes", ("Level", "DeviceId", "Hostname")),
    ("GPUUtilization", "gauge", "Percent", ("Level", "DeviceId", "Hostname")),
)

Observation = Tuple[str, float, Tuple[str, ...]]
BAND_WIDTH = 0.25
BAND_COUNT = 9  # 0.00-0.25 ... 2.00-2.25, then "2.25+" (ln 10 = 2.30 is the uniform guess)


def entropy_band(entropy: float) -> str:
    """The label of the 0.25-nat band an entropy falls in (``"1.75-2.00"``, ..., ``"2.25+"``)."""
    k = max(0, int(entropy / BAND_WIDTH))
    if k >= BAND_COUNT:
        return f"{BAND_COUNT * BAND_WIDTH:.2f}+"
    return f"{k * BAND_WIDTH:.2f}-{(k + 1) * BAND_WIDTH:.2f}"


def observations(
    model: str,
    answers: Sequence[Dict[str, Any]],
    rejected: Iterable[RequestError],
    handler_seconds: float,
    batch_size: int,
) -> List[Observation]:
    """(metric name, value, dimension values) for one handled batch. Histograms get one
    observation per request; counters get one per batch and label set, carrying the count:
    each observation is a log line that TorchServe's frontend parses, so a batch of 8 plain
    requests costs 25 lines instead of 49."""
    out: List[Observation] = [("robustdeq_batch_size", float(batch_size), (model,))]
    for err in rejected:
        out.append(("robustdeq_rejected_requests_total", 1.0, (model, err.reason, str(err.status))))
    for a in answers:
        defense = a["defense"]
        dims = (model, defense["mode"])
        out += [
            ("robustdeq_requests_total", 1.0, dims),
            ("robustdeq_handler_latency_seconds", handler_seconds, dims),
            ("robustdeq_solve_seconds", a["timing_ms"]["solve"] / 1e3, dims),
            ("robustdeq_prediction_entropy", a["entropy"], dims),
            ("robustdeq_prediction_entropy_band_total", 1.0, dims + (entropy_band(a["entropy"]),)),
            ("robustdeq_solver_residual", a["residual"], dims),
        ]
        if defense["ran"]:
            out += [
                ("robustdeq_defended_requests_total", 1.0, dims),
                ("robustdeq_defense_seconds", a["timing_ms"]["defense"] / 1e3, dims),
                ("robustdeq_entropy_reduction", defense["entropy_reduction"], dims),
            ]
        elif defense["mode"] == "gated":
            out.append(("robustdeq_gated_through_requests_total", 1.0, (model,)))
        if a.get("high_entropy"):
            out.append(("robustdeq_high_entropy_inputs_total", 1.0, dims))
    for name, _, dims in out:
        if len(dims) != len(_BY_NAME[name].dimensions):
            raise AssertionError(f"{name}: {len(dims)} dimension values for {_BY_NAME[name].dimensions}")
    return _sum_counters(out)


def _sum_counters(items: List[Observation]) -> List[Observation]:
    """Merge the counter increments of one batch that share a name and labels (first-seen order)."""
    counts: Dict[Tuple[str, Tuple[str, ...]], float] = {}
    out: List[Observation] = []
    for name, value, dims in items:
        if _BY_NAME[name].kind != "counter":
            out.append((name, value, dims))
        elif (name, dims) in counts:
            counts[(name, dims)] += value
        else:
            counts[(name, dims)] = value
    return out + [(name, value, dims) for (name, dims), value in counts.items()]


def _section(title: str, rows) -> List[str]:
    lines = [f"{title}:"]
    for kind in ("counter", "gauge", "histogram"):
        group = [r for r in rows if r[1] == kind]
        if group:
            lines.append(f"  {kind}:")
        for name, _, unit, dims, note in group:
            if note:
                lines.append(f"    # {note}")
            lines += [f"    - name: {name}", f"      unit: {unit}", f"      dimensions: [{', '.join(dims)}]"]
    return lines


def render_metrics_yaml() -> str:
    """The text of ``serving/metrics.yaml``: TorchServe's frontend metrics and the handler's."""
    head = [
        "# RobustDEQ Serve metrics: python -m robustdeq.serving.metrics > serving/metrics.yaml (do not edit by hand).",
        "# TorchServe drops custom metrics that are not declared here; histograms use the fixed",
        "# buckets 0.005..10, so times are in seconds and entropies in nats.",
    ]
    frontend = [(n, k, u, d, "") for n, k, u, d in FRONTEND_METRICS]
    model = [(m.name, m.kind, m.unit, m.dimensions, m.help) for m in METRICS]
    return "\n".join(head + _section("ts_metrics", frontend) + _section("model_metrics", model)) + "\n"


def add_metrics_yaml_arguments(parser: argparse.ArgumentParser) -> None:
    """``robustdeq metrics-yaml > serving/metrics.yaml``: no options."""
    parser.description = "Print serving/metrics.yaml: TorchServe's frontend metrics and the handler's."


def run_metrics_yaml(args: argparse.Namespace) -> int:
    print(render_metrics_yaml(), end="")
    return 0


if __name__ == "__main__":  # python -m robustdeq.serving.metrics > serving/metrics.yaml
    raise SystemExit(run_metrics_yaml(None))
