"""Robustness evaluation: ready-made accuracy along the dynamics (used by training), and the
full adaptive evaluation behind ``robustdeq evaluate`` (docs/design.md §6)."""

from .ready_made import (
    StateAccuracy,
    checkpoint_accuracy,
    choose_early_state,
    choose_readout_state,
    ready_made_pgd,
    state_accuracies,
)

__all__ = [
    "ready_made_pgd",
    "StateAccuracy",
    "state_accuracies",
    "choose_early_state",
    "choose_readout_state",
    "checkpoint_accuracy",
]
