"""OIP v2 over gRPC (``inference.GRPCInferenceService``) for the KServe runtime.

KServe's own gRPC server listens on ``[::]`` with no authentication and converts requests in ways
that lose this project's options (its ``InferParameter`` has no ``double_param``, so a float
parameter arrives empty and is dropped without a word). This module keeps KServe's servicer for
the probes, metadata and readiness and changes three things:

* **bind and token:** the server listens on the runtime's ``--bind`` address (127.0.0.1 by
  default), and every method but ``ServerLive`` and ``ServerReady`` needs the metadata
  ``authorization: Bearer <token>`` (missing: ``UNAUTHENTICATED``; wrong: ``PERMISSION_DENIED``);
* **requests:** ``ModelInfer`` turns the protobuf request into the same OIP JSON body the REST
  route reads (:func:`request_body`), so both transports share ``robustdeq.serving.oip``'s
  decoding, limits and errors. ``BYTES`` elements are the encoded image bytes themselves (gRPC
  carries bytes; REST carries base64 strings); ``raw_input_contents`` (tritonclient's default)
  and typed ``contents`` are both read. A float option goes as a string (``"2/255"``, ``"0.0078"``);
* **answers and errors:** the OIP JSON answer becomes a ``ModelInferResponse``
  (:func:`response_message`: outputs as ``raw_output_contents``, float parameters as strings),
  and a request error gets the gRPC status of its HTTP status (:data:`STATUS_CODES`) with the
  message naming the field, and the reason in the trailing metadata ``robustdeq-reason``.
"""

from __future__ import annotations

import base64
import hmac
import struct
from concurrent import futures
from typing import Any, Dict, List, Mapping, Optional

import grpc
import numpy as np
from grpc import aio
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.utils.utils import to_headers

from .options import RequestError

__all__ = [
    "OPEN_METHODS",
    "STATUS_CODES",
    "request_body",
    "response_message",
    "grpc_server_class",
]

#: methods open without the token: the probes (as ``OPEN_PATHS`` on REST)
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})
#: the gRPC status of a request error's HTTP status
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
#: OIP datatype -> (numpy dtype of raw contents, field of InferTensorContents)
_DATATYPES = {
    "BOOL": (np.bool_, "bool_contents"),
    "INT8": (np.int8, "int_contents"),
    "INT16": (np.int16, "int_contents"),
    "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"),
    "UINT8": (np.uint8, "uint_contents"),
    "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"),
    "UINT64": (np.uint64, "uint64_contents"),
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
    "BYTES": (None, "bytes_contents"),
}


def _parameters(message_map, where: str) -> Optional[Dict[str, Any]]:
    """Protobuf ``InferParameter``s -> scalars; one with no field this proto knows is a 400."""
    if not message_map:
        return None
    out: Dict[str, Any] = {}
    for key, value in message_map.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is None:
            raise RequestError(
                400,
                "bad_parameter",
                f"{where}.{key}: a parameter of a type this server's OIP proto does not carry (a double?); "
                'send numbers such as beta or eps as strings, e.g. "2/255"',
            )
        out[key] = getattr(value, kind)
    return out


def _split_bytes(raw: bytes, where: str) -> List[bytes]:
    """A raw ``BYTES`` tensor: each element is a 4-byte little-endian length, then the bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise RequestError(400, "bad_bytes", f"{where}: truncated BYTES element length at byte {at}")
        (length,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + length > len(raw):
            raise RequestError(400, "bad_bytes", f"{where}: a BYTES element says {length} bytes, {len(raw) - at} left")
        out.append(raw[at : at + length])
        at += length
    return out


def _tensor_data(tensor, raw: Optional[bytes], where: str) -> Any:
    """The elements of one input tensor as JSON values (BYTES as base64 strings), or None."""
    datatype = tensor.datatype
    if datatype not in _DATATYPES:
        raise RequestError(400, "bad_datatype", f"{where}.datatype: unknown datatype {datatype!r}")
    dtype, field = _DATATYPES[datatype]
    if raw is not None:
        if datatype == "BYTES":
            elements = _split_bytes(raw, f"{where} (raw_input_contents)")
            return [base64.b64encode(e).decode("ascii") for e in elements]
        if len(raw) % np.dtype(dtype).itemsize:
            raise RequestError(
                400, "bad_shape", f"{where} (raw_input_contents): {len(raw)} bytes is not a whole number of {datatype}"
            )
        return np.frombuffer(raw, dtype=dtype).tolist()
    if not tensor.HasField("contents"):
        return None
    values = list(getattr(tensor.contents, field))
    if datatype == "BYTES":
        return [base64.b64encode(v).decode("ascii") for v in values]
    return values


def request_body(request) -> Dict[str, Any]:
    """A ``ModelInferRequest`` as the OIP JSON body ``robustdeq.serving.oip`` decodes."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        message = f"raw_input_contents holds {len(raws)} tensors; the request has {len(request.inputs)} inputs"
        raise RequestError(400, "bad_shape", message)
    inputs = []
    for i, tensor in enumerate(request.inputs):
        where = f"inputs[{i}]"
        if raws and tensor.HasField("contents"):
            raise RequestError(400, "bad_json", f"{where}: 'contents' and raw_input_contents both given")
        item: Dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        data = _tensor_data(tensor, raws[i] if raws else None, where)
        if data is not None:
            item["data"] = data
        params = _parameters(tensor.parameters, f"{where}.parameters")
        if params:
            item["parameters"] = params
        inputs.append(item)
    body: Dict[str, Any] = {"inputs": inputs}
    if request.id:
        body["id"] = request.id
    params = _parameters(request.parameters, "parameters")
    if params:
        body["parameters"] = params
    if request.outputs:
        body["outputs"] = [{"name": o.name} for o in request.outputs]
    return body


