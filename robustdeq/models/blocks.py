"""Building blocks shared by the models: input standardisation and the convolutional DEQs' layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

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


def conv3x3(cin: int, cout: int, stride: int = 1, wnorm: bool = False, bias: bool = False) -> nn.Module:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
    return weight_norm(conv) if wnorm else conv


def conv1x1(cin: int, cout: int, wnorm: bool = False, bias: bool = False) -> nn.Module:
    conv = nn.Conv2d(cin, cout, 1, bias=bias)
    return weight_norm(conv) if wnorm else conv


def groups_for(channels: int, preferred: int = 8) -> int:
    """The largest divisor of ``channels`` that is <= ``preferred`` (GroupNorm groups)."""
    g = min(preferred, channels)
    while channels % g:
        g -= 1
    return g


class InjectedResidualBlock(nn.Module):
    """The MDEQ residual cell block: z -> GN(ReLU(GN(conv2(ReLU(GN(conv1 z)))) + u + z)).

    ``conv1`` widens by ``expansion``; the injection u is added after ``conv2``
    (Bai et al., MDEQ; paper 1 Appendix A uses this block in every branch).
    """

    def __init__(
        self, channels: int, expansion: int = 1, num_groups: int = 8, wnorm: bool = True, dropout: float = 0.0
    ):
        super().__init__()
        inner = channels * expansion
        self.conv1 = conv3x3(channels, inner, wnorm=wnorm)
        self.gn1 = nn.GroupNorm(groups_for(inner, num_groups), inner, affine=True)
        self.conv2 = conv3x3(inner, channels, wnorm=wnorm)
        self.gn2 = nn.GroupNorm(groups_for(channels, num_groups), channels, affine=True)
        self.gn3 = nn.GroupNorm(groups_for(channels, num_groups), channels, affine=True)
        self.dropout = float(dropout)

    def forward(self, z: Tensor, u: Tensor | None = None) -> Tensor:
        out = F.relu(self.gn1(self.conv1(z)))
        if self.dropout and self.training:
            out = F.dropout(out, self.dropout)
        out = self.conv2(out)
        if u is not None:
            out = out + u
        out = self.gn2(out)
        return self.gn3(F.relu(out + z))


class _ResNetBlock(nn.Module):
    """relu(body(x) + shortcut(x)) with a projection shortcut when shape changes."""

    def __init__(self, body: nn.Module, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = body
        self.shortcut = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(_ResNetBlock):
    """ResNet bottleneck (expansion 4), used by the MDEQ classification head."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        cout = planes * self.expansion
        body = nn.Sequential(
            nn.Conv2d(cin, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        super().__init__(body, cin, cout, stride)


class BasicResidual(_ResNetBlock):
    """ResNet basic block (used by the ResNet-20 feature extractor of LyaDEQ)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        super().__init__(body, cin, cout, stride)
