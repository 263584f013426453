"""Numbers as people write them in configs, options and flags: ``8/255`` fractions and ``3e-3``.

Torch-free, so that the server's option parsing, the training configs and the command lines
share one parser without loading each other.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

__all__ = ["parse_number"]


def parse_number(value: Any) -> Any:
    """Accept '8/255' style fractions and '3e-3' (which YAML 1.1 reads as a string)."""
    if isinstance(value, str):
        text = value.replace(" ", "")
        if text.lower() in ("nan", "inf", "-inf", "infinity"):
            return value
        try:
            return float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            return value
    return value
