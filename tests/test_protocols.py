"""The request protocols without a server: KServe v1 with TF-Serving's ``b64`` convention and the
OIP v2 codec (``robustdeq/serving/oip.py``), through ``robustdeq.serving.protocols``.

Good bodies decode to the same model inputs as the project's own body; each malformed body
gets a 4xx whose message names the field; the engine's answers become an OIP response whose
outputs agree with the project's own answer for the same image.
"""

from __future__ import annotations

import base64
import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from robustdeq.checkpoint import load_checkpoint
from robustdeq.serving.engine import InferenceEngine
from robustdeq.serving.oip import OUTPUT_NAMES
from robustdeq.serving.options import Limits, RequestError
from robustdeq.serving.protocols import decode

from .serving_helpers import SHIPPED

SHAPE = (3, 32, 32)


def _png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


B64 = [base64.b64encode(_png(i)).decode() for i in range(3)]
NOT_AN_IMAGE = base64.b64encode(b"%PDF-1.4 not an image").decode()


def _json(body) -> bytes:
    return json.dumps(body).encode()


def _refused(body, content_type="application/json", shape=SHAPE, headers=None):
    with pytest.raises(RequestError) as info:
        decode(_json(body) if not isinstance(body, bytes) else body, content_type, shape, headers=headers)
    return info.value


def _own(i: int) -> torch.Tensor:
    return decode(_json({"image": B64[i]}), "application/json", SHAPE).inputs[0]


# ---- KServe v1 and TF-Serving's binary convention ----------------------------------------------
def test_v1_binary_conventions_decode_like_the_project_s_own_body():
    body = {
        "instances": [
            {"b64": B64[0]},
            {"image_bytes": {"b64": B64[1]}, "R": 2},
            {"image": {"b64": B64[2]}},
            {"data": B64[0]},
            B64[1],
        ],
        "top_k": 2,
    }
    request = decode(_json(body), "application/json", SHAPE)
    assert request.protocol == "kserve-v1" and len(request.inputs) == 5
    for x, i in zip(request.inputs, (0, 1, 2, 0, 1)):
        assert torch.equal(x, _own(i))
    assert request.bodies[1]["R"] == 2 and all(b["top_k"] == 2 for b in request.bodies)
    assert all("image_bytes" not in b and "b64" not in b for b in request.bodies)  # no unknown option left over


@pytest.mark.parametrize(
    "instance,status,reason,field",
    [
        ({"b64": B64[0], "image": B64[1]}, 400, "bad_json", "instances[0] holds more than one input"),
        ({"image_bytes": {"b64": B64[0]}, "b64": B64[1]}, 400, "bad_json", "instances[0] holds more than one input"),
        ({"b64": 7}, 400, "bad_json", "instances[0].b64 must be a base64 string"),
        ({"image_bytes": {"b64": "***"}}, 400, "bad_base64", "instances[0].image_bytes.b64 is not valid base64"),
        ({"image_bytes": {"b64": NOT_AN_IMAGE}}, 400, "corrupt_image", "instances[0]: could not decode"),
        ({"image_bytes": {"b64": B64[0]}, "R_typo": 1}, 200, "ok", ""),  # options are checked later
    ],
)
def test_v1_binary_convention_errors_name_the_field(instance, status, reason, field):
    body = {"instances": [instance]}
    if status == 200:
        assert decode(_json(body), "application/json", SHAPE).bodies == [{"R_typo": 1, "image": B64[0]}]
        return
    err = _refused(body)
    assert (err.status, err.reason) == (status, reason) and err.message.startswith(field), err.message


def test_v1_b64_instances_keep_the_instance_limit():
    err = _refused({"instances": [{"b64": B64[0]}] * 65})
    assert (err.status, err.reason) == (413, "too_many_instances")


# ---- OIP v2: good requests -----------------------------------------------------------------------
def _bytes_request(data, shape=None, **extra):
    tensor = {"name": "image", "datatype": "BYTES", "shape": shape or [len(data)], "data": data}
    tensor.update(extra.pop("tensor", {}))
    return {"inputs": [tensor], **extra}


