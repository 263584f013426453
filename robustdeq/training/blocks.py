"""Phantom gradient, random intermediate states and Jacobian regularisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .. import solvers as _solvers
from ..dynamics import CellMap, damped_unroll

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import DEQModel


@dataclass
class PhantomOutput:
    logits: Tensor  # h(w_K), differentiable w.r.t. parameters and input
    state: Tensor  # the detached solver state z[n] the unroll started from
    injection: Tensor  # u = inject(x), differentiable


def phantom_forward(
    model: "DEQModel",
    x: Tensor,
    n_steps: Optional[int] = None,
    unroll: int = 5,
    tau: float = 0.5,
    solver: Optional[_solvers.Solver] = None,
) -> PhantomOutput:
    """Solve ``n_steps`` without gradient, then a differentiable damped unroll
    (phantom gradient, DESIGN.md §4: w0 = f(z*), K = ``unroll`` steps of size ``tau``).

    Passing ``n_steps = n`` with n drawn from U{1..N} gives paper 1's loss on a random
    intermediate state (Sec. 3.3, Eq. 10).
    """
    n_steps = model.n_steps if n_steps is None else int(n_steps)
    solver = solver if solver is not None else model.make_solver()
    u = model.inject(x)
    with torch.no_grad():
        ud = u.detach()
        z = _solvers.solve(CellMap(model, ud), model.initial_state(ud), solver, n_steps).states[-1]
    w = damped_unroll(model, z, u, unroll, tau)
    return PhantomOutput(logits=model.head(w, u), state=z, injection=u)


def draw_intermediate_step(n_steps: int, generator: Optional[torch.Generator] = None) -> int:
    """n ~ U{1..N} for the random-intermediate-state loss (paper 1, Sec. 3.3).

    The caller owns the generator and draws once per training step, so the model an
    attack sees inside that step is deterministic (DESIGN.md §4).
    """
    if n_steps < 1:
        raise ValueError("n_steps must be >= 1")
    return int(torch.randint(1, n_steps + 1, (1,), generator=generator).item())


def jacobian_regularizer(
    model: "DEQModel", z: Tensor, u: Tensor, n_vectors: int = 1, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Hutchinson estimate of ||J_f(z)||_F^2 / D at z (Bai et al. 2021), differentiable
    w.r.t. the parameters; ``z`` is treated as a constant point."""
    z = z.detach().requires_grad_(True)
    fz = model.cell(z, u)
    total = fz.new_zeros(())
    for _ in range(n_vectors):
        v = (
            torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
            if generator is not None
            else torch.randn_like(fz)
        )
        (vj,) = torch.autograd.grad(fz, z, v, create_graph=True)
        total = total + vj.pow(2).sum() / vj.numel()
    return total / n_vectors
