"""The per-sample strongest input found so far, across every attack of an evaluation."""

from __future__ import annotations

from torch import Tensor

__all__ = ["BestInput"]


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
