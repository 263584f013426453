"""Small pieces every part of the evaluation shares: the per-sample best-input tracker,
seeds derived from names, and per-sample losses and ratios."""

from __future__ import annotations

import datetime
import zlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BestInput", "seed_of", "utc_now", "per_sample_ce", "relative_deviation", "median_ratio"]


def utc_now() -> str:
    """The current UTC time to the second, ISO 8601 (the date of a finished job or evaluation)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def seed_of(*parts) -> int:
    """A generator seed derived from names and numbers (each job and batch has its own)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


class BestInput:
    """Per-sample strongest input so far: largest margin of the real prediction (margin > 0
    means fooled). Updating with any batch of candidates keeps the elementwise best."""

    def __init__(self, x: Tensor, margins: Tensor):
        self.x, self.margin = x.clone(), margins.clone()

    def update(self, idx: Tensor, x_cand: Tensor, m_cand: Tensor) -> None:
        better = m_cand > self.margin[idx]
        if bool(better.any()):
            sel = idx[better]
            self.x[sel] = x_cand[better].to(self.x.device, self.x.dtype)
            self.margin[sel] = m_cand[better].to(self.margin.dtype)

    @property
    def robust(self) -> Tensor:
        return self.margin <= 0


def per_sample_ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def relative_deviation(perturbed, clean) -> Tensor:
    """[B, N] ||z~[t] - z[t]|| / ||z[t]|| for t = 1..N (paper 1 Fig. 3c)."""
    return torch.stack(
        [(p - c).norm(dim=1) / c.norm(dim=1).clamp_min(1e-12) for p, c in zip(perturbed.states[1:], clean.states[1:])],
        1,
    )


def median_ratio(num: Sequence[float], den: Sequence[float]) -> Optional[float]:
    if not num or not den:
        return None
    ratios = sorted(a / b for a, b in zip(num, den) if b > 0)
    return ratios[len(ratios) // 2] if ratios else None
