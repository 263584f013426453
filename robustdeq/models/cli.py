"""``robustdeq models``: the registered models with their parameter counts."""

from __future__ import annotations

import argparse

from . import MODEL_PRESETS, create_model


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: the command lists every preset."""


def run_models(args: argparse.Namespace) -> int:
    print(f"{'name':<18}{'parameters':>12}  solver      N   description")
    for name in sorted(MODEL_PRESETS):
        model = create_model(name)
        print(
            f"{name:<18}{model.num_parameters():>12,}  {model.solver_name:<10}{model.n_steps:>3}   "
            f"{MODEL_PRESETS[name][2]}"
        )
    return 0