def test_oip_bytes_elements_are_images_and_parameters_are_options():
    body = _bytes_request(
        B64, id="req-7", parameters={"defense": "on", "R": 5}, tensor={"parameters": {"R": 3, "content_type": "str"}}
    )
    request = decode(_json(body), "application/json", SHAPE)
    assert request.protocol == "oip-v2" and request.infer.id == "req-7" and request.infer.outputs is None
    assert [torch.equal(x, _own(i)) for i, x in enumerate(request.inputs)] == [True] * 3
    assert request.bodies == [{"defense": "on", "R": 3}] * 3  # the input's parameters win; protocol ones dropped
    nested = decode(_json(_bytes_request([[b] for b in B64], shape=[3, 1])), "application/json", SHAPE)
    assert all(torch.equal(a, b) for a, b in zip(nested.inputs, request.inputs))
    # some OIP clients send no content type: a body that starts with "{" is JSON
    assert decode(_json(body), None, SHAPE).protocol == "oip-v2"


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8)])
def test_oip_fp32_flat_or_nested_takes_the_model_s_input_shape(shape):
    rng = np.random.default_rng(1)
    batch = rng.random((2, *shape), dtype=np.float32)
    dims = [2, *shape]
    flat = {"inputs": [{"name": "array", "datatype": "FP32", "shape": dims, "data": batch.ravel().tolist()}]}
    nested = copy.deepcopy(flat)
    nested["inputs"][0]["data"] = batch.tolist()
    for body in (flat, nested):
        request = decode(_json(body), "application/json", shape)
        assert len(request.inputs) == 2
        assert torch.equal(torch.stack(request.inputs), torch.from_numpy(batch))
    other = (3, 32, 32) if shape != (3, 32, 32) else (1, 8, 8)
    assert _refused(flat, shape=other).reason == "bad_shape"  # the shape is the model's, not a constant


# ---- OIP v2: malformed requests ------------------------------------------------------------------
def _fp32(n=1, **tensor):
    base = {"name": "array", "datatype": "FP32", "shape": [n, *SHAPE], "data": [0.5] * (n * 3072)}
    return {"inputs": [{**base, **tensor}]}


MALFORMED = [
    # (body, status, reason, the field the message starts with)
    (_fp32(datatype="FP64"), 400, "bad_datatype", "inputs[0].datatype"),
    (_bytes_request(B64[:1], tensor={"datatype": "FP32"}), 400, "bad_datatype", "inputs[0].datatype"),
    (_fp32(shape=[1, 3, 28, 28]), 400, "bad_shape", "inputs[0].shape"),
    (_fp32(shape=[2, 3, 32, 32]), 400, "bad_shape", "inputs[0].data"),  # 2 declared, data for 1
    (_fp32(shape=["1", 3, 32, 32]), 400, "bad_shape", "inputs[0].shape"),
    (_fp32(shape=[0, 3, 32, 32], data=[]), 400, "bad_shape", "inputs[0].shape"),
    (_bytes_request(B64[:2], shape=[1]), 400, "bad_shape", "inputs[0].data"),
    (_bytes_request(B64[:2], shape=[2, 3, 32]), 400, "bad_shape", "inputs[0].shape"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}, 400, "missing_data", "inputs[0].data"),
    (_bytes_request([B64[0], NOT_AN_IMAGE]), 400, "corrupt_image", "inputs[0].data[1]"),
    (_bytes_request([B64[0], "***"]), 400, "bad_base64", "inputs[0].data[1]"),
    (_bytes_request([B64[0], 5]), 400, "bad_json", "inputs[0].data[1]"),
    (_bytes_request(B64[:1], tensor={"name": "input-0"}), 400, "unknown_input", "inputs[0].name"),
    (_bytes_request([B64[0]] * 65), 413, "too_many_instances", "inputs[0].shape"),
    (_fp32(data=[True] * 3072), 400, "bad_array", "inputs[0].data"),
    (_fp32(data=["0.5"] * 3072), 400, "bad_array", "inputs[0].data"),
    (_fp32(data=[[0.5] * 3, [0.5]]), 400, "bad_array", "inputs[0].data"),
    (_fp32(data=[2.0] * 3072), 400, "array_out_of_range", "inputs[0].data"),
    (_fp32(data=[1e300] * 3072), 400, "non_finite", "inputs[0].data"),
    (_bytes_request(B64[:1], parameters={"Tf": 1}), 400, "unknown_option", "parameters"),
    (_bytes_request(B64[:1], tensor={"parameters": {"image": 1}}), 400, "unknown_option", "inputs[0].parameters"),
    (_bytes_request(B64[:1], parameters="on"), 400, "bad_json", "parameters"),
    (_bytes_request(B64[:1], tensor={"parameters": {"binary_data_size": 9}}), 400, "binary_data_unsupported",
     "inputs[0].parameters.binary_data_size"),
    (_bytes_request(B64[:1], outputs=[{"name": "logits"}]), 400, "unknown_output", "outputs[0].name"),
    (_bytes_request(B64[:1], id=7), 400, "bad_json", "'id'"),
    (_bytes_request(B64[:1], extra=1), 400, "bad_json", "unknown key(s) ['extra']"),
    (_bytes_request(B64[:1], tensor={"extra": 1}), 400, "bad_json", "inputs[0]: unknown key(s) ['extra']"),
    ({"inputs": []}, 400, "bad_json", "'inputs'"),
    ({"inputs": _fp32()["inputs"] * 2}, 400, "bad_json", "'inputs'"),
]  # fmt: skip