def _parameter(value: Any):
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    return pb.InferParameter(string_param=value if isinstance(value, str) else repr(value))


def _raw(datatype: str, data: List[Any]) -> bytes:
    """One output's elements as ``raw_output_contents`` (little-endian; BYTES length-prefixed)."""
    if datatype == "BYTES":
        elements = [d.encode() if isinstance(d, str) else bytes(d) for d in data]
        return b"".join(struct.pack("<I", len(e)) + e for e in elements)
    return np.asarray(data, dtype=np.dtype(_DATATYPES[datatype][0]).newbyteorder("<")).tobytes()


def response_message(answer: Mapping[str, Any]):
    """The OIP JSON answer as a ``ModelInferResponse``: the outputs in ``raw_output_contents`` (as
    Triton answers, and what tritonclient reads best), float parameters as strings."""
    outputs, raw = [], []
    for output in answer["outputs"]:
        outputs.append(
            pb.ModelInferResponse.InferOutputTensor(
                name=output["name"], datatype=output["datatype"], shape=output["shape"]
            )
        )
        raw.append(_raw(output["datatype"], output["data"]))
    params = {k: _parameter(v) for k, v in (answer.get("parameters") or {}).items()}
    return pb.ModelInferResponse(
        model_name=answer.get("model_name", ""),
        id=str(answer.get("id", "")),
        outputs=outputs,
        raw_output_contents=raw,
        parameters=params,
    )


class _Servicer(InferenceServicer):
    """KServe's servicer with ``ModelInfer`` through the project's OIP body."""

    async def ModelInfer(self, request, context):
        body = request_body(request)
        headers = to_headers(context)
        answer, _ = await self._data_plane.infer(request=body, headers=headers, model_name=request.model_name)
        return response_message(answer)


class _RequestErrors(ExceptionToStatusInterceptor):
    """A ``RequestError`` gets the gRPC status of its HTTP status, the message that names the field,
    and its reason in the trailing metadata; everything else as KServe maps it."""

    async def handle_exception(self, ex, request_or_iterator, context, method_name):
        if isinstance(ex, RequestError):
            context.set_trailing_metadata((("robustdeq-reason", ex.reason),))
            await context.abort(STATUS_CODES.get(ex.status, grpc.StatusCode.INTERNAL), ex.message)
        await super().handle_exception(ex, request_or_iterator, context, method_name)


class _BearerToken(aio.ServerInterceptor):
    """``authorization: Bearer <token>`` on every method but :data:`OPEN_METHODS` (constant-time compare)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.rsplit("/", 1)[-1] in OPEN_METHODS:
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization")
        if sent and hmac.compare_digest(sent.encode(), self._expected):
            return await continuation(details)
        code, message = (
            (grpc.StatusCode.UNAUTHENTICATED, "missing token: send the metadata 'authorization: Bearer <token>'")
            if not sent
            else (grpc.StatusCode.PERMISSION_DENIED, "invalid token")
        )

        async def deny(request, context):
            await context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(deny)


def grpc_server_class(host: str, token: Optional[str]):
    """KServe's ``GRPCServer`` bound to ``host`` with the token check and the project's servicer;
    the runtime puts it in place of KServe's before ``ModelServer`` starts."""
    from kserve.protocol.grpc.server import GRPCServer

    class BoundGRPCServer(GRPCServer):
        async def start(self, max_workers):
            interceptors = [_RequestErrors()]
            if token is not None:
                interceptors.insert(0, _BearerToken(token))
            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=interceptors,
                options=[
                    ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                    ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
                ],
            )
            servicer = _Servicer(self._data_plane, self._model_repository_extension)
            pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
            self._server.add_insecure_port(f"{host}:{self._port}")
            await self._server.start()
            await self._server.wait_for_termination()

    return BoundGRPCServer
