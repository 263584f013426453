"""The server's own clocks around a load-test run: Prometheus series of TorchServe's frontend
and of the handler, read from the metrics port before and after, and where a served request's
time goes between them (the breakdown of ``robustdeq loadtest --scenario saturation``;
docs/performance.md)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

__all__ = ["BREAKDOWN_SERIES", "metric_totals", "grew", "latency_parts", "mean_batch"]


def metric_totals(metrics_url: str, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """``{sample name: {model: value}}`` for the named samples on the metrics port, summed over
    every other label (TorchServe's series carry ``model_name``, the handler's ``ModelName``)."""
    from prometheus_client.parser import text_string_to_metric_families

    from ..serving.runfolder import http_get

    status, body = http_get(f"{metrics_url}/metrics")
    out: Dict[str, Dict[str, float]] = {name: {} for name in names}
    if status != 200:
        return out
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            # the parser names a counter's sample NAME_total even where the text says NAME
            # (TorchServe's ts_*_microseconds counters)
            name = next((n for n in (sample.name, sample.name.removesuffix("_total")) if n in out), None)
            if name is not None:
                model = sample.labels.get("ModelName", sample.labels.get("model_name", ""))
                out[name][model] = out[name].get(model, 0.0) + sample.value
    return out


def grew(before: Dict[str, Dict[str, float]], after: Dict[str, Dict[str, float]], name: str, model: str) -> float:
    """How much one series of :func:`metric_totals` grew for ``model`` between two snapshots."""
    return after.get(name, {}).get(model, 0.0) - before.get(name, {}).get(model, 0.0)


#: the server-side clocks of a request: TorchServe's frontend (from the parsed request to the
#: response, and the part of it spent queued until a worker thread took its batch) and the handler
BREAKDOWN_SERIES = (
    "ts_inference_requests_total",
    "ts_inference_latency_microseconds",
    "ts_queue_latency_microseconds",
    "robustdeq_handler_latency_seconds_sum",
    "robustdeq_handler_latency_seconds_count",
    "robustdeq_batch_size_sum",
    "robustdeq_batch_size_count",
)


def latency_parts(
    before: Dict[str, Dict[str, float]],
    after: Dict[str, Dict[str, float]],
    model: str,
    client_mean_ms: float,
    wall_s: float,
    workers: int = 1,
) -> Dict[str, Any]:
    """Where a served request's time goes, mean ms per request, from two snapshots of
    :data:`BREAKDOWN_SERIES` around one run (TorchServe 0.12's RestJob: inference latency =
    response time - job creation, queue latency = worker pickup - job creation):

    * ``outside_frontend``: the client's latency minus the frontend's (HTTP parsing and
      writing, the loopback socket, Locust itself);
    * ``queue``: waiting for a worker and for the batch to fill (maxBatchDelay);
    * ``worker_round_trip``: from pickup to response (the frontend's share of it, the
      socket to the Python worker, TorchServe's Python plumbing and the handler);
    * ``handler``: the handler's own time for the request's batch (decode, solve, answer, metrics);
    * ``ipc_and_plumbing``: the round trip minus the handler.

    ``worker_busy`` is the share of the wall time a plain worker spent on batches, averaged
    over the ``workers`` (batches x mean round trip / ``wall_s`` / ``workers``), ``handler_busy``
    the handler's part of it."""

    def delta(name: str) -> float:
        return grew(before, after, name, model)

    requests = delta("ts_inference_requests_total")
    handled = delta("robustdeq_handler_latency_seconds_count")
    batches = delta("robustdeq_batch_size_count")
    if requests <= 0 or handled <= 0 or batches <= 0:
        raise RuntimeError(f"no requests for {model!r} on the metrics port during the breakdown run")
    frontend = delta("ts_inference_latency_microseconds") / requests / 1e3
    queue = delta("ts_queue_latency_microseconds") / requests / 1e3
    handler = delta("robustdeq_handler_latency_seconds_sum") / handled * 1e3
    round_trip = frontend - queue
    mean_batch = delta("robustdeq_batch_size_sum") / batches
    return {
        "requests": requests,
        "mean_batch_size": mean_batch,
        "client_ms": client_mean_ms,
        "frontend_ms": frontend,
        "outside_frontend_ms": client_mean_ms - frontend,
        "queue_ms": queue,
        "worker_round_trip_ms": round_trip,
        "handler_ms": handler,
        "ipc_and_plumbing_ms": round_trip - handler,
        "workers": workers,
        "worker_busy": batches * round_trip / 1e3 / wall_s / workers,
        "handler_busy": batches * handler / 1e3 / wall_s / workers,
    }


def mean_batch(before, after, model: str) -> Optional[float]:
    count = grew(before, after, "robustdeq_batch_size_count", model)
    return grew(before, after, "robustdeq_batch_size_sum", model) / count if count > 0 else None
