"""Request payloads to model inputs: images in [0, 1] of the model's input shape.

Three forms are accepted (KServe v1 ``instances`` are split here too; OIP v2 bodies are
decoded by ``robustdeq.serving.oip``, and ``robustdeq.serving.protocols`` tells them apart):

* raw image bytes (PNG, JPEG, or anything Pillow decodes), of any size and mode:
  converted to RGB, scaled to cover the model's input and centre-cropped
  (:func:`robustdeq.image_size.fit_to`, the policy training on your own images uses);
* a JSON object with ``"image"``: the same bytes, base64-encoded;
* a JSON object with ``"array"``: an already-prepared input, nested lists of shape
  C x H x W (or 1 x C x H x W) with values in [0, 1]. The models normalise per channel
  internally, so this is the image scaled to [0, 1], not mean/std-normalised.

Every problem raises :class:`RequestError` with a 4xx status and a reason; nothing a
client sends may surface as a 5xx:

* images: the declared size, frame count and mode are checked from the header before any
  pixel is decoded (413 ``image_too_large`` beyond ``max_side`` a side or ``max_pixels``
  in all; 400 for several frames or an unknown mode); every error *and every warning*
  Pillow raises while decoding (truncated data, a header that promises more pixels than
  the file holds, its decompression-bomb check) is a 400 ``corrupt_image``;
* JSON bodies are parsed here, strictly (:func:`parse_json_body`): invalid UTF-8, nesting
  deeper than :data:`MAX_JSON_DEPTH`, numbers longer than :data:`MAX_NUMBER_CHARS`
  characters, ``NaN`` / ``Infinity`` literals and duplicated keys are 400s. The server
  sets ``TS_DECODE_INPUT_REQUEST=false`` so that TorchServe forwards the raw body; a body
  that TorchServe did decode is still checked for depth and non-finite numbers.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..image_size import fit_to
from .options import RequestError

IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")
JSON_CONTENT_TYPE = "application/json"

#: the documented limits (an archive may narrow the image ones in its model-config.yaml)
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded as RGBA that is 64 MiB, the most one input may make a worker allocate
MAX_JSON_DEPTH = 16  # {"instances": [{"array": [[[...]]]}]} needs 6
MAX_NUMBER_CHARS = 40
#: image modes accepted (converted to RGB, or to L for one-channel models); 16-bit and float
#: grey images are rescaled to 8 bits instead of clipped
IMAGE_MODES = frozenset(
    ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"]
    + ["I;16", "I;16L", "I;16B", "I;16N"]
)

__all__ = [
    "decode_request",
    "decode_image",
    "decode_array",
    "decode_base64_image",
    "split_instances",
    "read_body",
    "MAX_INSTANCES",
    "parse_json_body",
    "check_decoded_json",
    "IMAGE_CONTENT_TYPES",
    "MAX_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_CHARS",
]


class _JSONRejected(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


_JSON_STRUCTURE = re.compile(r'["\\\[\]{}]')


def _json_depth_ok(text: str, limit: int) -> bool:
    """Whether the brackets of a JSON text (outside strings) nest at most ``limit`` deep:
    checked before parsing, so that a deep body cannot reach the parser's recursion.
    Only quotes, backslashes and brackets are visited (digits and base64 are skipped)."""
    depth, in_string, escaped_at = 0, False, -2
    for m in _JSON_STRUCTURE.finditer(text):
        ch, at = m.group(), m.start()
        if in_string:
            if ch == "\\" and escaped_at != at - 1:
                escaped_at = at
            elif ch == '"' and escaped_at != at - 1:
                in_string = False
            else:
                escaped_at = -2
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _reject_constant(name: str):
    raise _JSONRejected("non_finite", f"the JSON body contains {name}, which is not a JSON number")


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JSONRejected("duplicate_key", f"the JSON body repeats the key {key!r}")
        out[key] = value
    return out


def _number(kind):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise _JSONRejected(
                "number_too_large",
                f"the JSON body holds a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})",
            )
        value = kind(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise _JSONRejected("non_finite", f"the JSON number {text[:20]} overflows")
        return value

    return parse


def parse_json_body(raw: bytes) -> Any:
    """Parse a raw JSON body strictly (see the module docstring); RequestError on any problem."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, "bad_encoding", f"the JSON body is not valid UTF-8 (byte {exc.start})") from None
    if not _json_depth_ok(text, MAX_JSON_DEPTH):
        raise RequestError(400, "json_too_deep", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(
            text,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
            parse_int=_number(int),
            parse_float=_number(float),
        )
    except _JSONRejected as exc:
        raise RequestError(400, exc.reason, exc.message) from None
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, "bad_json", f"the body is not valid JSON: {str(exc)[:120]}") from None


