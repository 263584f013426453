"""The request protocols the server speaks, behind one interface for every runtime.

* the project's own body: raw image bytes, ``{"image": base64}``, ``{"array": [...]}`` or
  ``{"describe": true}`` (``robustdeq.serving.inputs``), answered with one answer object;
* KServe v1 ``{"instances": [...]}`` (``inputs.split_instances``, with TF-Serving's ``b64``
  convention), answered ``{"predictions": [...]}``;
* OIP v2 ``{"inputs": [...]}`` (``robustdeq.serving.oip``), answered with OIP ``outputs``.

A runtime calls :func:`decode` on a request's body, :meth:`Request.options` with its headers
and the engine, runs the inputs through ``InferenceEngine.predict`` and answers with
:meth:`Request.respond`. A request with several inputs is one request: a bad input fails it
with an error that names the input, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from .inputs import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, decode_request, read_body, split_instances
from .oip import InferRequest, check_headers, decode_infer_request, infer_response, is_infer_request
from .options import RequestError, RequestOptions, parse_options

__all__ = ["Request", "decode", "PROTOCOLS"]

#: ``Request.protocol`` values
PROTOCOLS = ("robustdeq", "kserve-v1", "oip-v2", "describe")


@dataclass
class Request:
    """One decoded request: its inputs, each input's options as sent, and how to answer."""

    protocol: str
    inputs: List[Tensor] = field(default_factory=list)
    bodies: List[Mapping[str, Any]] = field(default_factory=list)
    infer: Optional[InferRequest] = None  # the OIP request (its id and the outputs wanted)

    def _where(self, j: int) -> str:
        return {"kserve-v1": f"instances[{j}]: ", "oip-v2": "parameters: "}.get(self.protocol, "")

    def options(self, headers: Mapping[str, Any], engine) -> List[RequestOptions]:
        """Each input's validated options (``X-`` headers under the body's keys) for ``engine``."""
        out = []
        for j, body in enumerate(self.bodies):
            try:
                options = parse_options(body, headers, engine.limits, engine.n_steps, engine.default_state)
                engine.check(options)
            except RequestError as err:
                err.message = self._where(j) + err.message
                raise
            if self.protocol == "oip-v2":  # 'probabilities' holds every class
                options = replace(options, top_k=len(engine.labels))
            out.append(options)
        return out

    def respond(self, answers: Sequence[Mapping[str, Any]], engine) -> Any:
        """The response body for the engine's answers to this request's inputs, in order."""
        if self.protocol == "kserve-v1":
            return {"predictions": list(answers)}
        if self.protocol == "oip-v2":
            return infer_response(self.infer, answers, engine.name, len(engine.labels))
        return answers[0]


def decode(
    value: Any,
    content_type: Optional[str],
    shape: Tuple[int, ...],
    max_side: int = MAX_IMAGE_SIDE,
    max_pixels: int = MAX_IMAGE_PIXELS,
    headers: Optional[Mapping[str, Any]] = None,
) -> Request:
    """One request's payload (raw bytes, a decoded JSON value or text) -> :class:`Request`;
    RequestError (4xx) on any problem."""
    check_headers(headers)
    value = read_body(value, content_type)
    if is_infer_request(value):
        infer = decode_infer_request(value, shape, max_side, max_pixels)
        return Request("oip-v2", infer.inputs, [infer.options] * len(infer.inputs), infer)
    bodies = split_instances(value)
    if bodies is None:
        x, body = decode_request(value, content_type, shape, max_side, max_pixels)
        return Request("describe") if x is None else Request("robustdeq", [x], [body])
    inputs = []
    for j, body in enumerate(bodies):
        try:
            x, _ = decode_request(body, content_type, shape, max_side, max_pixels)
            if x is None:
                raise RequestError(400, "bad_json", "'describe' is not an instance")
        except RequestError as err:
            err.message = f"instances[{j}]: {err.message}"
            raise
        inputs.append(x)
    return Request("kserve-v1", inputs, bodies)
