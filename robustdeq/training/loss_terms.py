"""Two pieces of the training loss: the random intermediate state n ~ U{1..N} (paper 1
Sec. 3.3) and the Jacobian regulariser (paper 1 Appendix A). The phantom gradient lives in
:mod:`robustdeq.dynamics`, next to the damped unroll it is made of."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from ..attacks import random_like

__all__ = ["draw_intermediate_step", "jacobian_regularizer"]

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import DEQModel


def draw_intermediate_step(n_steps: int, generator: Optional[torch.Generator] = None) -> int:
    """n ~ U{1..N} for the random-intermediate-state loss (paper 1, Sec. 3.3).

    The caller owns the generator and draws once per training step, so the model an
    attack sees inside that step is deterministic (docs/design.md §4).
    """
    if n_steps < 1:
        raise ValueError("n_steps must be >= 1")
    return int(torch.randint(1, n_steps + 1, (1,), generator=generator).item())


def jacobian_regularizer(
    model: "DEQModel",
    z: Tensor,
    u: Tensor,
    n_vectors: int = 1,
    generator: Optional[torch.Generator] = None,
    fraction: float = 1.0,
) -> Tensor:
    """Hutchinson estimate of ||J_f(z)||_F^2 / D at z (Bai et al. 2021), differentiable
    w.r.t. the parameters; ``z`` is treated as a constant point.

    ``fraction`` < 1 probes a random subset of the samples (at least one): the cell's
    samples are independent, so the estimate of the per-sample mean stays unbiased while
    the double backward, the costly part, shrinks in proportion."""
    if fraction < 1.0:
        n = z.shape[0]
        keep = max(1, round(fraction * n))
        device = generator.device if generator is not None else z.device
        idx = torch.randperm(n, generator=generator, device=device)[:keep].to(z.device)
        z, u = z[idx], u[idx]
    z = z.detach().requires_grad_(True)
    # a compiled cell (torch.compile) cannot take the double backward: run this one eagerly
    with torch.compiler.set_stance("force_eager"):
        fz = model.cell(z, u)
    total = fz.new_zeros(())
    for _ in range(n_vectors):
        v = random_like(fz, generator, "normal")
        (vj,) = torch.autograd.grad(fz, z, v, create_graph=True)
        total = total + vj.pow(2).sum() / vj.numel()
    return total / n_vectors
