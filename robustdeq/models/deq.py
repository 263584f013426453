"""Single-scale convolutional DEQ (``deq-tiny``): sized for adversarial training on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEQModel
from .blocks import InjectedResidualBlock, conv3x3, groups_for

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel standardisation inside the model, so that inputs (and attacks) live in [0, 1]."""

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class SingleScaleDEQ(DEQModel):
    """Stem (32x32 -> C x R x R) + one injected residual block as f + pooled linear head.

    The state is C x R x R with R = 32 / 2**downsample; z has D = C * R * R entries.
    """

    def __init__(
        self,
        channels: int = 32,
        stem_channels: int = 24,
        downsample: int = 1,
        expansion: int = 1,
        num_groups: int = 4,
        wnorm: bool = False,
        num_classes: int = 10,
        solver: str = "broyden",
        solver_kwargs=None,
        n_steps: int = 8,
        readout_state: int = -2,
    ):
        super().__init__(solver=solver, solver_kwargs=solver_kwargs, n_steps=n_steps, readout_state=readout_state)
        self.num_classes = num_classes
        self.channels = channels
        self.resolution = 32 // (2**downsample)
        # the stem runs once per input, outside the fixed-point loop: BatchNorm as in MDEQ's stem
        layers = [Normalize(), conv3x3(3, stem_channels, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU()]
        cin = stem_channels
        for i in range(downsample):
            cout = channels if i == downsample - 1 else stem_channels
            layers += [conv3x3(cin, cout, stride=2), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        if downsample == 0:
            layers += [conv3x3(cin, channels)]
        else:
            layers[-1] = nn.Identity()  # the injection enters the cell before its norm: keep it linear
        self.stem = nn.Sequential(*layers)
        self.block = InjectedResidualBlock(channels, expansion=expansion, num_groups=num_groups, wnorm=wnorm)
        self.head_norm = nn.GroupNorm(groups_for(channels, num_groups), channels)
        self.classifier = nn.Linear(channels, num_classes)

    def _shape(self, z: Tensor) -> Tensor:
        return z.view(z.shape[0], self.channels, self.resolution, self.resolution)

    def inject(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def state_dim(self, u: Tensor) -> int:
        return self.channels * self.resolution * self.resolution

    def cell(self, z: Tensor, u: Tensor) -> Tensor:
        return self.block(self._shape(z), u).flatten(1)

    def head(self, z: Tensor, u: Tensor) -> Tensor:
        h = F.relu(self.head_norm(self._shape(z)))
        return self.classifier(h.mean((2, 3)))
