"""The watch for catastrophic overfitting in adversarial training.

Single-step attacks (FGSM-RS, N-FGSM) can collapse: within an epoch the model learns to
defeat the cheap attack while PGD accuracy falls towards zero. The watch keeps the epoch
with the best validation PGD accuracy and calls it a collapse when an epoch falls
``validation.collapse_drop`` below it; with ``validation.on_collapse: stop`` the run ends
from the best epoch's weights (``best.pt``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["CollapseWatch"]


class CollapseWatch:
    """The best validation PGD epoch so far and the collapses seen (both kept in ``last.pt``)."""

    def __init__(
        self,
        collapse_drop: float,
        on_collapse: str,
        best: Optional[Dict[str, Any]] = None,
        collapses: Optional[List[Dict[str, Any]]] = None,
    ):
        self.collapse_drop = collapse_drop
        self.on_collapse = on_collapse
        self.best: Dict[str, Any] = dict(best or {})
        self.collapses: List[Dict[str, Any]] = list(collapses or [])

    def observe(self, rec: Dict[str, Any], announce: bool = True) -> str:
        """Read one validated epoch record; marks ``rec["collapse"]`` on a collapse.

        Returns ``"best"`` when the epoch is the best so far (the caller saves its weights),
        ``"stop"`` on a collapse that ends the run, ``"collapse"`` on one that does not, else ``""``."""
        pgd = rec["val_pgd_acc"]
        if not self.best or pgd >= self.best["val_pgd_acc"]:
            self.best = {
                "epoch": rec["epoch"],
                "step": rec["step"],
                "val_pgd_acc": pgd,
                "val_clean_acc": rec["val_clean_acc"],
            }
            return "best"
        if self.best["val_pgd_acc"] - pgd < self.collapse_drop:
            return ""
        event = {
            "epoch": rec["epoch"],
            "step": rec["step"],
            "val_pgd_acc": pgd,
            "best": dict(self.best),
            "action": self.on_collapse,
        }
        self.collapses.append(event)
        rec["collapse"] = True
        stop = self.on_collapse == "stop"
        if announce:
            print(
                f"catastrophic overfitting at epoch {rec['epoch']}: validation PGD {100 * pgd:.1f}% against "
                f"{100 * self.best['val_pgd_acc']:.1f}% at epoch {self.best['epoch']}"
                + ("; stopping from the best epoch's weights" if stop else "")
            )
        return "stop" if stop else "collapse"
