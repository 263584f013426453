"""Which state of the dynamics a model reads its prediction from (paper 1, Sec. 4).

Paper 1 reads the prediction from an early state z[k] of the solver's iterates instead of
z[N], chosen where the ready-made PGD accuracy is highest on the validation split (never
on the test set). This module holds the per-state counts and the choice; it is torch-free,
so training, evaluation and serving share it without loading each other. The counts are
measured by ``state_accuracy.state_accuracies``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

__all__ = ["READOUT_RULES", "StateAccuracy", "choose_early_state", "choose_readout_state"]

#: how a training run chooses its readout state on the validation split (``validation.select``)
READOUT_RULES = ("robust", "clean", "final")


@dataclass
class StateAccuracy:
    """Per-state correct counts for states z[1..N] (index 0 of the lists is z[1])."""

    clean_correct: List[int]
    clean_n: int
    robust_correct: List[int]
    robust_n: int

    def clean(self, k: int) -> float:
        return self.clean_correct[_pos(k, len(self.clean_correct))] / max(1, self.clean_n)

    def robust(self, k: int) -> float:
        return self.robust_correct[_pos(k, len(self.robust_correct))] / max(1, self.robust_n)

    def to_dict(self) -> Dict[str, object]:
        return {
            "clean_acc_per_state": [c / max(1, self.clean_n) for c in self.clean_correct],
            "robust_acc_per_state": [c / max(1, self.robust_n) for c in self.robust_correct],
            "clean_n": self.clean_n,
            "robust_n": self.robust_n,
        }


def _pos(k: int, n_states: int) -> int:
    """State index k (1..N, or negative as in Trajectory) -> list position."""
    if k < 0:
        k = n_states + 1 + k
    if not 1 <= k <= n_states:
        raise IndexError(f"state {k} outside z[1]..z[{n_states}]")
    return k - 1


def choose_early_state(acc: StateAccuracy) -> int:
    """The state with the highest ready-made PGD accuracy (paper 1 Sec. 4); ties go to the
    later state, whose clean accuracy is usually higher. Returns k in 1..N."""
    best = max(acc.robust_correct)
    candidates = [i + 1 for i, c in enumerate(acc.robust_correct) if c == best]
    return max(candidates, key=lambda k: (acc.clean_correct[k - 1], k))


def choose_readout_state(acc: StateAccuracy, rule: str = "robust") -> int:
    """The readout state by ``rule``: ``robust`` is :func:`choose_early_state`; ``clean`` the
    highest clean accuracy (ties to the later state); ``final`` z[N]. A plain-trained model has
    next to no PGD accuracy anywhere, so ``robust`` would pick a state by noise: its recipes use
    ``final``, the fixed point that paper 2 reads and attacks."""
    if rule == "robust":
        return choose_early_state(acc)
    if rule == "clean":
        return max(range(1, len(acc.clean_correct) + 1), key=lambda k: (acc.clean_correct[k - 1], k))
    if rule == "final":
        return len(acc.clean_correct)
    raise ValueError(f"unknown readout rule {rule!r}; choose from {', '.join(READOUT_RULES)}")
