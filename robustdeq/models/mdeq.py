"""Multiscale DEQ (MDEQ, Bai et al. 2020) as configured in paper 1, Appendix A.

Four branches at 32/16/8/4 pixels with 32/64/128/256 channels; each branch is an
injected residual block (GroupNorm, weight norm), the input is injected into the first
branch only, and a multi-resolution fusion mixes all branches. The head turns each
branch into 4 x (14/28/56/112) channels with a bottleneck, merges them from fine to
coarse and projects to a final 1680-channel layer before pooling (DEQ-Large, ~11M
parameters). The state is all branches flattened and concatenated.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEQModel
from .blocks import Bottleneck, InjectedResidualBlock, conv1x1, conv3x3, groups_for


class _Fuse(nn.Module):
    """Sum of every branch brought to the resolution and width of branch ``i``."""

    def __init__(self, channels: Sequence[int], i: int, num_groups: int, wnorm: bool):
        super().__init__()
        self.i = i
        paths = []
        for j, cj in enumerate(channels):
            ci = channels[i]
            if j == i:
                paths.append(nn.Identity())
            elif j > i:  # coarser -> finer: 1x1 conv, then nearest upsampling in forward
                paths.append(nn.Sequential(conv1x1(cj, ci, wnorm=wnorm), nn.GroupNorm(groups_for(ci, num_groups), ci)))
            else:  # finer -> coarser: (i - j) strided 3x3 convs
                layers: List[nn.Module] = []
                c = cj
                for k in range(i - j):
                    last = k == i - j - 1
                    cout = ci if last else cj
                    layers += [
                        conv3x3(c, cout, stride=2, wnorm=wnorm),
                        nn.GroupNorm(groups_for(cout, num_groups), cout),
                    ]
                    if not last:
                        layers.append(nn.ReLU())
                    c = cout
                paths.append(nn.Sequential(*layers))
        self.paths = nn.ModuleList(paths)
        c = channels[i]
        self.post = nn.Sequential(
            nn.ReLU(), conv1x1(c, c, wnorm=wnorm), nn.GroupNorm(groups_for(c, max(1, num_groups // 2)), c)
        )

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        target = xs[self.i].shape[-1]
        out = xs[self.i]
        for j, (path, x) in enumerate(zip(self.paths, xs)):
            if j == self.i:
                continue
            y = path(x)
            if j > self.i:
                y = F.interpolate(y, size=(target, target), mode="nearest")
            out = out + y
        return self.post(out)


class MDEQ(DEQModel):
    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128, 256),
        head_channels: Sequence[int] = (14, 28, 56, 112),
        final_channels: int = 1680,
        expansion: int = 5,
        num_groups: int = 8,
        wnorm: bool = True,
        dropout: float = 0.0,
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
        if len(channels) != len(head_channels):
            raise ValueError("channels and head_channels need one entry per scale")
        normalize = self._configure_input(num_classes, input_size, mean, std, class_names)
        self.channels = list(channels)
        extra = self.extra_downsampling  # a larger input: stride-2 steps in the stem, branches near 32/16/8/4
        if input_size % 2 ** (len(channels) - 1 + extra):
            raise ValueError(f"input_size {input_size} must be divisible by {2 ** (len(channels) - 1 + extra)}")
        self.resolutions = [input_size // 2 ** (extra + i) for i in range(len(channels))]
        c0 = self.channels[0]
        step = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)
        reduce = [m for _ in range(extra) for m in (step[0](c0, c0, 3, 2, 1, bias=False), step[1](c0), step[2]())]
        self.stem = nn.Sequential(
            normalize,
            nn.Conv2d(3, c0, 3, padding=1, bias=False),
            nn.BatchNorm2d(c0),
            nn.ReLU(),
            *reduce,
            nn.Conv2d(c0, c0, 3, padding=1, bias=False),
            nn.BatchNorm2d(c0),
        )
        self.blocks = nn.ModuleList(
            InjectedResidualBlock(c, expansion=expansion, num_groups=num_groups, wnorm=wnorm, dropout=dropout)
            for c in self.channels
        )
        self.fuse = nn.ModuleList(_Fuse(self.channels, i, num_groups, wnorm) for i in range(len(self.channels)))
        heads = [hc * Bottleneck.expansion for hc in head_channels]
        self.incre = nn.ModuleList(Bottleneck(c, hc) for c, hc in zip(self.channels, head_channels))
        self.downsamp = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(heads[i], heads[i + 1], 3, stride=2, padding=1), nn.BatchNorm2d(heads[i + 1]), nn.ReLU()
            )
            for i in range(len(heads) - 1)
        )
        self.final = nn.Sequential(nn.Conv2d(heads[-1], final_channels, 1), nn.BatchNorm2d(final_channels), nn.ReLU())
        self.classifier = nn.Linear(final_channels, num_classes)
        self._sizes = [c * r * r for c, r in zip(self.channels, self.resolutions)]

    def _split(self, z: Tensor) -> List[Tensor]:
        parts = torch.split(z, self._sizes, dim=1)
        return [p.reshape(z.shape[0], c, r, r) for p, c, r in zip(parts, self.channels, self.resolutions)]

    def inject(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def state_dim(self, u: Tensor) -> int:
        return sum(self._sizes)

    def cell(self, z: Tensor, u: Tensor) -> Tensor:
        zs = self._split(z)
        bs = [blk(zi, u if i == 0 else None) for i, (blk, zi) in enumerate(zip(self.blocks, zs))]
        return torch.cat([fuse(bs).flatten(1) for fuse in self.fuse], dim=1)

    def head(self, z: Tensor, u: Tensor) -> Tensor:
        zs = self._split(z)
        y = self.incre[0](zs[0])
        for i, down in enumerate(self.downsamp):
            y = self.incre[i + 1](zs[i + 1]) + down(y)
        y = self.final(y)
        return self.classifier(y.mean((2, 3)))
