"""Neural dynamics of a DEQ: trajectories of states, their predictions and entropies.

Paper 1 (Sec. 2-3) reads the solver's iterates z[0..N] as a dynamical system. A
:class:`Trajectory` keeps every raw iterate with its per-sample relative residual and
computes, lazily and per state, the logits, probabilities and the prediction entropy
(paper 1, Eq. 6). The early-state defense reads a prediction from z[k] instead of z[N];
the default is the last-but-one state (paper 1, Sec. 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import solvers as _solvers
from .stages import stage


class DynamicalModel(Protocol):
    """What the dynamics need of a model (``models.base.DEQModel`` is one): the injection,
    the cell f(z; u), the head, the state size and the solver. A protocol, so that this
    module does not import the models that import it."""

    n_steps: int

    def inject(self, x: Tensor) -> Tensor: ...

    def cell(self, z: Tensor, u: Tensor) -> Tensor: ...

    def head(self, z: Tensor, u: Tensor) -> Tensor: ...

    def initial_state(self, u: Tensor) -> Tensor: ...

    def make_solver(self, name: Optional[str] = None, **overrides) -> "_solvers.Solver": ...


DEFAULT_READOUT = -2  # last but one: z[N-1]

__all__ = [
    "DEFAULT_READOUT",
    "DynamicalModel",
    "Trajectory",
    "prediction_entropy",
    "run_dynamics",
    "damped_steps",
    "damped_unroll",
    "CellMap",
    "PhantomOutput",
    "phantom_forward",
    "unrolled_forward",
]


def prediction_entropy(logits: Tensor) -> Tensor:
    """H = -sum_j p_j log p_j with p = softmax(logits), per sample (paper 1, Eq. 6)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class CellMap:
    """The map z -> f(z; u) of one model and one injection, restricted to sample rows."""

    def __init__(self, model: "DynamicalModel", u: Tensor):
        self.model, self.u = model, u

    def __call__(self, z: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        u = self.u if idx is None else self.u[idx]
        return self.model.cell(z, u)


class Trajectory:
    """States z[0..N] of a batch, residuals, and lazily computed readouts.

    ``states[k]`` is z[k] with shape [B, D]; ``residuals[:, k]`` its relative residual.
    ``injections[k]`` is the injection u under which z[k] was produced (it differs from
    the original input's only when a test-time defense changed the input).
    Indices may be negative: -1 is z[N], -2 (the default readout) is z[N-1].
    """

    def __init__(
        self, model: "DynamicalModel", states: Sequence[Tensor], residuals: Tensor, injections: Sequence[Tensor]
    ):
        if len(states) != residuals.shape[1] or len(states) != len(injections):
            raise ValueError("states, residuals and injections must cover the same steps")
        self.model = model
        self.states: List[Tensor] = list(states)
        self.residuals = residuals
        self.injections: List[Tensor] = list(injections)
        self._logits: Dict[int, Tensor] = {}

    @classmethod
    def from_readouts(cls, model: "DynamicalModel", all_logits: Tensor, residuals: Tensor) -> "Trajectory":
        """A trajectory known through its readouts only: logits at z[1..N] [B, N, C] and the
        residuals [B, N + 1], e.g. from an exported graph. Its states and injections are
        empty [B, 0] tensors: whatever needs the states themselves (the defense, attacks)
        must run the real dynamics."""
        B, N = all_logits.shape[:2]
        empty = all_logits.new_zeros(B, 0)
        traj = cls(model, [empty] * (N + 1), residuals, [empty] * (N + 1))
        traj._logits = {k + 1: all_logits[:, k] for k in range(N)}
        return traj

    # ---- shape -------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        """N: the number of solver steps (there are N + 1 states)."""
        return len(self.states) - 1

    @property
    def batch_size(self) -> int:
        return self.states[0].shape[0]

    def index(self, k: int) -> int:
        """Normalise a (possibly negative) state index to 0..N, with a clear error."""
        n = len(self.states)
        if not -n <= k < n:
            raise IndexError(f"state index {k} out of range for a trajectory of {n} states (z[0]..z[{n - 1}])")
        return k % n

    # ---- readouts ------------------------------------------------------------------
    def state(self, k: int = DEFAULT_READOUT) -> Tensor:
        return self.states[self.index(k)]

    def logits(self, k: int = DEFAULT_READOUT) -> Tensor:
        k = self.index(k)
        if k not in self._logits:
            with stage("head"):
                self._logits[k] = self.model.head(self.states[k], self.injections[k])
        return self._logits[k]

    def probabilities(self, k: int = DEFAULT_READOUT) -> Tensor:
        return self.logits(k).softmax(-1)

    def entropy(self, k: int = DEFAULT_READOUT) -> Tensor:
        """Per-sample prediction entropy at z[k] (paper 1, Eq. 6)."""
        return prediction_entropy(self.logits(k))

    def predict(self, k: int = DEFAULT_READOUT) -> Tensor:
        """Early-state readout: the predicted class from z[k]."""
        return self.logits(k).argmax(-1)

    def entropies(self, start: int = 1) -> Tensor:
        """Entropy at every state from ``start`` to N: [B, N + 1 - start]."""
        return torch.stack([self.entropy(k) for k in range(start, len(self.states))], 1)

    def all_logits(self, start: int = 1) -> Tensor:
        """[B, N + 1 - start, C] logits of every state from ``start``."""
        return torch.stack([self.logits(k) for k in range(start, len(self.states))], 1)

    def replaced(self, idx: Tensor, other: "Trajectory") -> "Trajectory":
        """A new trajectory whose samples ``idx`` come from ``other`` (same N)."""
        if other.n_steps != self.n_steps:
            raise ValueError("trajectories differ in length")
        out = Trajectory(
            self.model,
            [s.index_copy(0, idx, o) for s, o in zip(self.states, other.states)],
            self.residuals.index_copy(0, idx, other.residuals),
            [u.index_copy(0, idx, o) for u, o in zip(self.injections, other.injections)],
        )
        for k, v in self._logits.items():
            out._logits[k] = v.index_copy(0, idx, other.logits(k))
        return out

    def detach(self) -> "Trajectory":
        out = Trajectory(
            self.model,
            [s.detach() for s in self.states],
            self.residuals.detach(),
            [u.detach() for u in self.injections],
        )
        out._logits = {k: v.detach() for k, v in self._logits.items()}
        return out

    def __repr__(self) -> str:
        return (
            f"Trajectory(batch={self.batch_size}, N={self.n_steps}, final residual={self.residuals[:, -1].mean():.3g})"
        )


def run_dynamics(
    model: "DynamicalModel",
    x: Tensor,
    solver: Optional[_solvers.Solver] = None,
    n_steps: Optional[int] = None,
    tol: Optional[float] = None,
) -> Trajectory:
    """Inject x, solve for N steps from z[0] = 0, and record the trajectory."""
    solver = solver if solver is not None else model.make_solver()
    n_steps = model.n_steps if n_steps is None else int(n_steps)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    with stage("stem"):
        u = model.inject(x)
    with stage("solve"):
        result = _solvers.solve(CellMap(model, u), model.initial_state(u), solver, n_steps, tol)
    return Trajectory(model, result.states, result.residuals, [u] * len(result.states))


def damped_steps(model: "DynamicalModel", w: Tensor, u: Tensor, steps: int, lam: float) -> Tensor:
    """``steps`` damped applications of the cell, w <- (1 - lam) w + lam f(w; u), with gradient.

    From a detached intermediate state z[i] this is paper 1's intermediate-state attack
    surrogate (Eq. 11): exactly ``steps`` = K_a applications of f, z_a[i + K_a] returned.
    """
    if steps < 0:
        raise ValueError(f"unroll steps must be >= 0, got {steps}")
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"damping must be in (0, 1], got {lam}")
    for _ in range(steps):
        w = torch.lerp(w, model.cell(w, u), lam) if lam != 1.0 else model.cell(w, u)
    return w


