"""Attacks on DEQs. This module holds the l_inf PGD engine shared by training (PGD-AT,
TRADES) and evaluation; later attack families (paper 1 Eq. 11 grids, AutoAttack, attacks
through the defense) build on it."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

LossFn = Callable[[Tensor], Tensor]

__all__ = ["pgd_linf", "project_linf", "random_like"]


def random_like(x: Tensor, generator: Optional[torch.Generator], kind: str = "uniform") -> Tensor:
    """U[0, 1) or N(0, 1) noise shaped like ``x``, drawn on the generator's device."""
    draw = torch.rand if kind == "uniform" else torch.randn
    if generator is None:
        return draw(x.shape, dtype=x.dtype, device=x.device)
    return draw(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project to the l_inf ball of radius eps around x, then to the image box [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def pgd_linf(
    loss_fn: LossFn,
    x: Tensor,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    generator: Optional[torch.Generator] = None,
    x_init: Optional[Tensor] = None,
) -> Tensor:
    """Projected gradient ascent (Madry et al.) on ``loss_fn(x_adv)`` (a per-sample [B] loss).

    Starts from ``x_init`` when given (projected), else uniformly in the eps-ball when
    ``random_start``; sign steps of ``step_size``. ``generator`` may live on the CPU for a
    CUDA batch. Returns a detached adversarial batch inside the eps-ball and [0, 1].
    """
    if eps < 0 or step_size < 0 or steps < 0:
        raise ValueError("eps, step_size and steps must be non-negative")
    x = x.detach()
    if x_init is not None:
        x_adv = project_linf(x_init.detach(), x, eps)
    elif random_start and eps > 0:
        x_adv = project_linf(x + (2 * random_like(x, generator, "uniform") - 1) * eps, x, eps)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        with torch.enable_grad():
            x_adv = x_adv.detach().requires_grad_(True)
            loss = loss_fn(x_adv).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()
