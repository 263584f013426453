"""LyaDEQ (paper 2): a DEQ whose readout is made Lyapunov-stable.

Feature extractor -> DEQ layer (paper 2, Eq. 11) solved by Anderson -> Lyapunov stability
module -> orthogonal FC -> classifier.

Design choice (docs/design.md §5, the collapse trap): the projected dynamics F_hat are NOT
used inside the fixed-point iteration (with V's minimum at 0 the only fixed point would
be z = 0 for every input). The solver runs the plain DEQ layer; the stability module is
part of the head: from a state z it takes ``stability_steps`` explicit steps
z <- z + step_size * F_hat(z), where F(z) = f(z; u) - z are the DEQ's own residual
dynamics and F_hat is F projected so that grad V^T F_hat <= -alpha V (paper 2, Eq. 8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from .base import DEQModel
from .blocks import BasicResidual

_DENOM_FLOOR = 1e-12


def smooth_relu(x: Tensor, d: float) -> Tensor:
    """Paper 2, Eq. 12: 0 for x <= 0, x^2 / 2d on (0, d), x - d/2 beyond. Convex, monotone, C^1."""
    return torch.where(x <= 0, torch.zeros_like(x), torch.where(x < d, x * x / (2 * d), x - d / 2))


class ICNN(nn.Module):
    """Two-layer input-convex network g (paper 2, Eq. 10): hidden-to-hidden weights are
    softplus of free parameters (non-negative), activations smooth ReLU (convex, non-decreasing)."""

    def __init__(self, dim: int, hidden: int = 64, d: float = 0.1):
        super().__init__()
        self.d = d
        self.W0 = nn.Linear(dim, hidden)
        self.W1 = nn.Linear(dim, 1)
        self.U1_raw = nn.Parameter(torch.randn(1, hidden) * 0.1 - 2.0)

    def forward(self, z: Tensor) -> Tensor:
        q1 = smooth_relu(self.W0(z), self.d)
        return smooth_relu(F.linear(q1, F.softplus(self.U1_raw)) + self.W1(z), self.d).squeeze(-1)


class LyapunovFunction(nn.Module):
    """V(z) = sigma(g(z) - g(0)) + eta ||z||^2 (paper 2, Eq. 9), per sample.

    g(0) is recomputed on every call (not frozen at construction), so V(0) = 0 and
    V > 0 elsewhere hold for the current parameters.
    """

    def __init__(self, dim: int, hidden: int = 64, d: float = 0.1, eta: float = 1e-3):
        super().__init__()
        self.g = ICNN(dim, hidden, d)
        self.d, self.eta = d, eta

    def forward(self, z: Tensor) -> Tensor:
        g0 = self.g(torch.zeros_like(z[:1]))
        return smooth_relu(self.g(z) - g0, self.d) + self.eta * z.pow(2).sum(-1)

    def value_and_grad(self, z: Tensor):
        """V(z) and grad_z V(z); differentiable when autograd is recording."""
        create_graph = torch.is_grad_enabled() and (z.requires_grad or any(p.requires_grad for p in self.parameters()))
        with torch.enable_grad():
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            v = self(zz)
            (grad,) = torch.autograd.grad(v.sum(), zz, create_graph=create_graph)
        if not create_graph:
            v, grad = v.detach(), grad.detach()
        return v, grad


def project_dynamics(F_z: Tensor, v: Tensor, grad_v: Tensor, alpha: float) -> Tensor:
    """F_hat = F - grad V * ReLU(grad V^T F + alpha V) / ||grad V||^2 (paper 2, Eq. 8), per sample.

    The denominator is floored (not shifted), so the guarantee grad V^T F_hat <= -alpha V
    holds exactly wherever ||grad V||^2 exceeds the floor, and z = 0 gives no NaN.
    """
    phi = (grad_v * F_z).sum(-1) + alpha * v
    scale = F.relu(phi) / grad_v.pow(2).sum(-1).clamp_min(_DENOM_FLOOR)
    return F_z - grad_v * scale.unsqueeze(-1)


class ResNet20Features(nn.Module):
    """ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels) -> a ``dim``-vector."""

    def __init__(self, dim: int = 64, widths=(16, 32, 64), blocks_per_stage: int = 3, extra_downsampling: int = 0):
        super().__init__()
        layers = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        layers += [BasicResidual(widths[0], widths[0], stride=2) for _ in range(extra_downsampling)]
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks_per_stage):
                layers.append(BasicResidual(cin, w, stride=2 if (b == 0 and i > 0) else 1))
                cin = w
        self.body = nn.Sequential(*layers)
        self.proj = nn.Identity() if cin == dim else nn.Linear(cin, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.body(x).mean((2, 3)))


class TinyFeatures(nn.Module):
    """A small conv feature extractor for CPU-sized LyaDEQ."""

    def __init__(self, dim: int = 64, widths=(16, 32, 64), extra_downsampling: int = 0):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [
                nn.Conv2d(cin, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
            ]
            if i == 0:  # a larger input: stride-2 steps at the first width, so the work stays near 32x32's
                for _ in range(extra_downsampling):
                    layers += [nn.Conv2d(w, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(cin, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.body(x).mean((2, 3)))


class LyaDEQ(DEQModel):
    onnx_export_blocker = "its head computes grad V with autograd, which ONNX cannot express"

    def __init__(
        self,
        backbone: str = "tiny",
        backbone_widths=(16, 32, 64),
        dim: int = 64,
        hidden: int = 128,
        icnn_hidden: int = 64,
        alpha: float = 0.1,
        eta: float = 1e-3,
        smooth_d: float = 0.1,
        stability_steps: int = 1,
        step_size: float = 1.0,
        num_classes: int = 10,
        solver: str = "anderson",
        solver_kwargs=None,
        n_steps: int = 30,
        readout_state: int = -2,
        input_size: int = 32,
        mean=None,
        std=None,
        class_names=None,
    ):
        super().__init__(
            solver=solver,
            solver_kwargs=solver_kwargs if solver_kwargs is not None else {"m": 5},
            n_steps=n_steps,
            readout_state=readout_state,
        )
        if backbone not in ("tiny", "resnet20"):
            raise ValueError(f"unknown LyaDEQ backbone {backbone!r}; choose 'tiny' or 'resnet20'")
        if stability_steps < 1:
            raise ValueError("stability_steps must be >= 1")
        normalize = self._configure_input(num_classes, input_size, mean, std, class_names)
        self.dim = dim
        self.alpha, self.stability_steps, self.step_size = float(alpha), int(stability_steps), float(step_size)
        widths = tuple(int(w) for w in backbone_widths)
        extra = self.extra_downsampling
        features = (
            TinyFeatures(dim, widths, extra_downsampling=extra)
            if backbone == "tiny"
            else ResNet20Features(dim, widths, extra_downsampling=extra)
        )
        self.features = nn.Sequential(normalize, features)
        # DEQ layer, paper 2 Eq. 11: f(z, x) = BN(ReLU(x + W2 BN(ReLU(W1 z + b1)) + b2))
        self.W1 = nn.Linear(dim, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.W2 = nn.Linear(hidden, dim)
        self.bn2 = nn.BatchNorm1d(dim)
        self.lyapunov = LyapunovFunction(dim, icnn_hidden, smooth_d, eta)
        self.orth_fc = orthogonal(nn.Linear(dim, dim, bias=False))
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.normal_(self.W2.weight, std=0.5 / math.sqrt(hidden))

    def inject(self, x: Tensor) -> Tensor:
        return self.features(x)

    def state_dim(self, u: Tensor) -> int:
        return self.dim

    def cell(self, z: Tensor, u: Tensor) -> Tensor:
        y = self.W2(self.bn1(F.relu(self.W1(z))))
        return self.bn2(F.relu(u + y))

    def stabilize(self, z: Tensor, u: Tensor) -> Tensor:
        """Explicit steps of the projected dynamics z <- z + step_size * F_hat(z)."""
        for _ in range(self.stability_steps):
            v, grad_v = self.lyapunov.value_and_grad(z)
            z = z + self.step_size * project_dynamics(self.cell(z, u) - z, v, grad_v, self.alpha)
        return z

    def head(self, z: Tensor, u: Tensor) -> Tensor:
        return self.classifier(self.orth_fc(self.stabilize(z, u)))
