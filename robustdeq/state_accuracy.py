"""Accuracy of every state z[1..N] of the dynamics, clean and under ready-made PGD.

Ready-made PGD (paper 1 Sec. 4, ``attacks.ready_made_pgd``) follows the phantom gradient of
the final state z[N]; the accuracy of every state is then read off the same adversarial
batch. Training validates with it and chooses its readout state from it
(``readout.choose_readout_state``, on the validation split, never on the test set); the
evaluation records it with every checkpoint.

Everything works on shards: with ``world_size > 1`` each process evaluates every
``world_size``-th batch and the counts are summed with ``all_reduce``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .attacks import ready_made_pgd
from .readout import StateAccuracy

if TYPE_CHECKING:  # pragma: no cover
    from .models.base import DEQModel

__all__ = ["state_accuracies"]


def _correct_per_state(model: "DEQModel", x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        traj = model.trajectory(x)
        return (traj.all_logits(1).argmax(-1) == y.view(-1, 1)).sum(0)


def state_accuracies(
    model: "DEQModel",
    images: Tensor,
    labels: Tensor,
    n_clean: int,
    n_robust: int,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    pgd_steps: int = 10,
    batch_size: int = 250,
    device: Optional[torch.device] = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    desc: str = "validating",
) -> StateAccuracy:
    """Clean accuracy of every state on the first ``n_clean`` images and ready-made PGD
    accuracy of every state on the first ``n_robust`` (uint8 or float images in [0, 1])."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    N = model.n_steps
    clean = torch.zeros(N, dtype=torch.long, device=device)
    robust = torch.zeros(N, dtype=torch.long, device=device)
    n_clean, n_robust = min(n_clean, len(labels)), min(n_robust, len(labels))
    total = max(n_clean, n_robust)
    starts = range(rank * batch_size, total, batch_size * world_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(starts), desc=desc, unit="batch", leave=False)
    try:
        for start in starts:
            stop = min(start + batch_size, total)
            x = images[start:stop]
            x = (x.float().div(255.0) if x.dtype == torch.uint8 else x.float()).to(device)
            y = labels[start:stop].to(device)
            c = min(stop, n_clean) - start
            if c > 0:
                clean += _correct_per_state(model, x[:c], y[:c])
            r = min(stop, n_robust) - start
            if r > 0:
                g = torch.Generator().manual_seed(seed * 1_000_003 + start)
                x_adv = ready_made_pgd(model, x[:r], y[:r], eps, step_size, pgd_steps, generator=g)
                robust += _correct_per_state(model, x_adv, y[:r])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(clean)
        dist.all_reduce(robust)
    return StateAccuracy(clean.tolist(), n_clean, robust.tolist(), n_robust)
