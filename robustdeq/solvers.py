"""Fixed-point solvers that expose every raw iterate.

All solvers work on flat, batch-first states ``z`` of shape ``[B, D]`` and treat every
sample independently: residuals, step sizes, memories and stopping are per sample, so
one sample can never change another sample's answer (docs/design.md §2).

A solver step is split in two so that the entropy-reduction defense (paper 1,
Algorithm 1) can redo a step with a new input:

* ``propose(state) -> z_next``   pure: uses the memory, writes nothing;
* ``commit(state, z_next, fz_next) -> state``   stores what the step learned.

The caller evaluates ``fz_next = f(z_next)`` in between. Each state carries ``z`` and
``fz = f(z)``, so the relative residual ``||f(z) - z|| / ||f(z)||`` of every recorded
iterate is known without extra work. Producing z[1..N] costs N + 1 evaluations of f.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Type

import torch
from torch import Tensor

__all__ = [
    "SolverState",
    "FixedPointIteration",
    "Anderson",
    "Broyden",
    "SOLVERS",
    "create_solver",
    "relative_residual",
    "solve",
]

_TINY = 1e-12


def relative_residual(z: Tensor, fz: Tensor, g: Optional[Tensor] = None) -> Tensor:
    """Per-sample ``||f(z) - z||_2 / ||f(z)||_2`` (paper 1, Fig. 2a); pass ``g = f(z) - z``
    when it is already known."""
    num = (fz - z if g is None else g).flatten(1).norm(dim=1)
    den = fz.flatten(1).norm(dim=1).clamp_min(_TINY)
    return num / den


@dataclass
class SolverState:
    """Per-sample solver state; every tensor is batch-first."""

    z: Tensor
    fz: Tensor
    step: Tensor  # [B] int64: how many committed steps each sample has taken
    memory: Dict[str, Tensor] = field(default_factory=dict)
    _g: Optional[Tensor] = field(default=None, repr=False, compare=False)

    @property
    def g(self) -> Tensor:
        """The residual vector g(z) = f(z) - z, computed once."""
        if self._g is None:
            self._g = self.fz - self.z
        return self._g

    @property
    def residual(self) -> Tensor:
        """Per-sample relative residual ||f(z) - z|| / ||f(z)||."""
        return relative_residual(self.z, self.fz, self.g)

    def select(self, idx: Tensor) -> "SolverState":
        """The sub-state of the samples ``idx`` (memory is gathered, a copy)."""
        return SolverState(
            z=self.z[idx],
            fz=self.fz[idx],
            step=self.step[idx],
            memory={k: v[idx] for k, v in self.memory.items()},
            _g=None if self._g is None else self._g[idx],
        )

    def with_fz(self, fz: Tensor) -> "SolverState":
        """The same state with ``f(z)`` re-evaluated (e.g. after the input changed)."""
        return SolverState(z=self.z, fz=fz, step=self.step, memory=self.memory)


class Solver:
    """Base class. Subclasses implement ``_allocate``, ``propose`` and ``_store``."""

    name = "base"

    def init(self, z0: Tensor, fz0: Tensor) -> SolverState:
        state = SolverState(z=z0, fz=fz0, step=torch.zeros(z0.shape[0], dtype=torch.long, device=z0.device))
        state.memory = self._allocate(z0)
        return state

    def _allocate(self, z0: Tensor) -> Dict[str, Tensor]:
        return {}

    def propose(self, state: SolverState) -> Tensor:
        raise NotImplementedError

    def commit(
        self,
        state: SolverState,
        z_next: Tensor,
        fz_next: Tensor,
        active: Optional[Tensor] = None,
    ) -> SolverState:
        """Accept ``z_next`` for the samples in ``active`` (bool [B]; default all).

        Inactive samples keep their state unchanged (they are frozen, e.g. converged).
        The memory is updated in place for active samples only.
        """
        if active is None:
            new = SolverState(z=z_next, fz=fz_next, step=state.step + 1, memory=state.memory)
            self._store(state, new, None)
            return new
        idx = active.nonzero().squeeze(1)
        if idx.numel():
            sub = state.select(idx)
            self._store(sub, SolverState(z=z_next[idx], fz=fz_next[idx], step=sub.step + 1), idx, full=state)
        keep = active.view(-1, *([1] * (z_next.dim() - 1)))
        return SolverState(
            z=torch.where(keep, z_next, state.z),
            fz=torch.where(keep, fz_next, state.fz),
            step=state.step + active.long(),
            memory=state.memory,
        )

    def _store(
        self, state: SolverState, new: SolverState, idx: Optional[Tensor], full: Optional[SolverState] = None
    ) -> None:
        """Write what the step ``state -> new`` taught into ``(full or state).memory``
        at rows ``idx`` (``None``: all rows)."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class FixedPointIteration(Solver):
    """Damped fixed-point iteration ``z <- (1 - lam) z + lam f(z)``."""

    name = "fixed_point"

    def __init__(self, damping: float = 1.0):
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1], got {damping}")
        self.damping = float(damping)

    def propose(self, state: SolverState) -> Tensor:
        if self.damping == 1.0:
            return state.fz
        return torch.lerp(state.z, state.fz, self.damping)


