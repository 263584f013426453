"""The Open Inference Protocol (OIP, KServe v2) over REST: an inference request body to model
inputs and options, and the engine's answers to an OIP response.

A request (``POST /v2/models/<name>/infer``) holds one input tensor:

* ``image``: ``BYTES`` of shape [N] or [N, 1], each element a base64 string of image bytes
  (any format, size and mode the other bodies accept, under the same limits);
* ``array``: ``FP32`` of shape [N, C, H, W] (the model's input shape) with values in [0, 1],
  ``data`` flat in row-major order or nested.

Options (the names ``robustdeq.serving.options`` defines: ``defense``, ``T_f``, ``R`` ...) come
as the request's ``parameters`` and the input's (which win). ``binary_data_output``,
``content_type``, ``priority`` and ``timeout`` are protocol parameters, accepted and ignored.
``outputs`` may name the outputs wanted (:data:`OUTPUTS`; all of them by default). The N
elements are one request: answered together, or refused together with an error that names
the field (``inputs[0].datatype: ...``). Its JSON ``{"error": ...}`` is OIP's error shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch import Tensor

from .inputs import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, MAX_INSTANCES, decode_array, decode_base64_image
from .options import OPTION_NAMES, RequestError

__all__ = [
    "INPUTS",
    "OUTPUTS",
    "PROTOCOL_PARAMETERS",
    "BINARY_HEADER",
    "InferRequest",
    "is_infer_request",
    "check_headers",
    "decode_infer_request",
    "infer_response",
]

#: the model's inputs: name -> datatype (the names of the project's own JSON body)
INPUTS = {"image": "BYTES", "array": "FP32"}
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
#: parameters of the protocol itself (tritonclient, KServe): accepted and ignored
PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "content_type", "priority", "timeout"})
#: the header of OIP's binary tensor extension, which is not supported (data goes in JSON)
BINARY_HEADER = "inference-header-content-length"


def _probabilities(answer: Mapping[str, Any], n_classes: int) -> List[float]:
    row = [0.0] * n_classes
    for entry in answer["top_k"]:
        row[entry["index"]] = entry["probability"]
    return row


#: the outputs, in response order: (name, datatype, value of one element from its answer)
OUTPUTS: Tuple[Tuple[str, str, Callable[[Mapping[str, Any], int], Any]], ...] = (
    ("label", "BYTES", lambda a, c: a["label"]),
    ("index", "INT32", lambda a, c: a["index"]),
    ("probabilities", "FP32", _probabilities),
    ("entropy", "FP32", lambda a, c: a["entropy"]),
    ("entropy_trajectory", "FP32", lambda a, c: a["entropy_trajectory"]),
    ("readout_state", "INT32", lambda a, c: a["state"]),
    ("residual", "FP32", lambda a, c: a["residual"]),
    ("high_entropy", "BOOL", lambda a, c: a["high_entropy"]),  # left out for a model whose card has no gate
    ("defense_ran", "BOOL", lambda a, c: a["defense"]["ran"]),
    ("entropy_reduction", "FP32", lambda a, c: a["defense"].get("entropy_reduction", 0.0)),
    ("solve_ms", "FP32", lambda a, c: a["timing_ms"]["solve"]),
    ("defense_ms", "FP32", lambda a, c: a["timing_ms"]["defense"]),
)
OUTPUT_NAMES = tuple(name for name, _, _ in OUTPUTS)


@dataclass
class InferRequest:
    """One decoded OIP request: its inputs, the option parameters, its id and the outputs wanted."""

    inputs: List[Tensor]
    options: Dict[str, Any]
    id: Optional[str] = None
    outputs: Optional[List[str]] = None  # None: every output


def _fail(reason: str, message: str, status: int = 400) -> RequestError:
    return RequestError(status, reason, message)


def is_infer_request(value: Any) -> bool:
    """Whether a decoded body is an OIP inference request (an object with ``inputs``)."""
    return isinstance(value, Mapping) and "inputs" in value


def check_headers(headers: Optional[Mapping[str, Any]]) -> None:
    """Refuse the binary tensor extension by its header, before its body reaches the JSON parser."""
    if any(isinstance(k, str) and k.lower() == BINARY_HEADER for k in (headers or {})):
        raise _fail(
            "binary_data_unsupported",
            "Inference-Header-Content-Length: the binary tensor extension is not supported; send the data "
            "in JSON (BYTES elements as base64 strings)",
        )


def _parameters(value: Any, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail("bad_json", f"{where} must be an object")
    if "binary_data_size" in value:
        raise _fail(
            "binary_data_unsupported",
            f"{where}.binary_data_size: the binary tensor extension is not supported; send 'data' in JSON",
        )
    unknown = sorted(set(value) - set(OPTION_NAMES) - PROTOCOL_PARAMETERS)
    if unknown:
        raise _fail("unknown_option", f"{where}: unknown parameter(s) {unknown}; options: {list(OPTION_NAMES)}")
    return {k: v for k, v in value.items() if k in OPTION_NAMES}


def _shape(value: Any, where: str) -> List[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise _fail("bad_shape", f"{where}.shape must be a list of integers")
    if any(d < 0 for d in value):
        raise _fail("bad_shape", f"{where}.shape {value} has a negative dimension")
    return list(value)


def _requested_outputs(value: Any) -> Optional[List[str]]:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _fail("bad_json", "'outputs' must be a list of {\"name\": ...} objects")
    names: List[str] = []
    for i, output in enumerate(value):
        if not isinstance(output, Mapping) or not set(output) <= {"name", "parameters"}:
            raise _fail("bad_json", f"outputs[{i}] must be an object with 'name' (and 'parameters')")
        name = output.get("name")
        if name not in OUTPUT_NAMES:
            raise _fail("unknown_output", f"outputs[{i}].name: unknown output {name!r}; outputs: {list(OUTPUT_NAMES)}")
        if name not in names:
            names.append(name)
    return names


def _flatten(data: Any) -> List[Any]:
    """A BYTES tensor's elements, flat (OIP allows nested lists in row-major order)."""
    if not isinstance(data, list):
        return [data]
    return [element for item in data for element in _flatten(item)]


