"""The input-size policy, shared by training on your own images and by the server: an image of
any size is scaled so that it covers the model's input (the shorter side fits, bilinear and
antialiased) and the centre is cropped. Nothing is stretched. Torch-free (Pillow only)."""

from __future__ import annotations

__all__ = ["fit_to"]


def fit_to(img, width: int, height: int):
    """``img`` (a Pillow image) scaled to cover ``width`` x ``height`` and centre-cropped to it;
    returned unchanged when it already has that size."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (width, height):
        return img
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))
