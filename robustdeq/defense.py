"""Test-time entropy reduction along the neural dynamics (paper 1, Sec. 3.2, Algorithm 1).

For t = 0..N-1 the solver takes one step; every T_f steps the input is moved by R
projected sign-gradient steps of size beta that lower the prediction entropy of
h(f(z[t+1]; x)) with z[t+1] held fixed (paper 1, Eq. 8), kept inside the eps-box around
the ORIGINAL input and inside [0, 1]; then step t is redone with the new input.

Every setting (T_f, R, beta, eps) may differ per sample inside one batch; the work is
vectorised over the samples that need it at each step (index selection, no Python loop
over samples). The entropy-gated variant runs Algorithm 1 only for samples whose
entropy at a chosen state of the plain dynamics exceeds a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import solvers as _solvers
from .card import setting_name
from .defense_defaults import DEFAULT_BETA, DEFAULT_EPS, DEFAULT_R, DEFAULT_T_F, PAPER_DEFAULTS
from .dynamics import DEFAULT_READOUT, CellMap, Trajectory, prediction_entropy, run_dynamics
from .stages import stage

if TYPE_CHECKING:  # pragma: no cover
    from .models.base import DEQModel

Number = Union[int, float, Tensor]

__all__ = [
    "PAPER_DEFAULTS",  # re-exported from defense_defaults, its one home
    "DefenseSetting",
    "DefenseResult",
    "entropy_reduction",
    "gated_entropy_reduction",
    "entropy_descent",
    "per_sample",
]


def per_sample(value: Number, batch: int, dtype: torch.dtype, device, name: str) -> Tensor:
    """Broadcast a scalar or a [B] tensor to a [B] tensor, with a clear error otherwise."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(batch).clone()
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have one value per sample ({batch}), got shape {tuple(t.shape)}")
    return t.clone()


@dataclass
class DefenseResult:
    """What the defense did, per sample."""

    trajectory: Trajectory  # the dynamics that produced the answer (defended where ``ran``)
    plain: Optional[Trajectory]  # the undefended dynamics of the same inputs, when computed
    x_defended: Tensor  # the final input x^[N]
    ran: Tensor  # bool [B]: did Algorithm 1 change anything for this sample
    perturbation: Tensor  # [B] ||x^[N] - x||_inf
    # with record=True: (samples, z held fixed, input before the descent) per intervention
    interventions: Optional[List[Tuple[Tensor, Tensor, Tensor]]] = None

    def entropy_after(self) -> Tensor:
        """[B, N] entropy at z[1..N] of the returned dynamics."""
        return self.trajectory.entropies()

    def entropy_before(self) -> Tensor:
        """[B, N] entropy at z[1..N] without the defense (requires ``plain``)."""
        if self.plain is None:
            raise ValueError("the plain dynamics were not computed (with_plain=False)")
        return self.plain.entropies()

    def entropy_reduction(self, k: int = -1) -> Tensor:
        """[B] H_plain(z[k]) - H_defended(z[k]): how much the defense lowered the entropy."""
        if self.plain is None:
            raise ValueError("the plain dynamics were not computed (with_plain=False)")
        return self.plain.entropy(k) - self.trajectory.entropy(k)