def _named(where: str, error: RequestError) -> RequestError:
    if not error.message.startswith(where):
        error.message = f"{where}: {error.message}"
    return error


def _images(data: Any, n: int, where: str, shape, max_side: int, max_pixels: int) -> List[Tensor]:
    if not isinstance(data, list):
        raise _fail("bad_json", f"{where}.data must be a list of base64 strings")
    elements = _flatten(data)
    if len(elements) != n:
        raise _fail("bad_shape", f"{where}.data holds {len(elements)} elements; {where}.shape says {n}")
    out = []
    for k, element in enumerate(elements):
        field = f"{where}.data[{k}]"
        try:
            out.append(decode_base64_image(element, shape, max_side, max_pixels, field=field))
        except RequestError as err:
            raise _named(field, err) from None
    return out


def _array(data: Any, dims: List[int], where: str) -> List[Tensor]:
    if not isinstance(data, list):
        raise _fail("bad_json", f"{where}.data must be a list of numbers")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        array = np.asarray([], dtype=object)
    if array.dtype.kind not in "iuf":
        raise _fail("bad_array", f"{where}.data must hold FP32 numbers only, as a flat or nested list of shape {dims}")
    size = math.prod(dims)
    if array.ndim == 1 and array.size == size:
        array = array.reshape(dims)
    if list(array.shape) != dims:
        raise _fail(
            "bad_shape", f"{where}.data has {array.size} values (shape {list(array.shape)}); {where}.shape is {dims}"
        )
    return list(decode_array(array, tuple(dims), field=f"{where}.data").unbind(0))


