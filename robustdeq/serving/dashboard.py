"""The Grafana dashboard over the metrics the handler and TorchServe export (``metrics.py``).

``python -m robustdeq.serving.dashboard > serving/grafana/robustdeq-dashboard.json`` writes it;
a test keeps the file equal to ``render_dashboard()`` and checks every query against a live
scrape. Panels use a ``${DS_PROMETHEUS}`` data-source variable (so the JSON imports into any
Grafana 10/11 and works from provisioning) and the variables ``$model``, ``$mode`` and
``$instance``. ``instance`` (and ``job``) are Prometheus target labels, added at scrape time:
they are not on the metrics port itself (``PROMETHEUS_TARGET_LABELS``). The defense's cost
quoted in a panel description is read from the robustness cards of the archives in
``model_store/`` (:func:`defense_costs`), so a rebuilt archive with a new card makes the test
ask for the file to be regenerated.

Paper 1 is "Improving Adversarial Robustness of DEQs with Explicit Regulations Along the
Neural Dynamics": Eq. 6 is the prediction entropy, Algorithm 1 the test-time entropy reduction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from string import ascii_uppercase
from typing import Any, Dict, List, Sequence, Tuple

from ..card import ADAPTIVE, find_setting, load_card
from ..defense_defaults import DEFAULT_R, DEFAULT_T_F
from ..project_paths import MODEL_STORE
from .runfolder import DEFAULT_MODELS

__all__ = ["build_dashboard", "render_dashboard", "defense_costs", "PROMETHEUS_TARGET_LABELS", "UID"]

UID = "robustdeq-serve"
PROMETHEUS_TARGET_LABELS = ("instance", "job")
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
PAPER = '"Improving Adversarial Robustness of DEQs with Explicit Regulations Along the Neural Dynamics"'
NATS = "suffix: nats"

# label matchers: per model (handler metrics), per model and mode, TorchServe's per-model and host-level ones
MODEL = 'ModelName=~"$model", instance=~"$instance"'
MODE = MODEL + ', Mode=~"$mode"'
TS_MODEL = 'model_name=~"$model", instance=~"$instance"'
HOST = 'instance=~"$instance"'


def rate(metric: str, labels: str = MODE, by: str = "ModelName, Mode") -> str:
    """Per-second rate of a counter (or histogram series), summed ``by`` the given labels."""
    head = f"sum by ({by}) " if by else "sum"
    return f"{head}(rate({metric}{{{labels}}}[$__rate_interval]))"


def mean(histogram: str, labels: str = MODE, by: str = "ModelName, Mode") -> str:
    """Mean observation of a histogram: rate of its sum over rate of its count."""
    return f"{rate(histogram + '_sum', labels, by)} / {rate(histogram + '_count', labels, by)}"


def quantile(q: float, histogram: str, labels: str = MODE, by: str = "Mode") -> str:
    """``histogram_quantile`` over a histogram's buckets (TorchServe's fixed ones, 0.005..10)."""
    buckets = rate(histogram + "_bucket", labels, f"le, {by}" if by else "le")
    return f"histogram_quantile({q}, {buckets})"


def ratio(numerator: str, denominator: str) -> str:
    return f"{numerator} / {denominator}"


# options per panel type (the one bar chart is the entropy-band distribution)
_OPTIONS: Dict[str, Dict[str, Any]] = {
    "timeseries": {
        "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": ["mean", "max"]},
        "tooltip": {"mode": "multi", "sort": "desc"},
    },
    "stat": {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "textMode": "auto",
    },
    "barchart": {
        "xField": "Band",
        "orientation": "vertical",
        "showValue": "auto",
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
        "tooltip": {"mode": "single", "sort": "none"},
    },
}


def target(expr: str, legend: str = "", **extra: Any) -> Dict[str, Any]:
    """One Prometheus query of a panel (``refId`` is set by ``panel``)."""
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True, **extra}


def panel(
    title: str,
    description: str,
    targets: Sequence[Dict[str, Any]],
    unit: str = "short",
    kind: str = "timeseries",
    width: int = 12,
    height: int = 8,
    **defaults: Any,
) -> Dict[str, Any]:
    """A panel without id and position (``layout`` adds them); ``defaults`` go to fieldConfig.defaults.
    A description that mentions paper 1 gets its title appended."""
    if "paper 1" in description:
        description += f" Paper 1: {PAPER}."
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [{**t, "refId": ascii_uppercase[i]} for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, **defaults}, "overrides": []},
        "options": dict(_OPTIONS[kind]),
        "gridPos": {"w": width, "h": height},
    }


def share(**bounds: Any) -> Dict[str, Any]:
    """fieldConfig defaults of a share in [0, 1] (shown in percent)."""
    return {"min": 0, "max": 1, **bounds}


def thresholds(*steps: Tuple[Any, str]) -> Dict[str, Any]:
    return {"thresholds": {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}}


def _overview() -> List[Dict[str, Any]]:
    stat = {"kind": "stat", "width": 6, "height": 4}
    answered = rate("robustdeq_requests_total", MODE, "")
    rejected = f"({rate('robustdeq_rejected_requests_total', MODEL, '')} or vector(0))"
    return [
        panel("Request rate", "Answered requests per second (all selected models and modes).",
              [target(answered)], "reqps", **stat),
        panel("p95 handler latency", "95th percentile of the handler time of a request's batch "
              "(decode, fixed-point solve, defense), interpolated in TorchServe's fixed buckets.",
              [target(quantile(0.95, "robustdeq_handler_latency_seconds", by=""))], "s", **stat),
        panel("High-entropy input share", "Share of inputs whose plain entropy (Eq. 6 of paper 1) exceeds the "
              "gate threshold of the model's robustness card: likely perturbed. The threshold is the 95th "
              "percentile of clean validation entropy, so clean traffic sits near 5%.",
              [target(ratio(rate("robustdeq_high_entropy_inputs_total", MODE, ""), answered))], "percentunit",
              **stat, **share(), **thresholds((None, "green"), (0.1, "orange"), (0.25, "red"))),
        panel("Error share", "Requests answered with an error by the handler (4xx: the request, 500: the model) "
              "over all requests it handled.",
              [target(ratio(rejected, f"({rejected} + {rate('robustdeq_requests_total', MODEL, '')})"))],
              "percentunit", **stat, **share(), **thresholds((None, "green"), (0.01, "orange"), (0.05, "red"))),
    ]  # fmt: skip


def _traffic() -> List[Dict[str, Any]]:
    quantiles = [
        target(quantile(q, "robustdeq_handler_latency_seconds"), f"p{round(q * 100)} {{{{Mode}}}}")
        for q in (0.5, 0.95, 0.99)
    ]
    ts_per_request = [
        target(ratio(rate(f"ts_{name}_latency_microseconds", TS_MODEL, "model_name"),
                     rate("ts_inference_requests_total", TS_MODEL, "model_name")), f"{{{{model_name}}}} {name}")
        for name in ("queue", "inference")
    ]  # fmt: skip
    return [
        panel("Request rate per model and mode", "Answered requests per second by model and mode "
              "(off: plain lane; on: Algorithm 1 of paper 1 on every request; gated: only above the entropy "
              "gate), next to TorchServe's count of all inference requests (errors included).",
              [target(rate("robustdeq_requests_total"), "{{ModelName}} {{Mode}}"),
               target(rate("ts_inference_requests_total", TS_MODEL, "model_name"), "{{model_name}} (TorchServe, all)")],
              "reqps", min=0),
        panel("Handler latency per mode (p50 / p95 / p99)", "Quantiles of the handler time of a request's batch "
              "by mode, interpolated in TorchServe's fixed histogram buckets (0.005 .. 10 s): read them as "
              "bucket-level estimates. The defense (on / gated above the threshold) costs many solves.",
              quantiles, "s", min=0),
        panel("Solve and defense time (mean per request)", "Mean plain fixed-point solve of the request's batch and "
              "mean time of Algorithm 1 (test-time entropy reduction, paper 1) on the requests it ran on.",
              [target(mean("robustdeq_solve_seconds"), "solve {{ModelName}} {{Mode}}"),
               target(mean("robustdeq_defense_seconds"), "defense {{ModelName}} {{Mode}}")], "s", min=0),
        panel("TorchServe queue and inference latency (mean per request)", "TorchServe's latency counters are "
              "running totals in microseconds: their rate over the request rate is the mean time a request "
              "waited in the model's queue, and its mean end-to-end inference time.",
              ts_per_request, "µs", min=0),
    ]  # fmt: skip


def defense_costs(store: Path = MODEL_STORE, models: Sequence[str] = DEFAULT_MODELS) -> str:
    """What Algorithm 1 at the paper's defaults costs, from the robustness cards the defended lanes
    serve (``card.py``): "cost_vs_plain in the robustness card with T_f = 2, R = 10: 19x for
    deq-small, 27x for deq-tiny". The served defaults first, then the other archives of ``store``;
    only cards with an adaptive row of that setting."""
    names = list(models) + sorted(p.name[: -len("-defended.mar")] for p in Path(store).glob("*-defended.mar"))
    costs = []
    for name in dict.fromkeys(names):
        mar = Path(store) / f"{name}-defended.mar"
        row = find_setting(load_card(mar), DEFAULT_T_F, DEFAULT_R, kind=ADAPTIVE) if mar.is_file() else None
        if row is not None and row.get("cost_vs_plain") is not None:
            costs.append(f"{row['cost_vs_plain']:.0f}x for {name}")
    setting = f"cost_vs_plain in the robustness card with T_f = {DEFAULT_T_F}, R = {DEFAULT_R}"
    return f"{setting}: {', '.join(costs)}" if costs else setting


def _defense() -> List[Dict[str, Any]]:
    on_or_gated = MODEL + ', Mode=~"on|gated"'
    gated = MODEL + ', Mode="gated"'
    gated_through = rate("robustdeq_gated_through_requests_total", MODEL, "ModelName")
    return [
        panel("Defense trigger rate", "Share of defended-lane requests that Algorithm 1 (test-time entropy "
              "reduction, paper 1) actually ran on: 100% for mode on; for gated, the share above the entropy "
              "threshold (about 5% of clean inputs, by the threshold's choice). Gated-through: the gated requests "
              "answered by the plain solve alone.",
              [target(ratio(rate("robustdeq_defended_requests_total", on_or_gated),
                            rate("robustdeq_requests_total", on_or_gated)), "{{ModelName}} {{Mode}} defended"),
               target(ratio(gated_through, rate("robustdeq_requests_total", gated, "ModelName")),
                      "{{ModelName}} gated through")],
              "percentunit", width=8, **share()),
        panel("Defended and gated-through requests", "Requests per second that Algorithm 1 ran on, by mode, "
              "and gated requests answered without it. A defended request costs many plain solves "
              f"({defense_costs()}).",
              [target(rate("robustdeq_defended_requests_total"), "{{ModelName}} {{Mode}} defended"),
               target(gated_through, "{{ModelName}} gated through")], "reqps", width=8, min=0),
        panel("Entropy reduction by the defense (mean)", "How much Algorithm 1 of paper 1 lowered the prediction "
              "entropy (Eq. 6) at the readout state, per defended request: the defense's effect in nats.",
              [target(mean("robustdeq_entropy_reduction"), "{{ModelName}} {{Mode}}")], NATS, width=8, min=0),
    ]  # fmt: skip


def _entropy() -> List[Dict[str, Any]]:
    bands = "robustdeq_prediction_entropy_band_total{" + MODE + "}[$__range]"
    distribution = target(
        f"sum by (Band) (increase({bands})) / scalar(sum(increase({bands})))", "{{Band}}",
        format="table", instant=True, range=False,
    )  # fmt: skip
    high = rate("robustdeq_high_entropy_inputs_total")
    return [
        {**panel("Entropy distribution (0.25-nat bands)", "Share of requests per 0.25-nat band of the prediction "
                 "entropy (Eq. 6 of paper 1) at the readout state, over the dashboard's time range; after the "
                 "defense where it ran. ln 10 = 2.30 nats is a uniform guess over the 10 classes; compare with "
                 "the gate threshold in the model's robustness card (95th percentile of clean validation "
                 "entropy). Pick a mode with the Mode variable.",
                 [distribution], "percentunit", kind="barchart", min=0),
         "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}},
                             {"id": "sortBy", "options": {"fields": {}, "sort": [{"field": "Band"}]}}]},
        panel("Mean prediction entropy per mode", "Mean entropy of the prediction (Eq. 6 of paper 1) at the "
              "readout state, by model and mode (after the defense where it ran). TorchServe's fixed buckets "
              "are too coarse for quantiles in 0 .. 2.3 nats: see the band distribution.",
              [target(mean("robustdeq_prediction_entropy"), "{{ModelName}} {{Mode}}")], NATS, min=0),
        panel("High-entropy (likely perturbed) input rate", "Inputs per second whose plain entropy at the gate "
              "state exceeds the card's gate threshold, by mode: likely perturbed, on paper 1's premise that "
              "adversarial inputs give less certain predictions. How strong a signal this is depends on the "
              "model: only 8% of PGD-10 inputs cross deq-small's threshold (docs/performance.md).",
              [target(high, "{{ModelName}} {{Mode}}")], "reqps", min=0),
        panel("High-entropy input share", "High-entropy inputs over answered requests. The threshold is the 95th "
              "percentile of clean validation entropy, so about 5% is the clean baseline; a sustained rise means "
              "perturbed inputs or a shift away from the training distribution.",
              [target(ratio(high, rate("robustdeq_requests_total")), "{{ModelName}} {{Mode}}")],
              "percentunit", **share()),
    ]  # fmt: skip


def _errors() -> List[Dict[str, Any]]:
    frontend = [target(rate(f"Requests{code}XX", HOST, ""), f"{code}xx") for code in (4, 5)]
    return [
        panel("Rejected requests by reason and status", "Requests the handler answered with an error, by reason "
              "and HTTP status (4xx: the request, e.g. corrupt_image or option_out_of_bounds; 500 "
              "internal_error: the model failed; see the error table in docs/serving.md).",
              [target(rate("robustdeq_rejected_requests_total", MODEL, "ModelName, Reason, Status"),
                      "{{Status}} {{Reason}} ({{ModelName}})")], "reqps", min=0),
        panel("HTTP 4xx and 5xx (TorchServe frontend)", "TorchServe's host-level response counters over all its "
              "APIs (not per model): 4xx include token failures and unknown models; 5xx include 503 when no "
              "worker can serve a model. A series appears after its first response.",
              frontend, "reqps", min=0),
    ]  # fmt: skip


def _solver() -> List[Dict[str, Any]]:
    return [
        panel("Batch size (mean requests per batch)", "Requests TorchServe batched into one handler call, per "
              "model (up to the archive's batch size within its max batch delay).",
              [target(mean("robustdeq_batch_size", MODEL, "ModelName"), "{{ModelName}}")], "none", min=0),
        panel("Solver residual at the readout state", "Relative residual of the fixed-point solve at the state "
              "the answer is read from: how far the DEQ is from equilibrium there (mean, and p95 from the "
              "fixed buckets).",
              [target(mean("robustdeq_solver_residual"), "mean {{ModelName}} {{Mode}}"),
               target(quantile(0.95, "robustdeq_solver_residual"), "p95 {{Mode}}")], "none", min=0),
    ]  # fmt: skip


SECTIONS = (
    ("Overview", _overview),
    ("Traffic and latency", _traffic),
    ("Defense (Algorithm 1, test-time entropy reduction)", _defense),
    ("Prediction entropy (Eq. 6) and likely perturbed inputs", _entropy),
    ("Errors", _errors),
    ("Solver and batching", _solver),
)


def layout(sections: Sequence[Tuple[str, List[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """Rows of panels flowed left to right in Grafana's 24 columns, with ids and gridPos."""
    out: List[Dict[str, Any]] = []
    y = 0
    for title, panels in sections:
        row = {"type": "row", "title": title, "collapsed": False, "panels": []}
        out.append({**row, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        x, line = 0, 0
        for p in panels:
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                x, y, line = 0, y + line, 0
            p["gridPos"].update(x=x, y=y)
            x, line = x + w, max(line, h)
            out.append(p)
        y += line
    for i, p in enumerate(out, start=1):
        p["id"] = i
    return out


def _variable(name: str, label: str, of_label: str, selector: str = "") -> Dict[str, Any]:
    """A multi-value variable over the values of a label of ``robustdeq_requests_total`` ("All" matches all)."""
    query = f"label_values(robustdeq_requests_total{selector}, {of_label})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": query,
        "refresh": 2,
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {},
        "options": [],
        "hide": 0,
        "regex": "",
    }


def build_dashboard() -> Dict[str, Any]:
    """The dashboard as Grafana's JSON model (schemaVersion 39: Grafana 10.4 and 11)."""
    datasource = {"name": "DS_PROMETHEUS", "label": "Data source", "type": "datasource", "query": "prometheus"}
    datasource.update(current={}, options=[], hide=0, refresh=1, regex="")
    return {
        "id": None,
        "uid": UID,
        "title": "RobustDEQ Serve",
        "description": "Robust DEQ classifiers on TorchServe: traffic, latency, the test-time defense (Algorithm 1) "
        f"and prediction entropy (Eq. 6) of paper 1, {PAPER}, and errors.",
        "tags": ["robustdeq", "torchserve", "deep-equilibrium", "adversarial-robustness"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "links": [],
        "annotations": {"list": []},
        "templating": {
            "list": [
                datasource,
                _variable("model", "Model", "ModelName"),
                _variable("mode", "Mode", "Mode", '{ModelName=~"$model"}'),
                _variable("instance", "Instance", "instance", '{ModelName=~"$model"}'),
            ]
        },
        "panels": layout([(title, build()) for title, build in SECTIONS]),
    }


def render_dashboard() -> str:
    """The text of ``serving/grafana/robustdeq-dashboard.json``."""
    return json.dumps(build_dashboard(), indent=2) + "\n"


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    """``robustdeq grafana-dashboard > serving/grafana/robustdeq-dashboard.json``: no options."""
    parser.description = "Print the Grafana dashboard over the metrics the handler and TorchServe export."


def run_dashboard(args: argparse.Namespace) -> int:
    print(render_dashboard(), end="")
    return 0


if __name__ == "__main__":  # python -m robustdeq.serving.dashboard > serving/grafana/robustdeq-dashboard.json
    raise SystemExit(run_dashboard(None))
