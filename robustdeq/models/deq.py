"""Single-scale convolutional DEQ (``deq-tiny``): sized for adversarial training on a CPU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEQModel
from .blocks import CIFAR10_MEAN, CIFAR10_STD, InjectedResidualBlock, Normalize, conv3x3, groups_for

__all__ = ["SingleScaleDEQ", "Normalize", "CIFAR10_MEAN", "CIFAR10_STD"]


class SingleScaleDEQ(DEQModel):
    """Stem (S x S -> C x R x R) + one injected residual block as f + pooled linear head.

    The state is C x R x R with R = S / 2**downsample for S = 32; a larger input size S takes
    :attr:`extra_downsampling` more stride-2 steps in the stem, so R stays near 32 / 2**downsample.
    z has D = C * R * R entries.
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
        input_size: int = 32,
        mean=None,
        std=None,
        class_names=None,
    ):
        super().__init__(solver=solver, solver_kwargs=solver_kwargs, n_steps=n_steps, readout_state=readout_state)
        normalize = self._configure_input(num_classes, input_size, mean, std, class_names)
        self.channels = channels
        downsample += self.extra_downsampling
        self.resolution = input_size
        for _ in range(downsample):
            self.resolution = (self.resolution + 1) // 2  # a 3x3 convolution of stride 2, padding 1
        # the stem runs once per input, outside the fixed-point loop: BatchNorm as in MDEQ's stem
        layers = [normalize, conv3x3(3, stem_channels, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU()]
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
