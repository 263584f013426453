"""Clean and ready-made PGD accuracy of a checkpoint, read at its chosen state and at z[N]
(``robustdeq accuracy``): the quick, non-adaptive number recorded with every shipped checkpoint.

The per-state accuracy and the readout choice live below training and evaluation, in
``robustdeq.state_accuracy`` and ``robustdeq.readout``; ``ready_made_pgd`` in
``robustdeq.attacks``. They are re-exported here for old imports.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

# re-exported for old imports; their homes are attacks, readout and state_accuracy
from ..attacks import ready_made_pgd
from ..readout import READOUT_RULES, StateAccuracy, choose_early_state, choose_readout_state
from ..state_accuracy import state_accuracies

__all__ = [
    "ready_made_pgd",
    "StateAccuracy",
    "state_accuracies",
    "choose_early_state",
    "choose_readout_state",
    "READOUT_RULES",
    "checkpoint_accuracy",
]


def checkpoint_accuracy(
    checkpoint: str,
    split: str = "test",
    n: Optional[int] = None,
    pgd_steps: int = 10,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    batch_size: int = 250,
    data: Optional[str] = None,
    device: Optional[str] = None,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, object]:
    """Clean and ready-made PGD accuracy of a checkpoint at its chosen early state and at
    z[N], on the test split (or the checkpoint's own validation split with ``split='val'``).

    This is the quick, non-adaptive number recorded with every shipped checkpoint; the
    adaptive evaluation lives in ``robustdeq evaluate``.
    """
    from ..checkpoint import load_checkpoint
    from ..data.run_splits import materialised, split_of_run

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    model = ckpt.build_model(dev)
    data_split = split_of_run(ckpt.data, split, data, progress)
    if split == "test":  # a seeded shuffle: the archive stores the test images grouped by class
        order = torch.randperm(len(data_split), generator=torch.Generator().manual_seed(seed))
        n_used = len(order) if n is None else min(int(n), len(order))
        data_split = materialised(data_split, order[:n_used])
    else:
        data_split = materialised(
            data_split, torch.arange(len(data_split) if n is None else min(int(n), len(data_split)))
        )
    n = len(data_split) if n is None else min(int(n), len(data_split))
    acc = state_accuracies(
        model,
        data_split.images,
        data_split.labels,
        n,
        n if pgd_steps > 0 else 0,
        eps=eps,
        step_size=step_size,
        pgd_steps=pgd_steps,
        batch_size=batch_size,
        device=dev,
        seed=seed,
        progress=progress,
        desc=f"{split} accuracy",
    )
    k = model.readout_index()
    return {
        "checkpoint": str(checkpoint),
        "model": ckpt.model_name,
        "split": split,
        "n": n,
        "state": k,
        "n_states": model.n_steps,
        "clean_acc": acc.clean(k),
        "pgd_acc": acc.robust(k) if pgd_steps > 0 else None,
        "clean_acc_final": acc.clean(-1),
        "pgd_acc_final": acc.robust(-1) if pgd_steps > 0 else None,
        "attack": f"ready-made PGD-{pgd_steps} (phantom gradient of z[N]), eps {eps:.5f}, step {step_size:.5f}, "
        "uniform random start; counted on the final iterate",
        **acc.to_dict(),
    }