class Anderson(Solver):
    """Anderson acceleration (paper 2, Algorithm 1), per-sample, memory ``m``.

    The new iterate mixes the last ``m`` pairs (z_i, f(z_i)) with weights alpha that
    minimise ``||sum_i alpha_i (f(z_i) - z_i)||^2 + lam ||alpha||^2`` subject to
    ``sum alpha = 1``; ``beta`` is the mixing parameter.
    """

    name = "anderson"

    def __init__(self, m: int = 5, lam: float = 1e-4, beta: float = 1.0):
        if m < 1:
            raise ValueError(f"Anderson memory m must be >= 1, got {m}")
        self.m, self.lam, self.beta = int(m), float(lam), float(beta)

    def _allocate(self, z0: Tensor) -> Dict[str, Tensor]:
        B, D = z0.shape[0], z0[0].numel()
        # past pairs, the current one lives in state.z / state.fz
        return {
            "X": z0.new_zeros(B, self.m - 1, D) if self.m > 1 else z0.new_zeros(B, 0, D),
            "F": z0.new_zeros(B, self.m - 1, D) if self.m > 1 else z0.new_zeros(B, 0, D),
        }

    def propose(self, state: SolverState) -> Tensor:
        B = state.z.shape[0]
        z, fz = state.z.reshape(B, 1, -1), state.fz.reshape(B, 1, -1)
        X = torch.cat([state.memory["X"], z], dim=1)  # [B, m, D]
        F = torch.cat([state.memory["F"], fz], dim=1)
        n = X.shape[1]
        # slot j of the history holds step (step - (n - 1) + j); valid if that is >= 0
        age = torch.arange(n - 1, -1, -1, device=z.device)
        valid = age.unsqueeze(0) <= state.step.unsqueeze(1)  # [B, n]
        G = (F - X) * valid.unsqueeze(2)
        H = torch.bmm(G, G.transpose(1, 2))
        eye = torch.eye(n, dtype=z.dtype, device=z.device)
        H = H + self.lam * eye
        # invalid slots: identity rows/cols and zero coupling to the constraint -> alpha = 0
        vf = valid.to(z.dtype)
        H = H * (vf.unsqueeze(2) * vf.unsqueeze(1)) + eye * (1 - vf).unsqueeze(2)
        A = z.new_zeros(B, n + 1, n + 1)
        A[:, 0, 1:] = vf
        A[:, 1:, 0] = vf
        A[:, 1:, 1:] = H
        rhs = z.new_zeros(B, n + 1)
        rhs[:, 0] = 1.0
        alpha = torch.linalg.solve(A, rhs)[:, 1:]  # [B, n]
        mixed_f = torch.bmm(alpha.unsqueeze(1), F).squeeze(1)
        if self.beta == 1.0:
            out = mixed_f
        else:
            mixed_x = torch.bmm(alpha.unsqueeze(1), X).squeeze(1)
            out = self.beta * mixed_f + (1 - self.beta) * mixed_x
        return out.view_as(state.z)

    def _store(self, state, new, idx, full=None) -> None:
        if self.m == 1:
            return
        memory = (full if full is not None else state).memory
        B = state.z.shape[0]
        for key, current in (("X", state.z), ("F", state.fz)):
            hist = memory[key]
            # shift the window left by one and append the (old) current pair
            shifted = torch.cat([hist[:, 1:] if idx is None else hist[idx, 1:], current.reshape(B, 1, -1)], dim=1)
            if idx is None:
                hist.copy_(shifted)
            else:
                hist[idx] = shifted


