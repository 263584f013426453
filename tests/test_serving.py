"""Serving without a server: options, payloads, the engine, metrics, archives, the handler.

The handler tests drive ``handlers/robustdeq_handler.py`` with TorchServe's own request
plumbing (``ts.service.Service.retrieve_data_for_inference``, ``ts.context.Context``,
the YAML metrics cache) on an archive extracted from ``model_store/``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from robustdeq.checkpoint import load_checkpoint
from robustdeq.data import PROJECT_ROOT
from robustdeq.defense import entropy_reduction
from robustdeq.serving import archive as archive_mod
from robustdeq.serving.engine import InferenceEngine
from robustdeq.serving.inprocess import make_request
from robustdeq.serving.inputs import decode_request
from robustdeq.serving.metrics import METRICS, entropy_band, observations, render_metrics_yaml
from robustdeq.serving.options import HARD_MAX_R, Limits, RequestError, parse_options
from robustdeq.serving.server import Ports, render_config

SHIPPED = PROJECT_ROOT / "training" / "shipped" / "deq-tiny-trades-rs"
STORE = PROJECT_ROOT / "model_store"
BASE_NICE = os.getpriority(os.PRIO_PROCESS, 0)  # before any worker: the test runner's own (0, or more under nice)
SHAPE = (3, 32, 32)


def png_bytes(array_hwc: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array_hwc).save(buf, format=fmt)
    return buf.getvalue()


def options(body=None, headers=None, lane="defended", n_steps=8):
    limits = Limits(lane=lane, default_defense="on" if lane == "defended" else "off")
    return parse_options(body or {}, headers or {}, limits, n_steps, default_state=5)


def reason_of(fn):
    with pytest.raises(RequestError) as info:
        fn()
    return info.value.status, info.value.reason


# ---- options ------------------------------------------------------------------------------
def test_option_defaults_headers_and_precedence():
    o = options()
    assert (o.state, o.defense, o.T_f, o.R, o.top_k) == (5, "on", 2, 10, 3)
    assert math.isclose(o.beta, 2 / 255) and math.isclose(o.eps, 8 / 255)
    o = options(headers={"X-T-f": "1", "x-r": "4", "X-Eps": "4/255", "X-Top-K": "5", "X-Forwarded-For": "1.2.3.4"})
    assert (o.T_f, o.R, o.top_k) == (1, 4, 5) and math.isclose(o.eps, 4 / 255)
    o = options(body={"R": 7}, headers={"X-R": "3"})  # the body wins
    assert o.R == 7
    assert options(body={"state": -1}).state == 8  # negative indices count from z[N]
    assert options(body={"defense": "gated"}).defense == "gated"
    assert options(lane="plain").defense == "off"


@pytest.mark.parametrize(
    "body,lane,reason",
    [
        ({"Rr": 3}, "defended", "unknown_option"),
        ({"R": HARD_MAX_R + 1}, "defended", "option_out_of_bounds"),
        ({"R": -1}, "defended", "option_out_of_bounds"),
        ({"T_f": 0}, "defended", "option_out_of_bounds"),
        ({"T_f": 9}, "defended", "option_out_of_bounds"),
        ({"eps": 1.0}, "defended", "option_out_of_bounds"),
        ({"beta": "1/2"}, "defended", "option_out_of_bounds"),
        ({"state": 0}, "defended", "option_out_of_bounds"),
        ({"state": 9}, "defended", "option_out_of_bounds"),
        ({"top_k": 11}, "defended", "option_out_of_bounds"),
        ({"R": 2.5}, "defended", "bad_option_value"),
        ({"R": "ten"}, "defended", "bad_option_value"),
        ({"eps": "nan"}, "defended", "bad_option_value"),
        ({"R": True}, "defended", "bad_option_value"),
        ({"defense": "maybe"}, "defended", "bad_option_value"),
        ({"defense": "on"}, "plain", "wrong_lane"),
        ({"defense": "gated"}, "plain", "wrong_lane"),
    ],
)
def test_option_errors_name_the_problem(body, lane, reason):
    status, got = reason_of(lambda: options(body=body, lane=lane))
    assert status == 400 and got == reason


def test_limits_from_config():
    limits = Limits.from_config({"lane": "defended", "default_defense": "on", "R": "5", "max_R": 20, "eps": "4/255"})
    assert limits.R == 5 and limits.max_R == 20 and math.isclose(limits.eps, 4 / 255)
    with pytest.raises(ValueError, match="unknown handler setting"):
        Limits.from_config({"RR": 3})
    with pytest.raises(ValueError, match="max_R"):
        Limits.from_config({"max_R": HARD_MAX_R + 1})
    with pytest.raises(ValueError, match="plain lane"):
        Limits.from_config({"lane": "plain", "default_defense": "on"})
    with pytest.raises(ValueError, match="cpu_nice"):  # a worker may lower its priority, never raise it
        Limits.from_config({"cpu_nice": -5})
    # an archive can narrow the bounds: R above its max_R is refused
    narrow = Limits(lane="defended", default_defense="on", R=5, max_R=8)
    with pytest.raises(RequestError, match=r"\[0, 8\]"):
        parse_options({"R": 9}, {}, narrow, 8, 5)


# ---- payloads ------------------------------------------------------------------------------
def test_images_of_any_size_and_mode_become_model_inputs():
    rng = np.random.default_rng(0)
    exact = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x, body = decode_request(png_bytes(exact), "image/png", SHAPE)
    assert body == {} and x.shape == SHAPE
    assert torch.equal(x, torch.from_numpy(exact).permute(2, 0, 1).float() / 255)  # PNG at 32x32: lossless
    big = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    x, _ = decode_request(png_bytes(big, "JPEG"), "image/jpeg", SHAPE)
    assert x.shape == SHAPE and 0 <= float(x.min()) and float(x.max()) <= 1
    gray = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    assert decode_request(png_bytes(gray), None, SHAPE)[0].shape == SHAPE
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    assert decode_request(png_bytes(rgba), "application/octet-stream", SHAPE)[0].shape == SHAPE
    encoded = base64.b64encode(png_bytes(exact)).decode()
    x, body = decode_request({"image": encoded, "R": 3}, "application/json", SHAPE)
    assert torch.equal(x, torch.from_numpy(exact).permute(2, 0, 1).float() / 255) and body["R"] == 3
    arr = torch.rand(3, 32, 32)
    x, _ = decode_request({"array": arr.tolist()}, "application/json", SHAPE)
    assert torch.allclose(x, arr)
    x, _ = decode_request({"array": arr[None].tolist()}, "application/json", SHAPE)
    assert x.shape == SHAPE


@pytest.mark.parametrize(
    "value,ctype,status,reason",
    [
        (b"", "image/png", 400, "empty_body"),
        (b"definitely not an image", "image/png", 400, "corrupt_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png", 400, "corrupt_image"),
        ({"array": np.zeros((3, 28, 28)).tolist()}, "application/json", 400, "bad_array_shape"),
        ({"array": [[1, 2], [3]]}, "application/json", 400, "bad_array"),
        ({"array": np.full((3, 32, 32), np.nan).tolist()}, "application/json", 400, "non_finite"),
        ({"array": np.full((3, 32, 32), 3.0).tolist()}, "application/json", 400, "array_out_of_range"),
        ({"image": "***"}, "application/json", 400, "bad_base64"),
        ({"image": "aGVsbG8=", "array": [0]}, "application/json", 400, "bad_json"),
        ({"R": 3}, "application/json", 400, "bad_json"),
        (b"{not json", "application/json", 400, "bad_json"),
        ([1, 2, 3], "application/json", 400, "bad_json"),
        ("some text", "text/plain", 415, "unsupported_content_type"),
        (b"<xml/>", "application/xml", 415, "unsupported_content_type"),
    ],
)
def test_bad_payloads_get_4xx_with_a_reason(value, ctype, status, reason):
    assert reason_of(lambda: decode_request(value, ctype, SHAPE)) == (status, reason)


def test_oversized_images_are_refused():
    big = np.zeros((10, 5000, 3), dtype=np.uint8)
    assert reason_of(lambda: decode_request(png_bytes(big), "image/png", SHAPE, max_side=4096)) == (
        413,
        "image_too_large",
    )


# ---- engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    ckpt = load_checkpoint(SHIPPED / "model.pt")
    card = json.loads((SHIPPED / "robustness_card.json").read_text())
    return InferenceEngine(ckpt, card, Limits(lane="defended", default_defense="on"), name="deq-tiny-defended")


def test_engine_matches_the_library_permake_request(engine, test_batch):
    x = test_batch[0][:6]
    opts = [
        options(body={"defense": "off"}),
        options(body={"defense": "off", "state": -1}),
        options(body={"defense": "on", "T_f": 2, "R": 10}),
        options(body={"defense": "on", "T_f": 1, "R": 3}),
        options(body={"defense": "on", "R": 0}),
        options(body={"defense": "gated"}),
    ]
    answers, timing = engine.predict(x, opts)
    model = engine.model
    with torch.no_grad():  # the references need no graph (the defense enables it where it must)
        plain = model.trajectory(x)
        assert answers[0]["index"] == int(plain.predict(5)[0])
        assert answers[1]["index"] == int(plain.predict(-1)[1]) and answers[1]["state"] == 8
        for i, (T_f, R) in ((2, (2, 10)), (3, (1, 3))):
            ref = entropy_reduction(model, x[i : i + 1], T_f=T_f, R=R)
            assert answers[i]["index"] == int(ref.trajectory.predict(5)[0])
            assert answers[i]["defense"]["ran"] is True
            assert answers[i]["entropy"] == pytest.approx(float(ref.trajectory.entropy(5)[0]), abs=1e-5)
            assert answers[i]["defense"]["entropy_reduction"] == pytest.approx(
                float(ref.plain.entropy(5)[0] - ref.trajectory.entropy(5)[0]), abs=1e-5
            )
            assert 0 < answers[i]["defense"]["perturbation_linf"] <= 8 / 255 + 1e-6
        assert answers[4]["defense"]["ran"] is False and answers[4]["index"] == int(plain.predict(5)[4])
        gate = engine.gate
        triggered = float(plain.entropy(gate["state"])[5]) > gate["threshold"]
        assert answers[5]["defense"]["triggered"] is triggered and answers[5]["high_entropy"] is triggered
    for a in answers:
        assert len(a["entropy_trajectory"]) == 8 and len(a["residual_trajectory"]) == 8
        assert len(a["top_k"]) == 3 and a["top_k"][0]["index"] == a["index"]
        assert sum(t["probability"] for t in a["top_k"]) <= 1 + 1e-6
    assert timing.solve > 0 and timing.defense > 0 and timing.batch_size == 6
    assert answers[0]["timing_ms"]["defense"] == 0 and answers[2]["timing_ms"]["defense"] > 0


def test_engine_reports_the_card_entry_for_the_setting(engine):
    entry = engine.card_entry(options(body={"defense": "on"}))
    assert entry["name"] == "defense-T2-R10" and entry["robust"]["acc"] == pytest.approx(0.203)
    assert engine.card_entry(options(body={"defense": "off"}))["name"] == "none"
    assert engine.card_entry(options(body={"defense": "off", "state": 8})) is None  # not the evaluated state
    assert engine.card_entry(options(body={"defense": "on", "eps": "4/255"})) is None  # not the evaluated eps
    assert engine.card_entry(options(body={"defense": "on", "R": 7})) is None  # not in the card
    # the card holds defense-T2-R10 twice: the adaptive row answers, not the transferred one
    assert entry["robust_kind"].startswith("adaptive") and entry["cost_vs_plain"] == pytest.approx(27.36, abs=0.01)
    grid_only = engine.card_entry(options(body={"defense": "on", "T_f": 1, "R": 5}))
    assert grid_only["name"] == "defense-T1-R5" and grid_only["robust_kind"].startswith("non-adaptive")
    assert engine.card_entry(options(body={"defense": "gated"}))["name"] == "gated-T2-R10"
    described = engine.describe()
    assert described["robustness_card"]["schema"] == "robustdeq.robustness_card/1"
    assert described["gate"]["state"] == 5 and described["limits"]["max_R"] == HARD_MAX_R


def test_gated_needs_an_evaluated_threshold():
    ckpt = load_checkpoint(SHIPPED / "model.pt")
    bare = InferenceEngine(ckpt, None, Limits(lane="defended", default_defense="on"))
    assert reason_of(lambda: bare.check(options(body={"defense": "gated"}))) == (400, "gate_unavailable")
    answers, _ = bare.predict(torch.rand(1, 3, 32, 32), [options(body={"defense": "on", "R": 1})])
    assert answers[0]["robustness"] is None and answers[0]["high_entropy"] is None


# ---- metrics ---------------------------------------------------------------------------------
def test_metrics_yaml_declares_every_handler_metric():
    text = (PROJECT_ROOT / "serving" / "metrics.yaml").read_text()
    regenerate = "python -m robustdeq.serving.metrics > serving/metrics.yaml"
    assert text == render_metrics_yaml(), f"serving/metrics.yaml is stale: run {regenerate}"
    declared = yaml.safe_load(text)["model_metrics"]
    names = {m["name"]: (kind, tuple(m["dimensions"])) for kind, ms in declared.items() for m in ms}
    assert names == {m.name: (m.kind, m.dimensions) for m in METRICS}


def test_observations_cover_the_modes(engine, test_batch):
    x = test_batch[0][:3]
    opts = [options(body={"defense": d}) for d in ("off", "on", "gated")]
    answers, _ = engine.predict(x, opts)
    err = RequestError(400, "corrupt_image", "x")
    obs = observations("m", answers, [err, err], 0.1, 4)

    def total(metric, **labels):
        return sum(v for name, v, dims in obs if name == metric and all(d in dims for d in labels.values()))

    assert total("robustdeq_requests_total") == 3
    # counters are summed per batch and label set: one line carries both rejections
    assert ("robustdeq_rejected_requests_total", 2.0, ("m", "corrupt_image", "400")) in obs
    assert len({(n, d) for n, _, d in obs if n.endswith("_total")}) == len(
        [n for n, _, _ in obs if n.endswith("_total")]
    )
    assert total("robustdeq_defended_requests_total") == sum(a["defense"]["ran"] for a in answers)
    gated_through = 0 if answers[2]["defense"]["ran"] else 1
    assert total("robustdeq_gated_through_requests_total") == gated_through
    # histograms keep one observation per request
    assert [n for n, _, _ in obs].count("robustdeq_prediction_entropy") == 3
    bands = {(d[1], d[2]): v for n, v, d in obs if n == "robustdeq_prediction_entropy_band_total"}
    assert bands == Counter((a["defense"]["mode"], entropy_band(a["entropy"])) for a in answers)
    assert (entropy_band(0.0), entropy_band(1.8), entropy_band(2.3)) == ("0.00-0.25", "1.75-2.00", "2.25+")


# ---- archives and config ---------------------------------------------------------------------
def test_shipped_archives_rebuild_byte_for_byte(tmp_path):
    built = archive_mod.build_shipped(tmp_path)
    assert len(built) == 2 * len(archive_mod.SHIPPED)
    for path in built:
        shipped = STORE / path.name
        assert shipped.is_file(), f"{shipped} missing: run make archives"
        assert path.read_bytes() == shipped.read_bytes(), f"{shipped} is stale: run make archives"
    with zipfile.ZipFile(STORE / "deq-tiny-defended.mar") as z:
        names = set(z.namelist())
        config = yaml.safe_load(z.read("model-config.yaml"))
        assert z.read("model.pt") == (SHIPPED / "model.pt").read_bytes()
    assert {"model.pt", "robustdeq_handler.py", "model-config.yaml", "robustness_card.json"} <= names
    assert {"index_to_name.json", "MAR-INF/MANIFEST.json"} <= names
    assert config["handler"]["lane"] == "defended" and config["batchSize"] < 16
    assert config["responseTimeout"] >= 60
    assert config["handler"]["cpu_nice"] == 10 and config["minWorkers"] == 1
    plain = archive_mod.read_model_config(STORE / "deq-tiny.mar")
    assert plain["minWorkers"] == plain["maxWorkers"] == 2 and plain["handler"].get("cpu_nice", 0) == 0
    # the slowest shipped model's defended lane has its own, longer timeout
    assert archive_mod.read_model_config(STORE / "lyadeq-small-defended.mar")["responseTimeout"] == 120


def test_lane_settings_take_each_lane_s_default_workers():
    parse = archive_mod.parse_lane_config
    assert parse("16,5,30", "plain").workers == 2 and parse("4,10,60", "defended").workers == 1
    assert parse("16,5,30").workers == 1 and parse("16,5,30,3", "plain").workers == 3
    with pytest.raises(ValueError, match="as integers"):
        parse("16,5", "plain")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        parse("16,5,30,0")


def test_archive_refuses_a_card_of_another_checkpoint_or_an_invalid_one(tmp_path):
    other = PROJECT_ROOT / "training" / "shipped" / "deq-tiny-trades" / "robustness_card.json"
    with pytest.raises(ValueError, match="another checkpoint"):
        archive_mod.build_archives(SHIPPED / "model.pt", "x", tmp_path, card=other)
    with pytest.raises(ValueError, match="max_R"):
        archive_mod.build_archives(SHIPPED / "model.pt", "x", tmp_path, defaults={"max_R": 500})
    invalid = json.loads((SHIPPED / "robustness_card.json").read_text())
    del invalid["settings"][0]["cost_vs_plain"]
    (tmp_path / "invalid.json").write_text(json.dumps(invalid))
    with pytest.raises(ValueError, match="robustness card invalid at settings/0"):
        archive_mod.build_archives(SHIPPED / "model.pt", "x", tmp_path, card=tmp_path / "invalid.json")
    assert not list(tmp_path.glob("*.mar"))


def test_rendered_config_is_hardened(tmp_path):
    text = render_config(
        PROJECT_ROOT / "serving" / "config.properties",
        STORE,
        ["deq-tiny", "deq-tiny-defended"],
        Ports(18080, 18081, 18082, 17070, 17071),
        PROJECT_ROOT / "serving" / "metrics.yaml",
        system_metrics=False,
    )
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert props["inference_address"] == "http://127.0.0.1:18080"
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["metrics_address"].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == "127.0.0.1" and props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false" and props["enable_model_api"] == "false"
    assert props["install_py_dep_per_model"] == "false" and props["disable_system_metrics"] == "true"
    assert props["load_models"] == "deq-tiny.mar,deq-tiny-defended.mar"
    assert props["allowed_urls"].startswith("^file://" + str(STORE.resolve()).replace("/", "/"))
    assert props["metrics_mode"] == "prometheus"
    container = render_config(
        PROJECT_ROOT / "serving" / "config.properties",
        STORE,
        ["deq-tiny"],
        Ports(),
        PROJECT_ROOT / "serving" / "metrics.yaml",
        system_metrics=False,
        host="0.0.0.0",
    )
    props = dict(line.split("=", 1) for line in container.splitlines() if "=" in line and not line.startswith("#"))
    assert props["inference_address"] == "http://0.0.0.0:8080" and props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["management_address"] == "http://127.0.0.1:8081" and props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"


# ---- the handler, driven by TorchServe's own request plumbing ----------------------------------
@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    pytest.importorskip("ts")
    from robustdeq.serving.inprocess import InProcessWorker

    return InProcessWorker(STORE / "deq-tiny-defended.mar", tmp_path_factory.mktemp("deq-tiny-defended"))


@pytest.mark.parametrize("name", list(archive_mod.SHIPPED))
def test_every_shipped_archive_answers_with_its_own_card(name, cifar_test, tmp_path):
    """Each plain archive in model_store/ loads in TorchServe's handler and answers a request,
    quoting the undefended row of the card evaluated for exactly its checkpoint."""
    pytest.importorskip("ts")
    from robustdeq.serving.inprocess import InProcessWorker

    plain = InProcessWorker(STORE / f"{name}.mar", tmp_path)
    card = json.loads((archive_mod.SHIPPED[name].parent / "robustness_card.json").read_text())
    image = png_bytes(cifar_test.images[17].permute(1, 2, 0).numpy())
    [(status, answer)] = plain.handle([make_request("a", image, "image/png")])
    assert status == 200 and answer["model"] == name and answer["state"] == card["early_state"]
    undefended = next(s for s in card["settings"] if s["name"] == "none")
    assert answer["robustness"]["robust"]["acc"] == undefended["robust"]["acc"]


def test_an_in_process_worker_keeps_its_caller_s_priority_and_takes_overrides(worker, tmp_path):
    from robustdeq.serving.inprocess import InProcessWorker

    # the defended archive's cpu_nice 10 was not applied here
    assert os.getpriority(os.PRIO_PROCESS, 0) == BASE_NICE
    assert "cpu_nice" not in worker.config["handler"]
    threads = torch.get_num_threads()
    try:
        other = InProcessWorker(STORE / "deq-tiny.mar", tmp_path, handler_overrides={"torch_threads": 2})
        assert other.engine.limits.torch_threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_handler_answers_a_mixed_batch_and_rejects_only_the_bad_items(worker, cifar_test, caplog):
    context = worker.context
    image = cifar_test.images[3531].permute(1, 2, 0).numpy()
    good = png_bytes(image)
    batch = [
        make_request("a", good, "image/png", {"X-R": "5"}),
        make_request("b", b"garbage", "image/png"),
        make_request("c", {"array": np.full((3, 32, 32), np.nan).tolist()}, "application/json"),
        make_request("d", good, "image/png", {"X-Defense": "off"}),
        make_request("e", {"image": base64.b64encode(good).decode(), "T_f": 1, "R": 2}, "application/json"),
        make_request("f", good, "image/png", {"X-R": "500"}),
        make_request("g", "hello", "text/plain"),
        make_request("h", {"describe": True}, "application/json"),
    ]
    with caplog.at_level(logging.INFO):
        results = worker.handle(batch)
    statuses = [s for s, _ in results]
    assert statuses == [200, 400, 400, 200, 200, 400, 415, 200]
    assert [results[i][1]["reason"] for i in (1, 2, 5, 6)] == [
        "corrupt_image",
        "non_finite",
        "option_out_of_bounds",
        "unsupported_content_type",
    ]
    a, d, e = results[0][1], results[3][1], results[4][1]
    assert a["defense"]["ran"] and a["defense"]["R"] == 5 and not d["defense"]["ran"]
    assert e["defense"]["T_f"] == 1 and e["defense"]["R"] == 2
    assert a["model"] == "deq-tiny-defended" and results[7][1]["robustness_card"]["early_state"] == 5
    assert all(context.get_response_content_type(i) == "application/json" for i in range(len(batch)))
    # the metrics went to TorchServe's metric log lines, with the declared names and dimensions
    emitted = "\n".join(r.getMessage() for r in caplog.records)
    assert "robustdeq_rejected_requests_total.Count:1.0|#ModelName:deq-tiny-defended,Reason:corrupt_image" in emitted
    # a and e were both defended: one line per batch and label set carries the count
    assert "robustdeq_defended_requests_total.Count:2.0|#ModelName:deq-tiny-defended,Mode:on" in emitted
    assert emitted.count("robustdeq_defended_requests_total.") == 1


def test_kserve_v1_instances_are_one_request_with_several_inputs(worker, cifar_test):
    """{"instances": [...]} (KServe v1): answered {"predictions": [...]} in order, each instance with
    its own options; a bad instance fails its whole request and names the instance; the other
    requests of the batch are unaffected."""
    images = [png_bytes(cifar_test.images[i].permute(1, 2, 0).numpy()) for i in (3531, 17, 42)]
    encoded = [base64.b64encode(im).decode() for im in images]
    batch = [
        make_request("a", {"instances": [{"data": encoded[0]}, encoded[1], {"image": encoded[2], "R": 2}], "R": 5},
                     "application/json"),
        make_request("b", images[0], "image/png", {"X-R": "5"}),
        make_request("c", {"instances": [{"image": encoded[0]}, {"image": encoded[1], "R": 500}]}, "application/json"),
        make_request("d", {"instances": []}, "application/json"),
        make_request("e", {"instances": [encoded[0]] * 65}, "application/json"),
    ]  # fmt: skip
    results = worker.handle(batch)
    assert [status for status, _ in results] == [200, 200, 400, 400, 413]
    predictions = results[0][1]["predictions"]
    assert [p["defense"]["R"] for p in predictions] == [5, 5, 2]
    alone = [worker.handle([make_request("x", im, "image/png", {"X-R": "5"})])[0][1] for im in images[:2]]
    assert [p["label"] for p in predictions[:2]] == [a["label"] for a in alone]
    assert predictions[0]["label"] == results[1][1]["label"]
    assert results[2][1]["reason"] == "option_out_of_bounds" and results[2][1]["error"].startswith("instances[1]: ")
    assert results[3][1]["reason"] == "bad_json" and results[4][1]["reason"] == "too_many_instances"


def test_oip_and_v1_b64_requests_share_a_batch_with_the_others(worker, cifar_test):
    """OIP v2 and TF-Serving b64 bodies in one TorchServe batch with a raw image: each is one
    request answered in its own protocol; a malformed OIP body fails alone, naming its field."""
    images = [png_bytes(cifar_test.images[i].permute(1, 2, 0).numpy()) for i in (3531, 17)]
    encoded = [base64.b64encode(im).decode() for im in images]
    oip = {
        "id": "r1",
        "parameters": {"R": 5},
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": encoded}],
    }
    bad = {"inputs": [{"name": "image", "datatype": "FP64", "shape": [1], "data": encoded[:1]}]}
    batch = [
        make_request("a", json.dumps(oip).encode(), "application/json"),
        make_request("b", json.dumps(bad).encode(), "application/json"),
        make_request("c", images[1], "image/png", {"X-R": "5"}),
        make_request("d", json.dumps({"instances": [{"image_bytes": {"b64": encoded[0]}}], "R": 5}).encode(),
                     "application/json"),
    ]  # fmt: skip
    results = worker.handle(batch)
    assert [status for status, _ in results] == [200, 400, 200, 200]
    answer = results[0][1]
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    assert answer["id"] == "r1" and answer["model_name"] == "deq-tiny-defended" and answer["parameters"]["R"] == 5
    assert outputs["label"] == [results[3][1]["predictions"][0]["label"], results[2][1]["label"]]
    assert results[1][1]["reason"] == "bad_datatype" and results[1][1]["error"].startswith("inputs[0].datatype")


# ---- the ONNX fast path of the plain lane ------------------------------------------------------
def test_onnx_export_matches_pytorch_on_real_images(tmp_path, cifar_test):
    from robustdeq.export import OnnxPlainSession, PlainForward, export_onnx, parity

    model = load_checkpoint(SHIPPED / "model.pt").build_model()
    session = OnnxPlainSession(export_onnx(model, tmp_path / "deq-tiny.onnx"), threads=1)
    idx = torch.randperm(len(cifar_test), generator=torch.Generator().manual_seed(3))[:64]
    x = cifar_test.float_images(idx)
    for batch in (x, x[:1]):  # the batch axis is dynamic
        report = parity(model, session, batch)
        assert report["labels_agree"] == batch.shape[0]
        assert report["max_abs_logit_diff"] <= 2e-4, report  # every state z[1..N]
        with torch.no_grad():
            ref_logits = PlainForward(model)(batch)[0]
        assert float((session.run(batch)[0] - ref_logits).abs().max()) <= 1e-4  # the early-state readout
    with pytest.raises(ValueError, match="autograd"):
        export_onnx(load_checkpoint(PROJECT_ROOT / "training/shipped/lyadeq-tiny-trades/model.pt").build_model(), "x")


def test_engine_answers_plain_batches_through_onnx(engine, test_batch, tmp_path):
    with zipfile.ZipFile(STORE / "deq-tiny.mar") as z:
        z.extractall(tmp_path)
    config = yaml.safe_load((tmp_path / "model-config.yaml").read_text())
    fast = InferenceEngine.from_model_dir(str(tmp_path), config["handler"], name="deq-tiny")
    assert fast.limits.lane == "plain" and fast.card == engine.card and fast.labels == engine.labels
    x = test_batch[0][:8]
    plain = [options(body={"defense": "off"})] * 8
    slow_answers, _ = engine.predict(x, plain)
    fast_answers, timing = fast.predict(x, plain)
    assert timing.backend == "onnxruntime" and slow_answers[0]["timing_ms"]["backend"] == "torch"
    for s, f in zip(slow_answers, fast_answers):
        assert s["index"] == f["index"] and s["high_entropy"] == f["high_entropy"]
        assert f["entropy"] == pytest.approx(s["entropy"], abs=1e-4)
        assert f["entropy_trajectory"] == pytest.approx(s["entropy_trajectory"], abs=1e-3)
    mixed = plain[:7] + [options(body={"defense": "on", "R": 2})]
    answers, timing = fast.predict(x, mixed)  # a batch with the defense runs the real dynamics
    assert timing.backend == "torch" and answers[7]["defense"]["ran"]


def test_a_request_that_breaks_the_model_fails_alone(worker, cifar_test, monkeypatch):
    real_predict = worker.engine.predict

    def predict_failing_on_black(x, opts):  # fault injection: an all-black image "crashes" the model
        if bool((x.flatten(1).amax(1) == 0).any()):
            raise RuntimeError("injected failure")
        return real_predict(x, opts)

    monkeypatch.setattr(worker.engine, "predict", predict_failing_on_black)
    good = png_bytes(cifar_test.images[3531].permute(1, 2, 0).numpy())
    black = png_bytes(np.zeros((32, 32, 3), dtype=np.uint8))
    batch = [make_request(r, body, "image/png") for r, body in (("a", good), ("b", black), ("c", good))]
    results = worker.handle(batch)
    assert [s for s, _ in results] == [200, 500, 200]
    assert results[1][1]["reason"] == "internal_error" and results[0][1]["label"] == results[2][1]["label"]
