"""A short clean training loop (phantom gradient, Adam): for demos, tests and warm starts.

The full training subproject (PGD-AT, TRADES, schedules, checkpoints) builds on the same
dynamics; this loop exists so that a model "trained for even a short while" is one call away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import augment
from ..dynamics import phantom_forward

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import DEQModel


def train_clean(
    model: "DEQModel",
    images: Tensor,
    labels: Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> List[float]:
    """``steps`` Adam steps of cross-entropy through the phantom gradient on uint8 or [0, 1] images."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    losses: List[float] = []
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="training (clean)", unit="step")
    device = next(model.parameters()).device
    model.train()
    for _ in iterator:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = images[idx]
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        x = augment(x, g).to(device)
        y = labels[idx].to(device)
        loss = F.cross_entropy(phantom_forward(model, x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress:
            iterator.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