class Broyden(Solver):
    """Limited-memory ("good") Broyden method on g(z) = f(z) - z, per sample.

    The inverse Jacobian estimate is ``B = -I + sum_i u_i v_i^T`` with at most ``m``
    rank-one terms (a ring buffer, per sample); the step is ``z <- z - alpha B g(z)``.
    """

    name = "broyden"

    def __init__(self, m: int = 8, alpha: float = 1.0):
        if m < 1:
            raise ValueError(f"Broyden memory m must be >= 1, got {m}")
        self.m, self.alpha = int(m), float(alpha)

    def _allocate(self, z0: Tensor) -> Dict[str, Tensor]:
        B, D = z0.shape[0], z0[0].numel()
        # uninitialised on purpose: only the slots every sample has filled are ever read
        return {"U": z0.new_empty(B, self.m, D), "V": z0.new_empty(B, self.m, D)}

    def _filled(self, state: SolverState) -> int:
        return min(self.m, int(state.step.min())) if state.step.numel() else 0

    @staticmethod
    def _low_rank(P: Tensor, Q: Tensor, x: Tensor) -> Tensor:
        """``sum_i P_i (Q_i . x)`` for [B, m, D] memories, as row-vector products (fast on CPU)."""
        coeff = torch.bmm(x.unsqueeze(1), Q.transpose(1, 2))  # [B, 1, m]
        return torch.bmm(coeff, P).squeeze(1)

    def propose(self, state: SolverState) -> Tensor:
        B = state.z.shape[0]
        z, g = state.z.reshape(B, -1), state.g.reshape(B, -1)
        n = self._filled(state)
        # -B g = g - sum_i u_i (v_i . g)
        dz = g if n == 0 else g - self._low_rank(state.memory["U"][:, :n], state.memory["V"][:, :n], g)
        z_next = z + dz if self.alpha == 1.0 else z + self.alpha * dz
        return z_next.view_as(state.z)

    def _store(self, state, new, idx, full=None) -> None:
        B = state.z.shape[0]
        n = self._filled(state)
        s = (new.z - state.z).reshape(B, -1)
        y = (new.g - state.g).reshape(B, -1)
        if n == 0:
            vT, By = -s, -y
        else:
            U, V = state.memory["U"][:, :n], state.memory["V"][:, :n]
            vT = self._low_rank(V, U, s) - s  # B^T s
            By = self._low_rank(U, V, y) - y
        denom = (vT * y).sum(1, keepdim=True)
        ok = denom.abs() > _TINY  # a degenerate step stores a zero update (u = 0)
        u = (s - By) * (ok.to(s.dtype) / torch.where(ok, denom, torch.ones_like(denom)))
        memory = (full if full is not None else state).memory
        lo, hi = int(state.step.min()), int(state.step.max())
        if lo == hi:  # the usual case: every sample writes the same slot (plain slicing, fast)
            rows = slice(None) if idx is None else idx
            memory["U"][rows, lo % self.m] = u
            memory["V"][rows, lo % self.m] = vT
        else:
            rows = torch.arange(B, device=s.device) if idx is None else idx
            slot = state.step % self.m
            memory["U"][rows, slot] = u
            memory["V"][rows, slot] = vT


SOLVERS: Dict[str, Type[Solver]] = {
    FixedPointIteration.name: FixedPointIteration,
    Anderson.name: Anderson,
    Broyden.name: Broyden,
}


def create_solver(name: str, **kwargs) -> Solver:
    """Instantiate a solver from the registry: ``fixed_point``, ``anderson``, ``broyden``."""
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None
    return cls(**kwargs)


@dataclass
class SolveResult:
    states: list  # z[0..N], each [B, D]
    residuals: Tensor  # [B, N + 1]
    final: SolverState


def solve(
    f: Callable[[Tensor, Optional[Tensor]], Tensor],
    z0: Tensor,
    solver: Solver,
    n_steps: int,
    tol: Optional[float] = None,
) -> SolveResult:
    """Run ``n_steps`` solver steps from ``z0`` and record every raw iterate.

    ``f(z, idx)`` evaluates the map for the samples ``idx`` (``None`` = all). With
    ``tol`` a sample stops once its relative residual is <= tol; its remaining recorded
    states repeat its last iterate, so every trajectory has N + 1 states.
    """
    state = solver.init(z0, f(z0, None))
    states, residuals = [state.z], [state.residual]
    for _ in range(n_steps):
        active = None
        if tol is not None:
            active = residuals[-1] > tol
            if not bool(active.any()):
                states.append(state.z)
                residuals.append(residuals[-1])
                continue
        state = step(f, solver, state, active)
        states.append(state.z)
        residuals.append(state.residual)
    return SolveResult(states=states, residuals=torch.stack(residuals, 1), final=state)


def step(f, solver: Solver, state: SolverState, active: Optional[Tensor] = None) -> SolverState:
    """One solver step; with ``active`` only those samples are evaluated and moved."""
    if active is None or bool(active.all()):
        z_next = solver.propose(state)
        return solver.commit(state, z_next, f(z_next, None))
    idx = active.nonzero().squeeze(1)
    sub = state.select(idx)
    z_sub = solver.propose(sub)
    z_next = state.z.index_copy(0, idx, z_sub)
    fz_next = state.fz.index_copy(0, idx, f(z_sub, idx))
    return solver.commit(state, z_next, fz_next, active)