@pytest.mark.parametrize("body,status,reason,field", MALFORMED, ids=[f"{m[2]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_oip_requests_get_a_4xx_naming_the_field(body, status, reason, field):
    err = _refused(body)
    assert (err.status, err.reason) == (status, reason), err.message
    assert err.message.startswith(field), err.message
    assert set(err.to_dict()) >= {"error"}  # OIP's error shape


def test_the_binary_extension_is_refused_by_its_header():
    err = _refused(b'{"inputs": []}\x00\x01', headers={"Inference-Header-Content-Length": "14"})
    assert (err.status, err.reason) == (400, "binary_data_unsupported")
    assert err.message.startswith("Inference-Header-Content-Length")


# ---- options and the OIP response ---------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    ckpt = load_checkpoint(SHIPPED / "model.pt")
    card = json.loads((SHIPPED / "robustness_card.json").read_text())
    return InferenceEngine(ckpt, card, Limits(lane="defended", default_defense="on"), name="deq-tiny-defended")


def _answer(request, engine, headers=None):
    options = request.options(headers or {}, engine)
    answers, _ = engine.predict(torch.stack(request.inputs), options)
    return request.respond(answers, engine), answers


def test_an_oip_response_carries_every_output_and_agrees_with_the_own_answer(engine):
    body = _bytes_request(B64[:2], id="abc", parameters={"T_f": 1, "R": 2})
    response, _ = _answer(decode(_json(body), "application/json", SHAPE), engine)
    own, _ = _answer(decode(_json({"image": B64[1], "T_f": 1, "R": 2}), "application/json", SHAPE), engine)
    assert response["model_name"] == "deq-tiny-defended" and response["id"] == "abc"
    outputs = {o["name"]: o for o in response["outputs"]}
    assert list(outputs) == list(OUTPUT_NAMES)  # this model's card has a gate: high_entropy is there too
    n, c, s = 2, len(engine.labels), engine.n_steps
    expected = {
        "label": ("BYTES", [n]), "index": ("INT32", [n]), "probabilities": ("FP32", [n, c]),
        "entropy": ("FP32", [n]), "entropy_trajectory": ("FP32", [n, s]), "readout_state": ("INT32", [n]),
        "residual": ("FP32", [n]), "high_entropy": ("BOOL", [n]), "defense_ran": ("BOOL", [n]),
        "entropy_reduction": ("FP32", [n]), "solve_ms": ("FP32", [n]), "defense_ms": ("FP32", [n]),
    }  # fmt: skip
    for name, (datatype, shape) in expected.items():
        out = outputs[name]
        assert (out["datatype"], out["shape"]) == (datatype, shape), name
        assert len(out["data"]) == int(np.prod(shape)), name
    probs = np.array(outputs["probabilities"]["data"]).reshape(n, c)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert outputs["index"]["data"] == probs.argmax(1).tolist()
    assert outputs["label"]["data"] == [engine.labels[i] for i in outputs["index"]["data"]]
    # the second element is the same image, same options, as the own body
    assert outputs["label"]["data"][1] == own["label"] and outputs["readout_state"]["data"][1] == own["state"]
    assert outputs["entropy"]["data"][1] == pytest.approx(own["entropy"], abs=1e-6)
    assert probs[1, own["index"]] == pytest.approx(own["top_k"][0]["probability"], abs=1e-6)
    assert outputs["defense_ran"]["data"] == [True, True] and min(outputs["defense_ms"]["data"]) > 0
    params = response["parameters"]
    assert params["defense"] == "on" and (params["T_f"], params["R"]) == (1, 2) and params["batch_size"] == 2
    assert "robustness" not in params  # T_f = 1, R = 2 is not a setting the card evaluated


def test_the_card_entry_is_a_response_parameter_and_outputs_can_be_chosen(engine):
    body = _bytes_request(B64[:1], outputs=[{"name": "probabilities"}, {"name": "label"}, {"name": "label"}])
    request = decode(_json(body), "application/json", SHAPE)
    response, answers = _answer(request, engine, headers={"X-R": "10"})
    assert [o["name"] for o in response["outputs"]] == ["label", "probabilities"] and "id" not in response
    entry = json.loads(response["parameters"]["robustness"])
    assert entry == answers[0]["robustness"] and entry["name"] == "defense-T2-R10"


def test_oip_option_errors_name_the_parameters(engine):
    request = decode(_json(_bytes_request(B64[:1], parameters={"R": 500})), "application/json", SHAPE)
    with pytest.raises(RequestError) as info:
        request.options({}, engine)
    assert info.value.reason == "option_out_of_bounds" and info.value.message.startswith("parameters: option 'R'")
    plain = InferenceEngine(load_checkpoint(SHIPPED / "model.pt"), None, Limits(), name="deq-tiny")
    request = decode(_json(_bytes_request(B64[:1], parameters={"defense": "on"})), "application/json", SHAPE)
    with pytest.raises(RequestError) as info:
        request.options({}, plain)
    assert info.value.reason == "wrong_lane"
    # a model whose card has no gate: no high_entropy output, no card entry
    response, _ = _answer(decode(_json(_bytes_request(B64[:1])), "application/json", SHAPE), plain)
    assert "high_entropy" not in {o["name"] for o in response["outputs"]} and "robustness" not in response["parameters"]
