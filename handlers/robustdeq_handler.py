"""TorchServe handler for RobustDEQ archives: parsing, validation and responses only.

The model work (solve, early-state readout, Algorithm 1 of paper 1) is
``robustdeq.serving.engine.InferenceEngine``; options and payloads are validated by
``robustdeq.serving.options`` / ``inputs``. This file wires them to TorchServe:

* ``initialize`` reads the archive's ``model-config.yaml`` (``handler`` section), loads the
  checkpoint with ``weights_only=True`` and picks ``cuda:<gpu_id>`` when TorchServe assigns
  a GPU, the CPU otherwise;
* ``handle`` runs its own inference step (TorchServe's default one runs under
  ``torch.inference_mode()``, which would forbid the defense's input gradients). A bad
  request gets its own 4xx JSON error; the rest of the batch is answered normally;
* a ``describe`` call (management API ``GET /models/<name>?customized=true``) or a JSON
  body ``{"describe": true}`` returns the model's defaults, bounds and robustness card;
* the protocols (the project's own body, KServe v1 ``{"instances": [...]}`` on
  ``/v1/models/<name>:predict``, OIP v2 ``{"inputs": [...]}`` on ``/v2/models/<name>/infer``)
  are ``robustdeq.serving.protocols``: a request with several inputs is one request, answered
  in its protocol's shape; a bad input fails its request only.
"""

import json
import logging
import time
from http import HTTPStatus

import torch
from ts.metrics.metric_type_enum import MetricTypes

from robustdeq.serving.metrics import METRICS, observations
from robustdeq.serving.options import RequestError
from robustdeq.serving.protocols import decode

logger = logging.getLogger(__name__)
_KIND = {m.name: m.kind for m in METRICS}


class RobustDEQHandler:
    """One worker's handler: an ``InferenceEngine`` behind TorchServe's batch interface."""

    def __init__(self):
        self.engine = None
        self.initialized = False

    def initialize(self, context):
        from robustdeq.serving.engine import InferenceEngine

        props = context.system_properties
        gpu_id = props.get("gpu_id")
        device = f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu"
        section = (context.model_yaml_config or {}).get("handler") or {}
        self.engine = InferenceEngine.from_model_dir(props.get("model_dir"), section, device, context.model_name)
        self.context = context
        self.initialized = True
        logger.info("RobustDEQ %s on %s, lane %s", context.model_name, device, self.engine.limits.lane)

    def handle(self, data, context):
        self.context = context
        if _header(context, 0, "describe") == "True":  # management API, ?customized=true
            return [json.dumps(self.engine.describe())]
        start = time.perf_counter()
        engine = self.engine
        responses = [None] * len(data)
        requests = {}  # request index -> its decoded protocols.Request
        accepted, rejected = [], []

        def reject(idx, err):
            rejected.append(err)
            responses[idx] = err.to_dict()
            context.set_response_status(err.status, HTTPStatus(err.status).phrase, idx)

        for idx, item in enumerate(data):
            try:
                request, options = self._decode(item, context, idx)
            except RequestError as err:
                reject(idx, err)
                continue
            except Exception:  # a payload the decoder did not foresee is still the client's
                logger.exception("request %d could not be decoded", idx)
                reject(idx, RequestError(400, "undecodable_request", "the request could not be decoded"))
                continue
            if request.protocol == "describe":
                responses[idx] = engine.describe()
                continue
            requests[idx] = request
            accepted += [((idx, j), x, o) for j, (x, o) in enumerate(zip(request.inputs, options))]
        results = dict(self._answer(accepted)) if accepted else {}
        for (idx, _), answer in results.items():
            if isinstance(answer, RequestError) and responses[idx] is None:
                reject(idx, answer)
        for idx, request in requests.items():
            if responses[idx] is None:
                responses[idx] = request.respond([results[(idx, j)] for j in range(len(request.inputs))], engine)
        failed = {idx for (idx, _), answer in results.items() if isinstance(answer, RequestError)}
        answers = [answer for (idx, _), answer in results.items() if idx not in failed]
        elapsed = time.perf_counter() - start
        for idx in range(len(data)):
            context.set_response_content_type(idx, "application/json")
        self._emit(observations(engine.name, answers, rejected, elapsed, len(data)))
        return [json.dumps(r) for r in responses]

    def _decode(self, item, context, idx):
        """One request -> (protocols.Request, each input's options); RequestError when it is bad."""
        engine, headers = self.engine, context.get_all_request_header(idx)
        value, content_type = _payload(item, context, idx)
        side, pixels = engine.limits.max_image_side, engine.limits.max_image_pixels
        request = decode(value, content_type, engine.input_shape, side, pixels, headers)
        return request, ([] if request.protocol == "describe" else request.options(headers, engine))

    def _answer(self, accepted):
        """[(index, answer or RequestError)] for validated requests. A batch the model fails on
        is retried request by request, so one request that breaks it cannot fail the others."""
        keys, xs, opts = zip(*accepted)
        try:
            answers, _ = self.engine.predict(torch.stack(xs), list(opts))
            return list(zip(keys, answers))
        except Exception:
            if len(accepted) > 1:
                logger.warning("a batch of %d failed; answering its requests one by one", len(accepted))
                return [pair for item in accepted for pair in self._answer([item])]
            logger.exception("request %s failed in the model", keys[0])
            return [(keys[0], RequestError(500, "internal_error", "the model failed on this request (see model log)"))]

    def _emit(self, items):
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        for name, value, dims in items:
            try:
                metric = metrics.get_metric(name, MetricTypes(_KIND[name]))
                metric.add_or_update(value, list(dims))
            except Exception:  # metrics must never fail a request
                logger.exception("could not record metric %s", name)


def _header(context, idx, key):
    try:
        value = context.get_request_header(idx, key)
    except (IndexError, KeyError, TypeError, AttributeError):
        return None
    return value


def _payload(item, context, idx):
    """The body TorchServe received for one request (raw body or form field) and its content type."""
    key = next((k for k in ("data", "body") if k in item), next(iter(item), None))
    if key is None:
        raise RequestError(400, "empty_body", "the request carries no body")
    part = _header(context, idx, key)
    return item[key], part.get("content-type") if isinstance(part, dict) else None