def decode_infer_request(
    body: Mapping[str, Any],
    shape: Sequence[int],
    max_side: int = MAX_IMAGE_SIDE,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_inputs: int = MAX_INSTANCES,
) -> InferRequest:
    """An OIP request body -> its inputs (each of the model's input ``shape``) and options;
    RequestError naming the field on any problem. Cheap checks come before any image is decoded."""
    shape = tuple(shape)
    unknown = sorted(set(body) - set(REQUEST_KEYS))
    if unknown:
        raise _fail("bad_json", f"unknown key(s) {unknown}; an OIP request holds {list(REQUEST_KEYS)}")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _fail("bad_json", "'id' must be a string")
    options = _parameters(body.get("parameters"), "parameters")
    outputs = _requested_outputs(body.get("outputs"))
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1:
        count = len(inputs) if isinstance(inputs, list) else "none"
        raise _fail("bad_json", f"'inputs' must hold one input tensor ('image' BYTES or 'array' FP32), got {count}")
    tensor, where = inputs[0], "inputs[0]"
    if not isinstance(tensor, Mapping):
        raise _fail("bad_json", f"{where} must be an object with {list(INPUT_KEYS)}")
    unknown = sorted(set(tensor) - set(INPUT_KEYS))
    if unknown:
        raise _fail("bad_json", f"{where}: unknown key(s) {unknown}; an input holds {list(INPUT_KEYS)}")
    name = tensor.get("name")
    if not isinstance(name, str) or name not in INPUTS:
        accepted = ", ".join(f"{k!r} ({v})" for k, v in INPUTS.items())
        raise _fail("unknown_input", f"{where}.name: unknown input {name!r}; this model's inputs are {accepted}")
    datatype = tensor.get("datatype")
    if datatype != INPUTS[name]:
        raise _fail("bad_datatype", f"{where}.datatype: input {name!r} is {INPUTS[name]}, got {datatype!r}")
    if "shape" not in tensor:
        raise _fail("bad_shape", f"{where}.shape is missing")
    dims = _shape(tensor["shape"], where)
    options.update(_parameters(tensor.get("parameters"), f"{where}.parameters"))
    if name == "image" and not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)):
        raise _fail("bad_shape", f"{where}.shape: 'image' is [N] or [N, 1] (one encoded image an element), got {dims}")
    if name == "array" and (len(dims) != 1 + len(shape) or tuple(dims[1:]) != shape):
        raise _fail("bad_shape", f"{where}.shape: 'array' is [N, {', '.join(map(str, shape))}], got {dims}")
    if dims[0] < 1:
        raise _fail("bad_shape", f"{where}.shape: {dims} holds no element")
    if dims[0] > max_inputs:
        raise _fail("too_many_instances", f"{where}.shape: {dims[0]} elements; at most {max_inputs} a request", 413)
    if "data" not in tensor:
        raise _fail("missing_data", f"{where}.data is missing")
    if name == "image":
        xs = _images(tensor["data"], dims[0], where, shape, max_side, max_pixels)
    else:
        xs = _array(tensor["data"], dims, where)
    return InferRequest(xs, options, request_id, outputs)


def infer_response(
    request: InferRequest, answers: Sequence[Mapping[str, Any]], model_name: str, n_classes: int
) -> Dict[str, Any]:
    """The engine's answers to ``request``'s elements -> an OIP response (outputs flat, row-major).

    ``probabilities`` has a column per class, in class-index order (the request asked the engine
    for every class). The setting's robustness card entry, when the card has one, is the
    parameter ``robustness`` (a JSON string: OIP parameters are scalars)."""
    first = answers[0]
    defense = first["defense"]
    parameters: Dict[str, Any] = {"defense": defense["mode"]}
    parameters.update({k: defense[k] for k in ("T_f", "R", "beta", "eps") if k in defense})
    parameters.update(batch_size=first["timing_ms"]["batch_size"], backend=first["timing_ms"]["backend"])
    if first.get("robustness") is not None:
        parameters["robustness"] = json.dumps(first["robustness"])
    wanted = request.outputs or OUTPUT_NAMES
    outputs = []
    for name, datatype, value in OUTPUTS:
        if name not in wanted:
            continue
        rows = [value(a, n_classes) for a in answers]
        if any(row is None for row in rows):
            continue
        if isinstance(rows[0], list):
            shape, data = [len(rows), len(rows[0])], [v for row in rows for v in row]
        else:
            shape, data = [len(rows)], rows
        outputs.append({"name": name, "datatype": datatype, "shape": shape, "data": data})
    response: Dict[str, Any] = {"model_name": model_name}
    if request.id is not None:
        response["id"] = request.id
    response.update(parameters=parameters, outputs=outputs)
    return response
