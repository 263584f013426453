"""Per-sample measures the attacks and analyses share: the loss they climb, the deviation of
a perturbed trajectory from the clean one, and ratios of timings."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["per_sample_ce", "relative_deviation", "median_ratio"]


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
