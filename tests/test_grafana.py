"""The Grafana dashboard and Prometheus config in serving/grafana/.

The committed JSON is the generator's, its panels are laid out without overlap, every query
parses as PromQL, and every metric, label and label value the queries use is on the metrics
port of a running TorchServe after traffic that makes every series appear.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Tuple

import promql_parser as pq
import pytest
import yaml

from robustdeq.data import PROJECT_ROOT
from robustdeq.serving.dashboard import PROMETHEUS_TARGET_LABELS, build_dashboard, render_dashboard
from robustdeq.serving.metrics import METRICS
from robustdeq.serving.runfolder import http_get, read_keys

from .serving_helpers import entropy_extremes, png, scrape

GRAFANA = PROJECT_ROOT / "serving" / "grafana"
DASHBOARD = build_dashboard()
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]

# Grafana variables are not PromQL: before parsing, each is replaced by a stand-in of the same
# kind (durations for $__rate_interval / $__range; ".*", what "All" sends, for the template variables).
STAND_INS = {"__rate_interval": "1m", "__range": "1h", "model": ".*", "mode": ".*", "instance": ".*"}

Exported = Dict[str, List[Dict[str, str]]]  # sample name -> label sets of its samples
SAMPLE = re.compile(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+\S+")  # name{labels} value
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def substitute(expr: str) -> str:
    def stand_in(match: re.Match) -> str:
        assert match[1] in STAND_INS, f"no stand-in for the Grafana variable ${match[1]} in {expr!r}"
        return STAND_INS[match[1]]

    return re.sub(r"\$\{?(\w+)\}?", stand_in, expr)


def queries(dashboard=DASHBOARD) -> List[Tuple[str, str]]:
    """(where, PromQL with variables substituted) for every panel target and every query variable;
    ``label_values(selector, label)`` is checked as ``count by (label) (selector)``."""
    out = [(f"panel {p['id']} {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
            assert match, f"variable ${var['name']}: not a label_values() query: {var['query']!r}"
            out.append((f"variable ${var['name']}", f"count by ({match[2]}) ({match[1]})"))
    return [(where, substitute(expr)) for where, expr in out]


def selectors(node, needed: FrozenSet[str] = frozenset()) -> Iterator[Tuple[pq.VectorSelector, FrozenSet[str]]]:
    """Every series selector of a parsed query, with the labels its series must carry for the
    enclosing ``by (...)`` aggregations and ``on (...)`` vector matches to mean anything."""
    if isinstance(node, pq.VectorSelector):
        yield node, needed
    elif isinstance(node, pq.MatrixSelector):
        yield node.vector_selector, needed
    elif isinstance(node, pq.AggregateExpr):
        by = node.modifier is not None and node.modifier.type == pq.AggModifierType.By
        yield from selectors(node.expr, needed | frozenset(node.modifier.labels if by else ()))
    elif isinstance(node, pq.BinaryExpr):
        matching = node.modifier.matching if node.modifier is not None else None
        on = matching is not None and matching.type == pq.LabelModifierType.Include
        for side in (node.lhs, node.rhs):
            yield from selectors(side, needed | frozenset(matching.labels if on else ()))
    elif isinstance(node, pq.Call):
        for arg in node.args:
            yield from selectors(arg, needed)
    elif isinstance(node, (pq.ParenExpr, pq.UnaryExpr, pq.SubqueryExpr)):
        yield from selectors(node.expr, needed)
    elif not isinstance(node, (pq.NumberLiteral, pq.StringLiteral)):
        raise TypeError(f"unexpected PromQL node {type(node).__name__}: {node}")


def metric_name(selector: pq.VectorSelector) -> str:
    return selector.name or next(m.value for m in selector.matchers.matchers if m.name == "__name__")


def referenced_metrics(dashboard=DASHBOARD) -> set:
    return {metric_name(s) for _, expr in queries(dashboard) for s, _ in selectors(pq.parse(expr))}


def _matches(matcher: pq.Matcher, value: str) -> bool:
    if matcher.op == pq.MatchOp.Equal:
        return value == matcher.value
    return bool(re.fullmatch(matcher.value, value))


def problems(expr: str, exported: Exported) -> List[str]:
    """What a query asks of the metrics port that the scrape lacks: a metric, a label it filters or
    groups by (Prometheus' own target labels aside), or a value an = or =~ matcher wants."""
    out = []
    for selector, needed in selectors(pq.parse(expr)):
        name = metric_name(selector)
        samples = exported.get(name)
        if not samples:
            out.append(f"{name} is not on the metrics port")
            continue
        matchers = [m for m in selector.matchers.matchers if m.name not in ("__name__", *PROMETHEUS_TARGET_LABELS)]
        for label in sorted((needed | {m.name for m in matchers}) - set(PROMETHEUS_TARGET_LABELS)):
            if not all(label in labels for labels in samples):
                out.append(f"{name} has no label {label} (it has {sorted(samples[0])})")
        for m in matchers:
            positive = m.op in (pq.MatchOp.Equal, pq.MatchOp.Re)
            if positive and not any(_matches(m, labels.get(m.name, "")) for labels in samples):
                out.append(f"no {name} sample has {m}")
    return out


# --- the committed files ---------------------------------------------------------------------------------------


def test_the_committed_dashboard_is_the_generator_output():
    committed = (GRAFANA / "robustdeq-dashboard.json").read_text()
    assert committed == render_dashboard(), (
        "serving/grafana/robustdeq-dashboard.json is stale: "
        "python -m robustdeq.serving.dashboard > serving/grafana/robustdeq-dashboard.json"
    )
    assert json.loads(committed)["uid"] == "robustdeq-serve"


def test_panels_have_unique_ids_and_do_not_overlap():
    panels = DASHBOARD["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, (p["title"], g)
    for a, b in combinations(panels, 2):
        ga, gb = a["gridPos"], b["gridPos"]
        apart = (
            ga["x"] + ga["w"] <= gb["x"]
            or gb["x"] + gb["w"] <= ga["x"]
            or ga["y"] + ga["h"] <= gb["y"]
            or gb["y"] + gb["h"] <= ga["y"]
        )
        assert apart, f"panels {a['title']!r} and {b['title']!r} overlap: {ga} {gb}"


def test_every_panel_is_described_and_uses_the_datasource_variable():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["model"]["query"] == "label_values(robustdeq_requests_total, ModelName)"
    assert {"model", "mode", "instance"} <= set(variables)
    assert 39 <= DASHBOARD["schemaVersion"] <= 41  # Grafana 10.4 .. 11
    for p in PANELS:
        assert len(p["description"]) > 40, f"panel {p['title']!r} needs a description"
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
        for source in [p["datasource"]] + [t["datasource"] for t in p["targets"]]:
            assert source == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert all("$__rate_interval" in t["expr"] or "$__range" in t["expr"] for t in p["targets"]), p["title"]
    assert all("paper 1" not in p["description"] or "Neural Dynamics" in p["description"] for p in PANELS)


def test_every_query_parses_as_promql():
    found = queries()
    assert len(found) >= len(PANELS)
    for where, expr in found:
        try:
            pq.parse(expr)
        except ValueError as exc:
            pytest.fail(f"{where}: {expr!r} is not PromQL: {exc}")
    with pytest.raises(AssertionError, match="no stand-in"):
        substitute("rate(x[$unknown])")


def test_the_dashboard_covers_the_issue():
    """Request rate, latency quantiles per mode, queue time, defense trigger rate, entropy bands,
    high-entropy inputs, errors, batch size, solver residual; and every declared metric somewhere."""
    referenced = referenced_metrics()
    required = {
        "robustdeq_requests_total", "robustdeq_handler_latency_seconds_bucket", "ts_queue_latency_microseconds",
        "ts_inference_requests_total", "robustdeq_defended_requests_total", "robustdeq_gated_through_requests_total",
        "robustdeq_prediction_entropy_band_total", "robustdeq_prediction_entropy_sum",
        "robustdeq_entropy_reduction_sum", "robustdeq_high_entropy_inputs_total", "robustdeq_rejected_requests_total",
        "Requests4XX", "Requests5XX", "robustdeq_batch_size_sum", "robustdeq_solver_residual_sum",
    }  # fmt: skip
    assert required <= referenced, f"missing on the dashboard: {sorted(required - referenced)}"
    for metric in METRICS:
        names = {metric.name} if metric.kind != "histogram" else {metric.name + s for s in ("_bucket", "_sum")}
        assert names & referenced, f"{metric.name} (declared in metrics.py) has no panel"
    latency = set()  # (quantile, grouping labels) of histogram_quantile() over the handler latency
    for _, expr in queries():
        parsed = pq.parse(expr)
        if isinstance(parsed, pq.Call) and parsed.func.name == "histogram_quantile":
            bucket_selectors = selectors(parsed.args[1])
            latency |= {(parsed.args[0].val, needed) for s, needed in bucket_selectors if "handler_latency" in s.name}
    for q in (0.5, 0.95, 0.99):
        assert (q, frozenset({"le", "Mode"})) in latency, f"no p{q * 100:g} handler latency by (le, Mode)"
    titles = " ".join(p["title"].lower() for p in PANELS)
    for word in ("request rate", "latency", "queue", "trigger", "entropy distribution", "high-entropy", "rejected"):
        assert word in titles, f"no panel titled with {word!r}"


def test_the_prometheus_config_scrapes_the_metrics_port():
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["robustdeq"]["static_configs"][0]["targets"] == ["127.0.0.1:8082"]
    pods = jobs["robustdeq-kubernetes-pods"]
    assert pods["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep, _, address = pods["relabel_configs"][:3]
    assert keep == {
        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
        "regex": "true",
        "action": "keep",
    }
    assert address["target_label"] == "__address__"
    assert address["source_labels"] == ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"]
    replacement = re.sub(r"\$(\d)", r"\\\1", address["replacement"])  # Prometheus' $1 is Python's \1
    for discovered in ("10.1.2.3:8080;8082", "10.1.2.3;8082"):  # pod IP with or without a declared port
        assert re.fullmatch(address["regex"], discovered).expand(replacement) == "10.1.2.3:8082"


# --- against a running server ----------------------------------------------------------------------------------


def _put(url: str, token: str) -> None:
    request = urllib.request.Request(url, method="PUT", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200, response.read()


def _status_without_workers(server, client, image: bytes, model: str = "deq-tiny") -> int:
    """The status TorchServe answers while ``model`` has no worker (503, which makes Requests5XX
    appear), its workers scaled back to what they were afterwards."""
    token = read_keys(Path(server.run_dir))["management"]
    url = f"{server.management_url}/models/{model}"
    status, body = http_get(url, token)
    assert status == 200, body
    before = json.loads(body)[0]
    _put(f"{url}?min_worker=0&max_worker=0&synchronous=true", token)
    try:
        return client.predict(model, image, "image/png")[0]
    finally:
        _put(f"{url}?min_worker={before['minWorkers']}&max_worker={before['maxWorkers']}&synchronous=true", token)


@pytest.fixture(scope="module")
def exported(server, client, reference, cifar_test) -> Exported:
    """Sample names and label sets on the metrics port after plain, defended, gated (above and
    below the threshold), malformed and no-worker requests: every series then exists."""
    high, low = entropy_extremes(reference, cifar_test)
    for image, defense, ran in ((high, "off", False), (high, "on", True), (high, "gated", True), (low, "gated", False)):
        status, answer = client.predict("deq-tiny", png(image), "image/png", defense=defense)
        assert status == 200 and answer["defense"]["ran"] == ran, (defense, status, answer)
    assert client.predict("deq-tiny", b"junk", "image/png")[0] == 400
    assert _status_without_workers(server, client, png(low)) == 503
    assert client.predict("deq-tiny", png(low), "image/png")[0] == 200, "the plain lane did not come back"
    return exposed_samples(server)


def exposed_samples(server) -> Exported:
    """Sample names as Prometheus stores them, read from the raw text: prometheus-client's parser
    (``serving_helpers.scrape``) appends ``_total`` to counters exposed without it, such as
    TorchServe's ``ts_queue_latency_microseconds`` and ``Requests4XX``."""
    parsed = {s.name.removesuffix("_total") for family in scrape(server).values() for s in family.samples}
    status, body = http_get(server.metrics_url + "/metrics")
    assert status == 200, body
    samples: Exported = defaultdict(list)
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, f"not a Prometheus sample line: {line!r}"
            samples[match[1]].append(dict(LABEL.findall(match[2] or "")))
    assert {name.removesuffix("_total") for name in samples} >= parsed, "the raw parse missed samples"
    return dict(samples)


def test_every_metric_and_label_the_dashboard_queries_is_exported(exported):
    found = [f"{where}: {problem}" for where, expr in queries() for problem in problems(expr, exported)]
    assert not found, "the dashboard queries what the server does not export:\n" + "\n".join(found)


def test_the_check_fails_on_what_the_server_does_not_export(exported):
    assert problems('sum by (Mode) (rate(robustdeq_requests_total{Mode="gated"}[1m]))', exported) == []
    for expr, problem in (
        ("rate(robustdeq_no_such_metric_total[1m])", "robustdeq_no_such_metric_total is not on the metrics port"),
        ("rate(robustdeq_requests[1m])", "robustdeq_requests is not on the metrics port"),  # counter without _total
        ("sum by (Reason) (rate(robustdeq_requests_total[1m]))", "robustdeq_requests_total has no label Reason"),
        ("robustdeq_batch_size_count{Mode=~'on|gated'}", "robustdeq_batch_size_count has no label Mode"),
        ('robustdeq_requests_total{Mode="gate"}', 'no robustdeq_requests_total sample has Mode="gate"'),
        ("a / on (Band) robustdeq_requests_total", "a is not on the metrics port"),
    ):
        found = problems(expr, exported)
        assert any(p.startswith(problem) for p in found), (expr, found)
    found = problems("a / on (Band) robustdeq_requests_total", exported)
    assert any(p.startswith("robustdeq_requests_total has no label Band") for p in found), found
