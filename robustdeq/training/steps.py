"""One adversarial-training step (PGD-AT, Madry et al.) on a DEQ with the phantom gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks import pgd_linf
from .blocks import jacobian_regularizer, phantom_forward

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import DEQModel


@dataclass
class AdversarialStepConfig:
    """PGD-AT as in DESIGN.md §4: eps 8/255, step 2/255, 10 steps, random start."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    attack_steps: int = 10
    unroll: int = 5
    tau: float = 0.5
    jacobian_weight: float = 0.0


def adversarial_training_step(
    model: "DEQModel",
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    cfg: AdversarialStepConfig,
    n_steps: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, float]:
    """Craft PGD examples in eval mode, then one optimiser step on their loss.

    ``n_steps`` selects the state the loss reads (None = N; a draw from U{1..N} gives
    the random-intermediate-state loss of paper 1 Sec. 3.3); the same state is attacked.
    """
    model.eval()

    def attack_loss(xa: Tensor) -> Tensor:
        return F.cross_entropy(phantom_forward(model, xa, n_steps, cfg.unroll, cfg.tau).logits, y, reduction="none")

    x_adv = pgd_linf(attack_loss, x, cfg.eps, cfg.step_size, cfg.attack_steps, generator=generator)
    model.train()
    out = phantom_forward(model, x_adv, n_steps, cfg.unroll, cfg.tau)
    loss = F.cross_entropy(out.logits, y)
    jac = jacobian_regularizer(model, out.state, out.injection, generator=generator) if cfg.jacobian_weight else None
    total = loss + cfg.jacobian_weight * jac if jac is not None else loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    acc = (out.logits.argmax(1) == y).float().mean()
    return {
        "loss": float(loss.detach()),
        "adv_acc": float(acc),
        "jacobian": float(jac.detach()) if jac is not None else 0.0,
    }
