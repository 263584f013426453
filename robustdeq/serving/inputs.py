"""Request payloads to model inputs: images in [0, 1] of the model's input shape.

Three forms are accepted:

* raw image bytes (PNG, JPEG, or anything Pillow decodes), of any size and mode:
  converted to RGB and resized to the model's input (bilinear, antialiased);
* a JSON object with ``"image"``: the same bytes, base64-encoded;
* a JSON object with ``"array"``: an already-prepared input, nested lists of shape
  C x H x W (or 1 x C x H x W) with values in [0, 1]. The models normalise per channel
  internally, so this is the image scaled to [0, 1], not mean/std-normalised.

Every problem raises :class:`RequestError` with a 4xx status and a reason.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .options import RequestError

IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")
JSON_CONTENT_TYPE = "application/json"

__all__ = ["decode_request", "decode_image", "decode_array", "IMAGE_CONTENT_TYPES"]


def decode_image(data: bytes, shape: Tuple[int, int, int], max_side: int = 4096) -> Tensor:
    """Decode image bytes into a float [C, H, W] tensor in [0, 1] resized to ``shape``."""
    if not data:
        raise RequestError(400, "empty_body", "the request carries no image (empty body)")
    channels, height, width = shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if max(img.size) > max_side:
                    raise RequestError(
                        413, "image_too_large", f"image of {img.size[0]}x{img.size[1]} pixels exceeds {max_side} a side"
                    )
                img = img.convert("RGB" if channels == 3 else "L")
                if img.size != (width, height):
                    img = img.resize((width, height), Image.BILINEAR, reducing_gap=None)
                array = np.asarray(img, dtype=np.uint8)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(400, "corrupt_image", "could not decode the image: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise RequestError(400, "corrupt_image", f"could not decode the image: {exc}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def decode_array(value: Any, shape: Tuple[int, int, int]) -> Tensor:
    """A nested-list input of ``shape`` (or with a leading 1) with finite values in [0, 1]."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise RequestError(
            400, "bad_array", f"'array' must be nested lists of numbers of shape {list(shape)}"
        ) from None
    if array.ndim == len(shape) + 1 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != tuple(shape):
        raise RequestError(
            400, "bad_array_shape", f"'array' has shape {list(array.shape)}, expected {list(shape)} (C x H x W)"
        )
    if not np.isfinite(array).all():
        raise RequestError(400, "non_finite", "'array' contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise RequestError(
            400,
            "array_out_of_range",
            f"'array' values span [{lo:.4g}, {hi:.4g}]; inputs are images scaled to [0, 1] "
            "(the model normalises per channel itself)",
        )
    return torch.from_numpy(array).clamp_(0.0, 1.0)


def decode_request(
    value: Any, content_type: Optional[str], shape: Tuple[int, int, int], max_side: int = 4096
) -> Tuple[Optional[Tensor], Dict[str, Any]]:
    """One request's payload -> (input tensor or None for a describe call, body options).

    ``value`` is what TorchServe hands over: bytes, a decoded JSON value, or text.
    """
    content_type = (content_type or "").split(";")[0].strip().lower()
    if isinstance(value, Mapping):
        body = dict(value)
        if body.get("describe") is True and not ({"image", "array"} & set(body)):
            return None, body
        if ("image" in body) == ("array" in body):
            raise RequestError(400, "bad_json", "a JSON body needs exactly one of 'image' (base64) or 'array'")
        if "image" in body:
            encoded = body["image"]
            if not isinstance(encoded, str):
                raise RequestError(400, "bad_json", "'image' must be a base64 string")
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(400, "bad_base64", "'image' is not valid base64") from None
            return decode_image(data, shape, max_side), body
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
    return decode_image(bytes(value), shape, max_side), {}


MAX_INSTANCES = 64


def split_instances(value: Any, max_instances: int = MAX_INSTANCES) -> Optional[List[Dict[str, Any]]]:
    """The inputs of a KServe v1 body ``{"instances": [...]}``, each as a JSON request body; None
    for any other payload.

    An instance is a base64 image string, or an object with ``image`` (KServe's TorchServe
    examples call it ``data``) or ``array`` and any request options. Keys beside ``instances``
    are options shared by every instance; an instance's own keys win.
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
        body = {**shared, **instance}
        if "data" in body and "image" not in body:
            body["image"] = body.pop("data")
        bodies.append(body)
    return bodies
