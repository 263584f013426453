"""Attacks on DEQs: the l_inf PGD engine shared by training (PGD-AT, TRADES) and
evaluation, the ready-made PGD of paper 1 Sec. 4 (through the phantom gradient of z[N]),
I-FGSM (paper 2, Eq. 13-14), and the intermediate-state surrogate of paper 1 (Eq. 11) that
the evaluation's PGD grid, APGD and the attacks through the defense use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import solvers as _solvers
from .dynamics import CellMap, damped_steps, phantom_forward

if TYPE_CHECKING:  # pragma: no cover
    from .models.base import DEQModel

LossFn = Callable[[Tensor], Tensor]

__all__ = [
    "pgd_linf",
    "ready_made_pgd",
    "single_step_linf",
    "project_linf",
    "random_like",
    "ifgsm_steps",
    "margin",
    "straight_through",
    "IntermediateAttack",
    "intermediate_state_logits",
    "intermediate_grid",
]


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
            loss = loss_fn(x_adv)
            if loss.shape != x_adv.shape[:1]:
                raise ValueError(f"the attack loss must be one value per sample, got shape {tuple(loss.shape)}")
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def ready_made_pgd(
    model: "DEQModel",
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Ready-made PGD (paper 1 Sec. 4): the gradient the model offers, the cross-entropy of
    the final state z[N] through the phantom gradient (eval mode)."""

    def loss_fn(xa: Tensor) -> Tensor:
        return F.cross_entropy(phantom_forward(model, xa).logits, y, reduction="none")

    return pgd_linf(loss_fn, x, eps, step_size, steps, generator=generator)


def single_step_linf(
    loss_fn: LossFn,
    x: Tensor,
    eps: float,
    step_size: float,
    noise: float,
    project: bool,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """One signed-gradient step from uniform noise in [-noise, noise] around x.

    * FGSM with random start (Wong et al. 2020): ``noise = eps``, ``step_size = 1.25 eps``,
      ``project = True`` (the result is projected back to the eps-ball);
    * N-FGSM (de Jorge et al. 2022): ``noise = 2 eps``, ``step_size = eps``,
      ``project = False`` (only clipped to [0, 1]; the perturbation may reach 3 eps).

    Both are training attacks: they cost one forward-backward instead of PGD's ``steps``.
    """
    if eps < 0 or step_size < 0 or noise < 0:
        raise ValueError("eps, step_size and noise must be non-negative")
    x = x.detach()
    start = (x + (2 * random_like(x, generator, "uniform") - 1) * noise).clamp(0.0, 1.0)
    with torch.enable_grad():
        start = start.requires_grad_(True)
        loss = loss_fn(start)
        if loss.shape != x.shape[:1]:
            raise ValueError(f"the attack loss must be one value per sample, got shape {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss.sum(), start)
    x_adv = start.detach() + step_size * grad.sign()
    return (project_linf(x_adv, x, eps) if project else x_adv.clamp(0.0, 1.0)).detach()


def ifgsm_steps(eps: float) -> int:
    """Paper 2, Eq. 14: n = floor(min(255 eps + 4, 1.25 * 255 eps)) steps of size 1/255."""
    e = eps * 255.0
    return max(1, int(math.floor(min(e + 4.0, 1.25 * e) + 1e-9)))


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} logit_j - logit_y per sample: positive exactly when the prediction is wrong."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return other - true


def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass (BPDA)."""
    return value.detach() + surrogate - surrogate.detach()


@dataclass(frozen=True)
class IntermediateAttack:
    """One intermediate-state attack of paper 1, Eq. 11: unroll z[i] for K_a damped steps."""

    state: int  # i, 1..N
    unroll: int  # K_a >= 1
    lam: float  # lambda in (0, 1]

    @property
    def name(self) -> str:
        return f"eq11-i{self.state}-k{self.unroll}-l{self.lam:g}"

    def logits(self, model: "DEQModel", x: Tensor, solver: Optional[_solvers.Solver] = None) -> Tensor:
        return intermediate_state_logits(model, x, self.state, self.unroll, self.lam, solver)


def intermediate_state_logits(
    model: "DEQModel",
    x: Tensor,
    state: int,
    unroll: int,
    lam: float,
    solver: Optional[_solvers.Solver] = None,
) -> Tensor:
    """Paper 1, Eq. 11: solve i = ``state`` steps without gradient, then from z_a[i] = z[i]
    (detached) take K_a = ``unroll`` damped steps z_a <- (1 - lam) z_a + lam f(z_a; x), and
    return h(z_a[i + K_a]); the gradient reaches x through the K_a injections."""
    if state < 0:
        raise ValueError(f"state must be >= 0, got {state}")
    solver = solver if solver is not None else model.make_solver()
    u = model.inject(x)
    with torch.no_grad():
        ud = u.detach()
        z = _solvers.solve(CellMap(model, ud), model.initial_state(ud), solver, state).states[-1] if state else None
        z = model.initial_state(ud) if z is None else z
    return model.head(damped_steps(model, z, u, unroll, lam), u)


def intermediate_grid(
    n_steps: int,
    states: Optional[Sequence[int]] = None,
    unrolls: Sequence[int] = (2, 5),
    lams: Sequence[float] = (0.5, 1.0),
) -> List[IntermediateAttack]:
    """The (i, K_a, lambda) grid of paper 1 Sec. 4; the paper's full grid is
    states 1..N x K_a 1..9 x lambda {0.5, 1} (144 attacks for N = 8)."""
    states = list(range(1, n_steps + 1)) if states is None else sorted(set(int(s) for s in states))
    bad = [s for s in states if not 1 <= s <= n_steps]
    if bad:
        raise ValueError(f"attack states {bad} outside 1..{n_steps}")
    return [IntermediateAttack(i, int(k), float(lam)) for i in states for k in unrolls for lam in lams]
