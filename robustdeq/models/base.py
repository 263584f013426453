"""The common shape of every model: injection, cell, head, and a trajectory call."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import solvers as _solvers
from ..data import CLASSES as CIFAR10_CLASSES  # the names of a 10-class model that was given none
from ..dynamics import DEFAULT_READOUT, Trajectory, run_dynamics
from .blocks import CIFAR10_MEAN, CIFAR10_STD, Normalize


class DEQModel(nn.Module):
    """A deep equilibrium classifier split into its three parts (docs/design.md §2):

    * ``inject(x) -> u``: the input injection, computed once per input;
    * ``cell(z, u) -> z'``: the map f(z; u) whose fixed point is sought, on flat [B, D] states;
    * ``head(z, u) -> logits``: the classification head h. Plain DEQs ignore ``u``; LyaDEQ's
      head contains the Lyapunov stability module, which evaluates the projected dynamics
      at z and therefore needs the injection.

    ``trajectory(x)`` solves from z[0] = 0 and returns every state; ``forward(x)`` returns
    the logits of the readout state (the last-but-one by default).
    """

    #: registry name, set by the registry
    name: str = "deq"
    #: why the plain forward cannot be exported to ONNX (None: it can; see robustdeq.export)
    onnx_export_blocker: Optional[str] = None
    num_classes: int = 10
    input_shape = (3, 32, 32)
    #: True for an explicit network wrapped in this interface (f ignores z; see models/explicit.py)
    explicit: bool = False

    #: the classes' names, in label order (set by :meth:`_configure_input`)
    class_names: List[str] = list(CIFAR10_CLASSES)

    def _configure_input(
        self,
        num_classes: int,
        input_size: int = 32,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        class_names: Optional[Sequence[str]] = None,
    ) -> "Normalize":
        """Record the input size, the classes and their names; return the model's first layer,
        the per-channel standardisation (CIFAR-10's statistics unless ``mean``/``std`` are given).

        Models built for another image size keep their internal state near the CIFAR size:
        :meth:`extra_downsampling` says how many stride-2 steps more the stem takes."""
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 8 <= int(input_size) <= 1024:
            raise ValueError(f"input_size must be between 8 and 1024 pixels, got {input_size}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.input_shape = (3, int(input_size), int(input_size))
        if class_names is not None:
            self.class_names = [str(c) for c in class_names]
        elif num_classes == len(CIFAR10_CLASSES):
            self.class_names = list(CIFAR10_CLASSES)
        else:
            self.class_names = [f"class_{i}" for i in range(num_classes)]
        return Normalize(mean or CIFAR10_MEAN, std or CIFAR10_STD)

    @property
    def input_size(self) -> int:
        return self.input_shape[-1]

    @property
    def extra_downsampling(self) -> int:
        """Stride-2 steps beyond the 32-pixel design: round(log2(size / 32)), at least 0."""
        return max(0, round(math.log2(self.input_size / 32)))

    def __init__(
        self,
        solver: str = "broyden",
        solver_kwargs: Optional[Dict[str, Any]] = None,
        n_steps: int = 8,
        readout_state: int = DEFAULT_READOUT,
    ):
        super().__init__()
        _solvers.create_solver(solver, **(solver_kwargs or {}))  # validate early
        self.solver_name = solver
        self.solver_kwargs = dict(solver_kwargs or {})
        self.n_steps = int(n_steps)
        self.readout_state = int(readout_state)

    # ---- the three parts --------------------------------------------------------------
    def inject(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def cell(self, z: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, z: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def state_dim(self, u: Tensor) -> int:
        """D, the size of one flat state for this injection."""
        raise NotImplementedError

    # ---- derived -------------------------------------------------------------------------
    def initial_state(self, u: Tensor) -> Tensor:
        """z[0] = 0 (paper 1, Sec. 3.2.1)."""
        return u.new_zeros(u.shape[0], self.state_dim(u))

    def make_solver(self, name: Optional[str] = None, **overrides) -> _solvers.Solver:
        if name is None:
            return _solvers.create_solver(self.solver_name, **{**self.solver_kwargs, **overrides})
        return _solvers.create_solver(name, **overrides)

    def trajectory(
        self,
        x: Tensor,
        solver: Optional[_solvers.Solver] = None,
        n_steps: Optional[int] = None,
        tol: Optional[float] = None,
    ) -> Trajectory:
        return run_dynamics(self, x, solver=solver, n_steps=n_steps, tol=tol)

    def forward(self, x: Tensor, state: Optional[int] = None) -> Tensor:
        """Logits from the readout state (no gradient flows through the solver)."""
        with torch.no_grad():
            traj = self.trajectory(x)
        k = traj.index(self.readout_state if state is None else state)
        return self.head(traj.states[k], traj.injections[k])

    def readout_index(self) -> int:
        """The readout state as an index in 0..N (``readout_state`` may be negative)."""
        return self.readout_state % (self.n_steps + 1)

    def config(self) -> Dict[str, Any]:
        """The constructor arguments, enough to rebuild the model (stored in checkpoints)."""
        return dict(getattr(self, "_config", {}))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
