"""Hostile images and bodies: every answer is a 200 or a documented 4xx, never a 5xx.

Named cases first (one per class of hostile input the docs list), then seeded fuzzing:
2,000 mutated inputs through the decoder in-process and 200 through a real TorchServe,
whose worker must stay alive, keep its memory bounded and answer the next valid request.
The counts are printed in pytest's terminal summary.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustdeq.serving.fuzz import fuzz_cases, run_decoder
from robustdeq.serving.inputs import MAX_IMAGE_PIXELS
from robustdeq.serving.options import RequestError
from robustdeq.serving.protocols import decode
from robustdeq.serving.runfolder import http_get, read_keys

from .serving_helpers import png

SHAPE = (3, 32, 32)
#: fuzz reports printed by the terminal-summary hook in conftest.py
FUZZ_REPORTS: list = []


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(width: int, height: int, pixels: bytes = b"") -> bytes:
    """A PNG whose header declares width x height RGB pixels but carries only ``pixels``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(pixels))
        + _png_chunk(b"IEND", b"")
    )


def _decode(payload, ctype):
    return decode(payload, ctype, SHAPE).inputs


def _status(payload, ctype):
    try:
        _decode(payload, ctype)
    except RequestError as err:
        return err.status, err.reason
    return 200, "ok"


@pytest.fixture(scope="module")
def rgb(cifar_test):
    return cifar_test.images[7].permute(1, 2, 0).numpy()


def test_awkward_modes_decode_like_the_rgb_image(rgb):
    """Palette, alpha, CMYK and 16-bit images are accepted and converted faithfully."""
    reference = _decode(png(torch.from_numpy(rgb).permute(2, 0, 1)), "image/png")[0]
    img = Image.fromarray(rgb)
    for fmt, encoded in {
        "rgba": _save(img.convert("RGBA"), "PNG"),
        "cmyk-tiff": _save(img.convert("CMYK"), "TIFF"),
        "palette": _save(img.convert("P", palette=Image.ADAPTIVE, colors=256), "PNG"),
    }.items():
        x = _decode(encoded, "image/png")[0]
        tolerance = 0.08 if fmt == "palette" else 0.02
        assert (x - reference).abs().mean() < tolerance, fmt
    grey16 = (rgb[..., 1].astype(np.uint16) * 257).astype(np.uint16)
    x16 = _decode(_save(Image.fromarray(grey16), "PNG"), "image/png")[0]
    assert x16.shape == SHAPE
    # rescaled to 8 bits, not clipped at 255 (which would make the image almost all white)
    assert torch.allclose(x16[0] * 255, torch.from_numpy(rgb[..., 1]).float(), atol=1.01)


@pytest.mark.parametrize(
    "name,make,status,reason",
    [
        ("animated GIF", lambda f: _save(f[0], "GIF", save_all=True, append_images=f[1:]), 400, "multi_frame_image"),
        (
            "multi-page TIFF",
            lambda f: _save(f[0], "TIFF", save_all=True, append_images=f[1:]),
            400,
            "multi_frame_image",
        ),
        ("animated WebP", lambda f: _save(f[0], "WEBP", save_all=True, append_images=f[1:]), 400, "multi_frame_image"),
        ("truncated PNG", lambda f: _save(f[0], "PNG")[:-40], 400, "corrupt_image"),
        ("truncated JPEG", lambda f: _save(f[0].resize((64, 64)), "JPEG")[:300], 400, "corrupt_image"),
        ("header promises more pixels", lambda f: _png_declaring(2000, 2000, bytes(100)), 400, "corrupt_image"),
        ("decompression bomb", lambda f: _png_declaring(30000, 30000), 413, "image_too_large"),
        ("more pixels than the limit", lambda f: _png_declaring(4096, 4097), 413, "image_too_large"),
        ("zero-sized", lambda f: _png_declaring(0, 10), 400, "corrupt_image"),
    ],
)
def test_hostile_images_get_the_documented_4xx(rgb, name, make, status, reason):
    frames = [Image.fromarray(np.roll(rgb, s, axis=0)) for s in (0, 5, 9)]
    assert _status(make(frames), "image/png") == (status, reason), name


def test_the_pixel_limit_is_the_documented_one():
    assert MAX_IMAGE_PIXELS == 4096 * 4096
    assert _status(_png_declaring(4096, 4096, b"\x00" * 10), "image/png") == (400, "corrupt_image")  # allowed size


