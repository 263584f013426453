"""A costly defense evaluated on the first images of the subset, beside the undefended model
evaluated on all of them, combined into one robustness card (``robustdeq combine-cards``).

The adaptive chain on Algorithm 1 costs minutes of CPU per surviving image (docs/evaluation.md),
so a 1,000-image evaluation of the undefended model is paired with a defended evaluation of its
first M images. Subsets of one seed and split are prefixes of each other, and every batch is
seeded by its first image's global position, so the smaller run's per-sample results on the
undefended model repeat the first M of the larger run's. :func:`combine_cards` checks that, and
``card.combine_cards`` writes one card: the undefended row at n, the defended rows at M (every
row carries its own n).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from .. import card as _card
from .report import robustness_card

__all__ = ["combine_cards", "load_evaluation"]


def load_evaluation(path: Union[str, Path]) -> dict:
    """``results.json`` of an evaluation folder (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json at {path}; 'robustdeq evaluate' writes one")
    return json.loads(path.read_text())


def combine_cards(main: dict, defended: dict) -> dict:
    """One card from ``main`` (results of the undefended model on n images) and ``defended``
    (results with the defense settings on the first M <= n images of the same seeded subset):
    the ``none`` row from ``main``, every other row from ``defended``."""
    card = _card.combine_cards(robustness_card(main), robustness_card(defended))  # same checkpoint and eps
    m, n = defended["subset"]["n"], main["subset"]["n"]
    same_draw = all(defended["subset"][k] == main["subset"][k] for k in ("seed", "split"))
    clean_main, clean_def = main["per_sample"]["clean"], defended["per_sample"]["clean"]
    if m > n or not same_draw or clean_def != clean_main[:m]:
        raise ValueError(
            f"the defended evaluation ({m} images) is not the first {m} of the main one ({n}): run it with the "
            "main evaluation's --seed and --split and a smaller --n"
        )
    if not any(s["name"] != "none" for s in defended["settings"]):
        raise ValueError("the defended evaluation has no defense setting (it ran with --defense none)")
    return card