def check_decoded_json(value: Any, depth: int = 0) -> None:
    """The checks :func:`parse_json_body` makes, on a body TorchServe already decoded (its
    lenient parser accepts NaN and Infinity and keeps the last of duplicated keys)."""
    if depth > MAX_JSON_DEPTH:
        raise RequestError(400, "json_too_deep", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(400, "non_finite", "the JSON body contains NaN or Infinity, which are not JSON numbers")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        raise RequestError(400, "number_too_large", "the JSON body holds an integer beyond 128 bits")
    children = value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else ()
    for child in children:
        check_decoded_json(child, depth + 1)


def read_body(value: Any, content_type: Optional[str]) -> Any:
    """What TorchServe handed over -> the request value: raw JSON bytes are parsed strictly,
    an already decoded JSON value is checked; anything else is returned unchanged. A body
    without a content type that starts with ``{`` is JSON (no image format starts so; some
    OIP clients send no content type)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if isinstance(value, (bytes, bytearray)) and (
        ctype == JSON_CONTENT_TYPE or (not ctype and bytes(value[:64]).lstrip().startswith(b"{"))
    ):
        return parse_json_body(value)
    if isinstance(value, (Mapping, list)):
        check_decoded_json(value)
    return value


def _check_header(img: Image.Image, max_side: int, max_pixels: int) -> None:
    """Size, frame count and mode, read from the header before any pixel is decoded."""
    w, h = img.size
    if w < 1 or h < 1:
        raise RequestError(400, "corrupt_image", f"the image declares {w}x{h} pixels")
    if max(w, h) > max_side or w * h > max_pixels:
        raise RequestError(
            413,
            "image_too_large",
            f"image of {w}x{h} pixels exceeds the limit of {max_side} a side and {max_pixels} pixels in all",
        )
    frames = getattr(img, "n_frames", 1)
    if frames != 1:
        raise RequestError(400, "multi_frame_image", f"the image has {frames} frames; send a single still image")
    if img.mode not in IMAGE_MODES:
        raise RequestError(400, "unsupported_image_mode", f"image mode {img.mode!r} is not supported")


def _to_8bit(img: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode`` (RGB or L); 16-bit and float grey images are rescaled, not clipped."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255) else 255.0
        if img.mode == "F":
            hi = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.nan_to_num(a) / hi * 255.0, 0, 255).round().astype(np.uint8), "L")
    return img.convert(mode)


def decode_image(
    data: bytes, shape: Tuple[int, int, int], max_side: int = MAX_IMAGE_SIDE, max_pixels: int = MAX_IMAGE_PIXELS
) -> Tensor:
    """Decode image bytes into a float [C, H, W] tensor in [0, 1] resized to ``shape``."""
    if not data:
        raise RequestError(400, "empty_body", "the request carries no image (empty body)")
    channels, height, width = shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # whatever Pillow warns about (bombs, malformed chunks) is refused
            with Image.open(io.BytesIO(data)) as img:
                _check_header(img, max_side, max_pixels)
                img.load()
                img = fit_to(_to_8bit(img, "RGB" if channels == 3 else "L"), width, height)
                array = np.asarray(img, dtype=np.uint8)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(400, "corrupt_image", "could not decode the image: not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(413, "image_too_large", f"image refused by the decoder's size check: {exc}") from None
    except MemoryError:
        raise RequestError(413, "image_too_large", "the image does not fit the decoder's memory") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the decoder is the payload's fault
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise RequestError(400, "corrupt_image", f"could not decode the image: {detail}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def decode_array(value: Any, shape: Tuple[int, ...], field: str = "'array'") -> Tensor:
    """A nested-list input of ``shape`` (or with a leading 1) with finite values in [0, 1];
    errors name ``field``."""
    try:
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
            array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        message = f"{field} must be nested lists of numbers of shape {list(shape)}"
        raise RequestError(400, "bad_array", message) from None
    if array.ndim == len(shape) + 1 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != tuple(shape):
        dims = " (C x H x W)" if len(shape) == 3 else ""
        raise RequestError(
            400, "bad_array_shape", f"{field} has shape {list(array.shape)}, expected {list(shape)}{dims}"
        )
    if not np.isfinite(array).all():
        raise RequestError(400, "non_finite", f"{field} contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise RequestError(
            400,
            "array_out_of_range",
            f"{field} values span [{lo:.4g}, {hi:.4g}]; inputs are images scaled to [0, 1] "
            "(the model normalises per channel itself)",
        )
    return torch.from_numpy(array).clamp_(0.0, 1.0)


def decode_base64_image(
    encoded: Any,
    shape: Tuple[int, int, int],
    max_side: int = MAX_IMAGE_SIDE,
    max_pixels: int = MAX_IMAGE_PIXELS,
    field: str = "'image'",
) -> Tensor:
    """A base64 string of image bytes -> the model input (:func:`decode_image`); errors name ``field``."""
    return decode_image(_base64_bytes(encoded, field), shape, max_side, max_pixels)


def _base64_bytes(encoded: Any, field: str) -> bytes:
    if not isinstance(encoded, str):
        raise RequestError(400, "bad_json", f"{field} must be a base64 string")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "bad_base64", f"{field} is not valid base64") from None


def decode_request(
    value: Any,
    content_type: Optional[str],
    shape: Tuple[int, int, int],
    max_side: int = MAX_IMAGE_SIDE,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Tuple[Optional[Tensor], Dict[str, Any]]:
    """One request's payload -> (input tensor or None for a describe call, body options).

    ``value`` is what TorchServe hands over: bytes (raw JSON bodies are parsed here), a
    decoded JSON value, or text.
    """
    value = read_body(value, content_type)
    content_type = (content_type or "").split(";")[0].strip().lower()
    if isinstance(value, Mapping):
        body = dict(value)
        if body.get("describe") is True and not ({"image", "array"} & set(body)):
            return None, body
        if ("image" in body) == ("array" in body):
            raise RequestError(400, "bad_json", "a JSON body needs exactly one of 'image' (base64) or 'array'")
        if "image" in body:
            return decode_base64_image(body["image"], shape, max_side, max_pixels), body
        return decode_array(body["array"], shape), body
    if content_type == JSON_CONTENT_TYPE:
        if isinstance(value, (bytes, bytearray)):
            raise RequestError(400, "bad_json", "the body is not valid JSON")
        raise RequestError(400, "bad_json", "a JSON body must be an object with 'image' or 'array'")
    if isinstance(value, str) or (content_type and not content_type.startswith(IMAGE_CONTENT_TYPES)):
        raise RequestError(
            415,
            "unsupported_content_type",
            f"content type {content_type or 'text'!r} is not accepted; send image bytes (image/png, image/jpeg, "
            "application/octet-stream) or application/json",
        )
    if value is None:
        raise RequestError(400, "empty_body", "the request carries no image (empty body)")
    return decode_image(bytes(value), shape, max_side, max_pixels), {}


MAX_INSTANCES = 64


def _binary_field(instance: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """TF-Serving's binary convention in a KServe v1 instance -> the project's ``image`` key:
    ``{"b64": ...}`` itself, or one named field holding only ``{"b64": ...}``
    (``{"image_bytes": {"b64": ...}}``). Other instances are returned unchanged."""
    named = [k for k, v in instance.items() if isinstance(v, Mapping) and set(v) == {"b64"}]
    fields = (["b64"] if "b64" in instance else []) + named
    if not fields:
        return dict(instance)
    present = fields + [k for k in ("image", "array", "data") if k in instance and k not in fields]
    if len(present) > 1:
        raise RequestError(400, "bad_json", f"{where} holds more than one input: {present}")
    body = {k: v for k, v in instance.items() if k != fields[0]}
    encoded = instance["b64"] if fields[0] == "b64" else instance[fields[0]]["b64"]
    label = f"{where}.b64" if fields[0] == "b64" else f"{where}.{fields[0]}.b64"
    _base64_bytes(encoded, label)  # checked here so that the error names the field the client sent
    body["image"] = encoded
    return body


def split_instances(value: Any, max_instances: int = MAX_INSTANCES) -> Optional[List[Dict[str, Any]]]:
    """The inputs of a KServe v1 body ``{"instances": [...]}``, each as a JSON request body; None
    for any other payload.

    An instance is a base64 image string, or an object with ``image`` (KServe's TorchServe
    examples call it ``data``) or ``array`` and any request options, or TF-Serving's binary
    convention: ``{"b64": ...}``, or a named field holding it (``{"image_bytes": {"b64": ...}}``).
    Keys beside ``instances`` are options shared by every instance; an instance's own keys win.
    """
    if not isinstance(value, Mapping) or "instances" not in value:
        return None
    instances = value["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, "bad_json", "'instances' must be a non-empty list")
    if len(instances) > max_instances:
        raise RequestError(413, "too_many_instances", f"{len(instances)} instances; at most {max_instances} a request")
    shared = {k: v for k, v in value.items() if k != "instances"}
    bodies = []
    for j, instance in enumerate(instances):
        if isinstance(instance, str):
            instance = {"image": instance}
        if not isinstance(instance, Mapping):
            raise RequestError(400, "bad_json", f"instances[{j}] must be a base64 string or an object")
        body = {**shared, **_binary_field(instance, f"instances[{j}]")}
        if "data" in body and "image" not in body:
            body["image"] = body.pop("data")
        bodies.append(body)
    kinds = {("array" if "array" in b else "image") for b in bodies}
    if len(kinds) > 1:
        raise RequestError(
            400, "mixed_instances", "'instances' mixes images and arrays; send one kind of input per request"
        )
    return bodies