@pytest.mark.parametrize(
    "body,reason",
    [
        (b'{"array": ' + b"[" * 5000 + b"]" * 5000 + b"}", "json_too_deep"),
        (b'{"top_k": ' + b"9" * 10000 + b"}", "number_too_large"),
        (b'{"top_k": 1e999}', "non_finite"),
        (b'{"array": [NaN]}', "non_finite"),
        (b'{"top_k": Infinity}', "non_finite"),
        (b'{"top_k": -Infinity}', "non_finite"),
        (b'{"top_k": 1, "top_k": 2, "image": "aGVsbG8="}', "duplicate_key"),
        (b'{"image": "\xff\xfe"}', "bad_encoding"),
        (json.dumps({"image": base64.b64encode(b"%PDF-1.4 not an image").decode()}).encode(), "corrupt_image"),
        (json.dumps({"instances": ["aGVsbG8=", {"array": [[[0.0]]]}]}).encode(), "mixed_instances"),
        (b'{"array": [1, 2', "bad_json"),
    ],
)
def test_hostile_json_bodies_get_400(body, reason):
    assert _status(body, "application/json") == (400, reason)


def test_a_body_torchserve_decoded_leniently_is_still_checked():
    """TorchServe's own json.loads accepts NaN; the handler checks the decoded value too."""
    decoded = json.loads('{"array": [[[NaN]]], "top_k": 3}')
    assert _status(decoded, "application/json") == (400, "non_finite")
    deep = nested = []
    for _ in range(40):
        nested.append([])
        nested = nested[0]
    assert _status({"array": deep}, "application/json") == (400, "json_too_deep")


def test_escaped_quotes_and_brackets_in_strings_do_not_count_as_nesting():
    body = json.dumps({"image": "[[[[" * 10, "note": 'a "quoted" \\ [{'}).encode()
    assert _status(body, "application/json")[1] == "bad_base64"  # parsed fine, refused for the image only


def _seed_images(cifar_test, n=8):
    idx = torch.randperm(len(cifar_test), generator=torch.Generator().manual_seed(11))[:n]
    return [cifar_test.images[int(i)].permute(1, 2, 0).numpy() for i in idx]


def test_fuzz_the_decoder_in_process(cifar_test):
    cases = list(fuzz_cases(_seed_images(cifar_test), 2000, seed=1))
    report = run_decoder(cases)
    FUZZ_REPORTS.append(("in-process decoder", report))
    assert report.tried == 2000
    assert report.failures == []
    assert set(report.statuses) <= {200, 400, 413}
    assert report.statuses[200] > 100 and report.statuses[400] > 500  # the corpus exercises both sides
    assert {"multi_frame_image", "corrupt_image", "duplicate_key", "bad_encoding"} <= set(report.reasons)
    # the OIP v2 edits reach the fields its decoder checks
    assert {"bad_datatype", "bad_shape", "missing_data", "unknown_input", "unknown_output"} <= set(report.reasons)


def _worker_state(server, model):
    keys = read_keys(Path(server.run_dir))
    status, body = http_get(f"{server.management_url}/models/{model}", keys["management"])
    assert status == 200
    return [(w["pid"], w["status"], w.get("memoryUsage", 0)) for w in json.loads(body)[0]["workers"]]


def _rss_bytes(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_fuzz_a_real_torchserve(server, client, cifar_test, reference):
    """200 hostile inputs through real HTTP: 200 or a JSON 4xx each; the worker survives."""
    model = "deq-tiny"
    before = _worker_state(server, model)
    rss_before = {pid: _rss_bytes(pid) for pid, _, _ in before}
    cases = list(fuzz_cases(_seed_images(cifar_test), 200, seed=2))
    from collections import Counter

    from robustdeq.serving.fuzz import FuzzReport

    report, reasons = FuzzReport(), Counter()
    import time

    for case in cases:
        t0 = time.perf_counter()
        status, answer = client.request(f"/predictions/{model}", case.payload, case.content_type)
        ok = status == 200 or (400 <= status < 500 and {"error", "reason", "status"} <= set(answer))
        if not ok:
            report.failures.append(f"{case.kind}: {status} {answer}")
        reasons[answer.get("reason", "ok")] += 1
        report.add(case, status, answer.get("reason", "ok"), time.perf_counter() - t0)
    FUZZ_REPORTS.append(("real TorchServe", report))
    assert report.failures == []
    assert set(report.statuses) <= {200, 400, 413}
    after = _worker_state(server, model)
    assert [(pid, st) for pid, st, _ in after] == [(pid, st) for pid, st, _ in before], "a worker restarted"
    assert all(st == "READY" for _, st, _ in after)
    for pid, rss in rss_before.items():  # one input may make a worker allocate at most ~64 MiB
        assert _rss_bytes(pid) - rss < 256 * 2**20
    # the next valid request is answered, with the library's own prediction
    model_ref, _ = reference
    image = cifar_test.images[123]
    status, answer = client.predict(model, png(image))
    assert status == 200
    with torch.no_grad():
        expected = int(model_ref(image.float().div(255)[None]).argmax(1))
    assert answer["index"] == expected