def damped_unroll(model: "DynamicalModel", z: Tensor, u: Tensor, k_steps: int, tau: float) -> Tensor:
    """Phantom-gradient unroll from a detached state: w0 = f(z), then K damped steps
    w <- (1 - tau) w + tau f(w) (docs/design.md §4, K = 5, tau = 0.5): K + 1 applications of f."""
    if k_steps < 0:
        raise ValueError(f"unroll steps must be >= 0, got {k_steps}")
    return damped_steps(model, model.cell(z.detach(), u), u, k_steps, tau)


@dataclass
class PhantomOutput:
    logits: Tensor  # h(w_K), differentiable w.r.t. parameters and input
    state: Tensor  # the detached solver state z[n] the unroll started from
    injection: Tensor  # u = inject(x), differentiable


def phantom_forward(
    model: "DynamicalModel",
    x: Tensor,
    n_steps: Optional[int] = None,
    unroll: int = 5,
    tau: float = 0.5,
    solver: Optional[_solvers.Solver] = None,
) -> PhantomOutput:
    """Solve ``n_steps`` without gradient, then a differentiable damped unroll
    (phantom gradient, docs/design.md §4: w0 = f(z*), K = ``unroll`` steps of size ``tau``).

    This is the gradient training uses and therefore the "ready-made" attack gradient.
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


def unrolled_forward(model: "DynamicalModel", x: Tensor, depth: Optional[int] = None) -> Tensor:
    """Logits of the cell unrolled ``depth`` times from z[0] = 0 with full backpropagation:
    the weight-tied deep network used for pretraining (paper 1 Appendix A; MDEQ)."""
    depth = model.n_steps if depth is None else int(depth)
    if depth < 1:
        raise ValueError(f"unroll depth must be >= 1, got {depth}")
    u = model.inject(x)
    z = model.initial_state(u)
    for _ in range(depth):
        z = model.cell(z, u)
    return model.head(z, u)