def entropy_descent(
    model: "DEQModel",
    z: Tensor,
    x: Tensor,
    x_orig: Tensor,
    R: Tensor,
    beta: Tensor,
    eps: Tensor,
    soft_sign: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Paper 1, Eq. 8: up to ``R[b]`` sign steps on the input lowering H(h(f(z; x))), z fixed.

    Returns the new input, projected to the eps-box around ``x_orig`` and to [0, 1].
    Samples with fewer steps drop out of later iterations (vectorised by index selection).
    With ``soft_sign`` (a smooth stand-in for sign) the steps stay differentiable with
    respect to ``x`` and ``x_orig`` (second-order graph): the full unroll an adaptive
    attacker differentiates through.
    """
    differentiable = soft_sign is not None
    z = z.detach()
    if not differentiable:
        x, x_orig = x.detach(), x_orig.detach()
    view = (-1,) + (1,) * (x.dim() - 1)
    lo = (x_orig - eps.view(view)).clamp_min(0.0)
    hi = (x_orig + eps.view(view)).clamp_max(1.0)
    step = beta.view(view)
    r_max = int(R.max()) if R.numel() else 0
    for i in range(1, r_max + 1):
        active = R >= i
        all_active = bool(active.all())
        idx = None if all_active else active.nonzero().squeeze(1)
        xa = x if all_active else x[idx]
        za = z if all_active else z[idx]
        with torch.enable_grad():
            if not differentiable:
                xa = xa.detach().requires_grad_(True)
            ua = model.inject(xa)
            h = prediction_entropy(model.head(model.cell(za, ua), ua)).sum()
            (grad,) = torch.autograd.grad(h, xa, create_graph=differentiable)
        direction = soft_sign(grad) if differentiable else grad.sign()
        if all_active:
            x = torch.minimum(torch.maximum(x - step * direction, lo), hi)
        else:
            xa = xa if differentiable else xa.detach()
            new = torch.minimum(torch.maximum(xa - step[idx] * direction, lo[idx]), hi[idx])
            x = x.index_copy(0, idx, new)
    return x


def entropy_reduction(
    model: "DEQModel",
    x: Tensor,
    T_f: Number = DEFAULT_T_F,
    R: Number = DEFAULT_R,
    beta: Number = DEFAULT_BETA,
    eps: Number = DEFAULT_EPS,
    n_steps: Optional[int] = None,
    solver: Optional[_solvers.Solver] = None,
    with_plain: bool = True,
    record: bool = False,
) -> DefenseResult:
    """Algorithm 1 of paper 1 on a batch; settings are scalars or per-sample [B] tensors.

    ``R = 0`` (for a sample) reproduces the plain solve bit for bit. ``with_plain``
    also computes the undefended dynamics, for the before/after entropies. ``record``
    keeps, per intervention, the samples, the fixed state and the input it started from,
    so that an attacker can replay the input updates differentiably.
    """
    if model.training:
        raise RuntimeError("run the defense with the model in eval mode (model.eval())")
    B, dev = x.shape[0], x.device
    T_f = per_sample(T_f, B, torch.long, dev, "T_f")
    R = per_sample(R, B, torch.long, dev, "R")
    beta = per_sample(beta, B, x.dtype, dev, "beta")
    eps = per_sample(eps, B, x.dtype, dev, "eps")
    if bool((T_f < 1).any()):
        raise ValueError("T_f must be >= 1")
    if bool((R < 0).any()):
        raise ValueError("R must be >= 0")
    if bool((beta < 0).any()) or bool((eps < 0).any()):
        raise ValueError("beta and eps must be >= 0")
    solver = solver if solver is not None else model.make_solver()
    n_steps = model.n_steps if n_steps is None else int(n_steps)

    with torch.no_grad():
        plain = run_dynamics(model, x, n_steps=n_steps) if with_plain else None
        x_orig = x.detach()
        x_cur = x_orig
        with stage("stem"):
            u = model.inject(x_cur)
        f = CellMap(model, u)
        with stage("solve"):
            z0 = model.initial_state(u)
            state = solver.init(z0, f(z0))
        states, residuals, injections = [state.z], [state.residual], [u]
        interventions: Optional[List[Tuple[Tensor, Tensor, Tensor]]] = [] if record else None
        for t in range(n_steps):
            with stage("solve"):
                z_next = solver.propose(state)
                fz_next = f(z_next)
            intervene = ((t + 1) % T_f == 0) & (R > 0)
            if bool(intervene.any()):
                with stage("defense"):
                    idx = intervene.nonzero().squeeze(1)
                    if interventions is not None:
                        interventions.append((idx, z_next[idx], x_cur[idx]))
                    x_sub = entropy_descent(model, z_next[idx], x_cur[idx], x_orig[idx], R[idx], beta[idx], eps[idx])
                    x_cur = x_cur.index_copy(0, idx, x_sub)
                    u = u.index_copy(0, idx, model.inject(x_sub))
                    f.u = u
                    # redo step t for these samples with the new input (Algorithm 1, line 13)
                    sub = state.select(idx)
                    sub = sub.with_fz(f(sub.z, idx))
                    z_sub = solver.propose(sub)
                    state = state.with_fz(state.fz.index_copy(0, idx, sub.fz))
                    z_next = z_next.index_copy(0, idx, z_sub)
                    fz_next = fz_next.index_copy(0, idx, f(z_sub, idx))
            with stage("solve"):
                state = solver.commit(state, z_next, fz_next)
            states.append(state.z)
            residuals.append(state.residual)
            injections.append(u)
        traj = Trajectory(model, states, torch.stack(residuals, 1), injections)
        diff = (x_cur - x_orig).flatten(1)
        perturbation = diff.abs().amax(1)
        ran = (R > 0) & (T_f <= n_steps)
    return DefenseResult(
        trajectory=traj, plain=plain, x_defended=x_cur, ran=ran, perturbation=perturbation, interventions=interventions
    )


def gated_entropy_reduction(
    model: "DEQModel",
    x: Tensor,
    threshold: Number,
    gate_state: int = DEFAULT_READOUT,
    T_f: Number = DEFAULT_T_F,
    R: Number = DEFAULT_R,
    beta: Number = DEFAULT_BETA,
    eps: Number = DEFAULT_EPS,
    n_steps: Optional[int] = None,
    record: bool = False,
    plain: Optional[Trajectory] = None,
) -> DefenseResult:
    """Run Algorithm 1 only where the plain entropy at ``gate_state`` exceeds ``threshold``.

    The plain dynamics are always computed (they are the answer for the others, who
    therefore cost exactly plain inference), or taken from ``plain`` when the caller
    already has them; the triggered samples are re-solved with the defense.
    ``threshold`` may be per sample (``-inf``: always defend, ``+inf``: never).
    """
    if model.training:
        raise RuntimeError("run the defense with the model in eval mode (model.eval())")
    B, dev = x.shape[0], x.device
    threshold = per_sample(threshold, B, x.dtype, dev, "threshold")
    n_steps = model.n_steps if n_steps is None else int(n_steps)
    with torch.no_grad():
        if plain is None:
            plain = run_dynamics(model, x, n_steps=n_steps)
        elif plain.n_steps != n_steps or plain.batch_size != B:
            raise ValueError("the given plain trajectory does not match the batch and the number of steps")
        trigger = plain.entropy(gate_state) > threshold
    x_def = x.detach().clone()
    perturbation = x.new_zeros(B)
    ran = torch.zeros(B, dtype=torch.bool, device=dev)
    traj = plain
    interventions: Optional[List[Tuple[Tensor, Tensor, Tensor]]] = [] if record else None
    if bool(trigger.any()):
        idx = trigger.nonzero().squeeze(1)
        settings = {
            k: per_sample(v, B, torch.long if k in ("T_f", "R") else x.dtype, dev, k)[idx]
            for k, v in dict(T_f=T_f, R=R, beta=beta, eps=eps).items()
        }
        sub = entropy_reduction(model, x[idx], n_steps=n_steps, with_plain=False, record=record, **settings)
        if interventions is not None:
            interventions = [(idx[i], z, xb) for i, z, xb in sub.interventions]
        traj = plain.replaced(idx, sub.trajectory)
        x_def[idx] = sub.x_defended
        perturbation[idx] = sub.perturbation
        ran[idx] = sub.ran
    return DefenseResult(
        trajectory=traj, plain=plain, x_defended=x_def, ran=ran, perturbation=perturbation, interventions=interventions
    )


@dataclass(frozen=True)
class DefenseSetting:
    """One test-time configuration: plain early-state readout (``R = 0``), Algorithm 1 with
    (T_f, R, beta, eps), or its entropy-gated variant (``threshold`` at ``gate_state``)."""

    T_f: int = DEFAULT_T_F
    R: int = DEFAULT_R
    beta: float = DEFAULT_BETA
    eps: float = DEFAULT_EPS
    gated: bool = False
    threshold: Optional[float] = None
    gate_state: Optional[int] = None  # None: the model's early (readout) state

    @property
    def is_plain(self) -> bool:
        return self.R == 0

    @property
    def name(self) -> str:
        return setting_name(self.T_f, self.R, self.gated)

    @classmethod
    def parse(cls, text: str, beta: float = DEFAULT_BETA, eps: float = DEFAULT_EPS) -> "DefenseSetting":
        """``none``, ``T_f,R`` or ``T_f,R,gated`` (e.g. ``2,10`` or ``2,10,gated``)."""
        text = text.strip().lower()
        if text in ("none", "off", "0"):
            return cls(R=0, beta=beta, eps=eps)
        parts = [p.strip() for p in text.split(",")]
        gated = parts[-1] == "gated"
        parts = parts[:-1] if gated else parts
        try:
            T_f, R = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"defense setting {text!r}: expected 'none', 'T_f,R' or 'T_f,R,gated'") from None
        if T_f < 1 or R < 0:
            raise ValueError(f"defense setting {text!r}: need T_f >= 1 and R >= 0")
        return cls(T_f=T_f, R=R, beta=beta, eps=eps, gated=gated)

    def run(self, model: "DEQModel", x: Tensor, with_plain: bool = False, record: bool = False) -> DefenseResult:
        """Apply this setting to a batch (eval mode)."""
        if self.gated:
            if self.threshold is None:
                raise ValueError(f"{self.name}: the gate threshold has not been chosen")
            gate = model.readout_index() if self.gate_state is None else self.gate_state
            return gated_entropy_reduction(
                model, x, self.threshold, gate, self.T_f, self.R, self.beta, self.eps, record=record
            )
        return entropy_reduction(model, x, self.T_f, self.R, self.beta, self.eps, with_plain=with_plain, record=record)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "T_f": self.T_f,
            "R": self.R,
            "beta": self.beta,
            "eps": self.eps,
            "gated": self.gated,
            "threshold": self.threshold,
            "gate_state": self.gate_state,
        }
