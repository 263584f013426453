"""Seeded hostile payloads for the request decoder, and a harness that runs them.

The corpus starts from real images (CIFAR-10) encoded in every format Pillow writes here,
in the awkward modes (palette, 16-bit, CMYK, alpha) and as animations / multi-page files,
and from valid JSON bodies. Each case is then mutated with one of:

* bit flips, truncation, header edits (random bytes in the first 64), spliced chunks
  (a piece of another file inserted or a piece of this one repeated);
* size fields set to extremes (PNG IHDR, GIF screen, BMP header, JPEG SOF, TIFF tags);
* for JSON: NaN / Infinity literals, duplicated keys, deep nesting, huge numbers,
  non-UTF-8 bytes, base64 of something other than an image, instances that mix kinds;
* for OIP v2 requests: wrong datatypes, shapes and names, missing ``data``, elements that
  are not images, hostile parameters and outputs, the binary extension.

The contract checked by :func:`run_decoder` (and by the test suite against a real
TorchServe): every payload is either decoded to a finite input of the model's shape in
[0, 1], or refused with a :class:`RequestError` whose status is a 4xx; never anything else.

    python -m robustdeq.serving.fuzz --n 2000      # the in-process run, with its counts
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
from PIL import Image, features

__all__ = ["Case", "seed_images", "seed_bodies", "mutate", "fuzz_cases", "FuzzReport", "run_decoder"]


@dataclass
class Case:
    kind: str  # how it was made, e.g. "png-rgb/bitflip"
    payload: bytes
    content_type: str


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def seed_images(images: Sequence[np.ndarray]) -> List[Case]:
    """Valid encodings of HxWx3 uint8 images: every format and awkward mode at hand."""
    cases: List[Case] = []
    webp = features.check("webp")
    for i, a in enumerate(images):
        rgb = Image.fromarray(a, "RGB")
        big = rgb.resize((96, 96))
        frames = [Image.fromarray(np.roll(a, s, axis=1), "RGB") for s in (0, 8, 16)]
        encoded = {
            "png-rgb": (_encode(rgb, "PNG"), "image/png"),
            "png-palette": (_encode(rgb.convert("P"), "PNG"), "image/png"),
            "png-rgba": (_encode(rgb.convert("RGBA"), "PNG"), "image/png"),
            "png-16bit": (_encode(Image.fromarray(a[..., 0].astype(np.uint16) * 257), "PNG"), "image/png"),
            "png-grey": (_encode(rgb.convert("L"), "PNG"), "image/png"),
            "jpeg": (_encode(big, "JPEG", quality=90), "image/jpeg"),
            "jpeg-cmyk": (_encode(rgb.convert("CMYK"), "JPEG"), "image/jpeg"),
            "gif": (_encode(rgb.convert("P"), "GIF"), "image/gif"),
            "gif-animated": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "image/gif"),
            "bmp": (_encode(rgb, "BMP"), "image/bmp"),
            "tiff": (_encode(rgb, "TIFF"), "image/tiff"),
            "tiff-multipage": (_encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "image/tiff"),
            "ppm": (_encode(rgb, "PPM"), "application/octet-stream"),
            "ico": (_encode(rgb, "ICO"), "application/octet-stream"),
        }
        if webp:
            encoded["webp"] = (_encode(rgb, "WEBP", quality=80), "image/webp")
            encoded["webp-animated"] = (
                _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], quality=80),
                "image/webp",
            )
        cases += [Case(f"{k}#{i}", data, ctype) for k, (data, ctype) in encoded.items()]
    return cases


def seed_bodies(images: Sequence[np.ndarray]) -> List[Case]:
    """Valid JSON bodies: a base64 image, an array, KServe v1 instances (also with TF-Serving's
    ``b64``), OIP v2 inference requests (BYTES and FP32), with options."""
    cases: List[Case] = []
    for i, a in enumerate(images):
        b64 = base64.b64encode(_encode(Image.fromarray(a, "RGB"), "PNG")).decode()
        array = (a.transpose(2, 0, 1) / 255.0).round(4).tolist()
        bodies = {
            "json-image": {"image": b64, "top_k": 3},
            "json-array": {"array": array},
            "json-instances": {"instances": [b64, {"image": b64}], "top_k": 2},
            "json-instances-array": {"instances": [{"array": array}]},
            "json-v1-b64": {"instances": [{"b64": b64}, {"image_bytes": {"b64": b64}, "top_k": 2}]},
            "json-oip-bytes": {
                "id": f"fuzz-{i}",
                "parameters": {"top_k": 2},
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64, b64]}],
            },
            "json-oip-fp32": {
                "inputs": [
                    {"name": "array", "datatype": "FP32", "shape": [1, *a.transpose(2, 0, 1).shape], "data": [array]}
                ],
                "outputs": [{"name": "label"}, {"name": "probabilities"}],
            },
        }
        cases += [Case(f"{k}#{i}", json.dumps(body).encode(), "application/json") for k, body in bodies.items()]
    return cases


# ---- mutations ---------------------------------------------------------------------------
EXTREMES = (0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


def _bitflip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def _header_edit(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        b[rng.randrange(min(64, len(b)))] = rng.randrange(256)
    return bytes(b)


def _splice(data: bytes, rng: random.Random, other: bytes) -> bytes:
    source = other if rng.random() < 0.5 else data
    a = rng.randrange(len(source))
    chunk = source[a : a + rng.randint(1, 256)]
    at = rng.randrange(len(data))
    return data[:at] + chunk * rng.randint(1, 4) + data[at:]


def _size_fields(data: bytes, rng: random.Random) -> bytes:
    """Set the width / height fields the format declares to extreme values."""
    b = bytearray(data)
    w, h = rng.choice(EXTREMES), rng.choice(EXTREMES)
    if b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) >= 24:
        b[16:24] = struct.pack(">II", w, h)
    elif b[:3] == b"GIF" and len(b) >= 10:
        b[6:10] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
    elif b[:2] == b"BM" and len(b) >= 26:
        b[18:26] = struct.pack("<ii", min(w, 0x7FFFFFFF), min(h, 0x7FFFFFFF) * rng.choice((1, -1)))
    elif b[:2] == b"\xff\xd8":
        sof = next((i for i in range(2, len(b) - 9) if b[i] == 0xFF and b[i + 1] in (0xC0, 0xC1, 0xC2)), None)
        if sof is not None:
            b[sof + 5 : sof + 9] = struct.pack(">HH", h & 0xFFFF, w & 0xFFFF)
    elif b[:4] in (b"II*\x00", b"MM\x00*"):
        fmt = "<" if b[:2] == b"II" else ">"
        offset = struct.unpack(fmt + "I", b[4:8])[0]
        if offset + 2 <= len(b):
            count = struct.unpack(fmt + "H", b[offset : offset + 2])[0]
            for k in range(min(count, 64)):
                entry = offset + 2 + 12 * k
                if entry + 12 > len(b):
                    break
                tag = struct.unpack(fmt + "H", b[entry : entry + 2])[0]
                if tag in (256, 257):  # ImageWidth, ImageLength
                    b[entry + 2 : entry + 12] = struct.pack(fmt + "HII", 4, 1, w if tag == 256 else h)
    else:
        return _header_edit(data, rng)
    return bytes(b)


_NOT_IMAGES = (b"hello world", b"%PDF-1.4\n" + b"\x00" * 64, b"\x89PNG\r\n\x1a\n" + bytes(40), b"GIF89a")


def _oip_edit(body: dict, rng: random.Random) -> bytes:
    """A hostile edit of a valid OIP v2 request: the fields its decoder checks."""
    tensor = body["inputs"][0]
    choice = rng.randrange(10)
    if choice == 0:
        tensor["datatype"] = rng.choice(("FP64", "INT8", "UINT8", "BYTES", "FP32", 7, None))
    elif choice == 1:
        n = tensor["shape"][0]
        tensor["shape"] = rng.choice(([n + 1], [n, 3, 32], [65], [-1], ["2"], [0], [10**12, 3, 32, 32], 3, []))
    elif choice == 2:
        tensor.pop("data")
    elif choice == 3:  # an element that is not an image, or not base64
        junk = base64.b64encode(rng.choice(_NOT_IMAGES)).decode()
        tensor["data"] = [rng.choice((junk, "***", 5, None, [junk]))] * tensor["shape"][0]
    elif choice == 4:
        tensor["name"] = rng.choice(("input-0", "", None, ["image"], "IMAGE"))
    elif choice == 5:  # options that are out of bounds, unknown or of the wrong type
        where = body if rng.random() < 0.5 else tensor
        where["parameters"] = rng.choice(({"R": 500}, {"defense": {"x": 1}}, {"T_f": "NaN"}, {"Tf": 1}, "on", []))
    elif choice == 6:  # values of the wrong type or range in an FP32 tensor
        tensor.update(name="array", datatype="FP32", shape=[1, 3, 32, 32])
        tensor["data"] = rng.choice(([0.5] * 3071 + [2.0], [True] * 3072, ["0.5"] * 3072, [[0.5] * 3, [0.5]], 0.5))
    elif choice == 7:  # the binary extension, or unknown keys
        rng.choice((tensor, body)).update(rng.choice(({"parameters": {"binary_data_size": 10}}, {"extra": 1})))
    elif choice == 8:
        body["outputs"] = rng.choice(([{"name": "logits"}], [{"name": "label", "x": 1}], {"name": "label"}, [3]))
    else:
        body["inputs"] = rng.choice(([], [tensor, tensor], {"0": tensor}, None))
    return json.dumps(body).encode()


def _json_edit(data: bytes, rng: random.Random) -> bytes:
    """A structural edit of a valid JSON body."""
    body = json.loads(data)
    if "inputs" in body and rng.random() < 0.7:
        return _oip_edit(body, rng)
    choice = rng.randrange(9)
    if choice == 0:
        return data.replace(b"3", b"NaN", 1) if b"3" in data else b'{"array": NaN}'
    if choice == 1:
        return b'{"top_k": Infinity, ' + data[1:]
    if choice == 2:  # a duplicated key
        return data[:-1] + b', "top_k": 1, "top_k": 2}'
    if choice == 3:  # deep nesting
        depth = rng.choice((20, 100, 1000, 100000))
        return b'{"array": ' + b"[" * depth + b"0" + b"]" * depth + b"}"
    if choice == 4:  # a huge number
        return b'{"top_k": ' + b"9" * rng.choice((50, 5000, 100000)) + b', "image": "aGVsbG8="}'
    if choice == 5:  # non-UTF-8 bytes
        at = rng.randrange(len(data))
        return data[:at] + bytes([rng.choice((0x80, 0xC3, 0xFF, 0xFE))]) + data[at:]
    if choice == 6:  # base64 of something other than an image
        junk = rng.choice(_NOT_IMAGES)
        return json.dumps({"image": base64.b64encode(junk).decode()}).encode()
    if choice == 7:  # instances that mix kinds
        image = body.get("image") or base64.b64encode(b"x").decode()
        return json.dumps({"instances": [image, {"array": [[[0.0]]]}]}).encode()
    return _bitflip(data, rng)


MUTATIONS: Dict[str, Callable] = {
    "bitflip": _bitflip,
    "truncate": _truncate,
    "header": _header_edit,
    "splice": _splice,
    "size": _size_fields,
}


def mutate(case: Case, rng: random.Random, other: bytes) -> Case:
    """One seeded mutation of a valid case."""
    if case.content_type == "application/json":
        name = rng.choice(("json", "json", "json", "bitflip", "truncate", "splice"))
    else:
        name = rng.choice(tuple(MUTATIONS))
    if not case.payload:
        return Case(f"{case.kind}/empty", b"", case.content_type)
    if name == "json":
        payload = _json_edit(case.payload, rng)
    elif name == "splice":
        payload = _splice(case.payload, rng, other)
    else:
        payload = MUTATIONS[name](case.payload, rng)
    return Case(f"{case.kind.split('#')[0]}/{name}", payload, case.content_type)


def fuzz_cases(images: Sequence[np.ndarray], n: int, seed: int = 0, valid_share: float = 0.1) -> Iterator[Case]:
    """``n`` cases: about ``valid_share`` of them unmutated seeds, the rest mutations."""
    rng = random.Random(seed)
    seeds = seed_images(images) + seed_bodies(images)
    for _ in range(n):
        case = rng.choice(seeds)
        if rng.random() < valid_share:
            yield Case(case.kind.split("#")[0] + "/valid", case.payload, case.content_type)
        else:
            yield mutate(case, rng, rng.choice(seeds).payload)


@dataclass
class FuzzReport:
    tried: int = 0
    statuses: Counter = field(default_factory=Counter)  # 200 or the 4xx status
    reasons: Counter = field(default_factory=Counter)
    failures: List[str] = field(default_factory=list)  # anything that broke the contract
    worst_seconds: float = 0.0
    worst_kind: str = ""

    def add(self, case: Case, status: int, reason: str, seconds: float) -> None:
        self.tried += 1
        self.statuses[status] += 1
        self.reasons[reason] += 1
        if seconds > self.worst_seconds:
            self.worst_seconds, self.worst_kind = seconds, case.kind

    def summary(self) -> str:
        by_status = ", ".join(f"{s}: {c}" for s, c in sorted(self.statuses.items()))
        top = ", ".join(f"{r} {c}" for r, c in self.reasons.most_common(8))
        return (
            f"{self.tried} inputs tried; answers by status: {by_status}; failures: {len(self.failures)}; "
            f"worst decode {1000 * self.worst_seconds:.1f} ms ({self.worst_kind}); reasons: {top}"
        )


def run_decoder(cases: Sequence[Case], shape=(3, 32, 32), limits: Optional[object] = None) -> FuzzReport:
    """Every case through :func:`robustdeq.serving.protocols.decode` (every protocol) in-process."""
    import torch

    from .options import Limits, RequestError
    from .protocols import decode

    limits = limits or Limits()
    report = FuzzReport()
    for case in cases:
        t0 = time.perf_counter()
        try:
            request = decode(case.payload, case.content_type, shape, limits.max_image_side, limits.max_image_pixels)
            bad = [x for x in request.inputs if not _valid_input(x, shape, torch)]
            if bad:
                report.failures.append(f"{case.kind}: decoded to an invalid input")
            status, reason = 200, "ok"
        except RequestError as err:
            status, reason = err.status, err.reason
            if not 400 <= err.status < 500:
                report.failures.append(f"{case.kind}: status {err.status} ({err.reason})")
        except Exception as exc:  # noqa: BLE001 - the contract under test
            status, reason = 500, type(exc).__name__
            report.failures.append(f"{case.kind}: {type(exc).__name__}: {str(exc)[:200]}")
        report.add(case, status, reason, time.perf_counter() - t0)
    return report


def _valid_input(x, shape, torch) -> bool:
    return (
        tuple(x.shape) == tuple(shape) and bool(torch.isfinite(x).all()) and 0 <= float(x.min()) <= float(x.max()) <= 1
    )


def _cifar_seeds(count: int, seed: int) -> List[np.ndarray]:
    from ..data import load_cifar10

    test = load_cifar10("test", progress=False)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(test), size=count, replace=False)
    return [test.images[int(i)].permute(1, 2, 0).numpy() for i in idx]


def add_fuzz_arguments(ap: argparse.ArgumentParser) -> None:
    """``robustdeq fuzz-decoder`` (also ``python -m robustdeq.serving.fuzz``)."""
    ap.description = __doc__.split("\n\n")[0]
    ap.add_argument("--n", type=int, default=2000, help="inputs to try (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=8, help="CIFAR-10 test images to start from")


def run_fuzz(args: argparse.Namespace) -> int:
    report = run_decoder(list(fuzz_cases(_cifar_seeds(args.images, args.seed), args.n, args.seed)))
    print(report.summary())
    for failure in report.failures[:20]:
        print("  FAIL", failure)
    return 1 if report.failures else 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m robustdeq.serving.fuzz")
    add_fuzz_arguments(ap)
    return run_fuzz(ap.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
