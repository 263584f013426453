"""An explicit residual network in the DEQ interface: the peer every DEQ is compared against.

The whole feed-forward body runs once, as the input injection ``u = body(x)``; the cell
is ``f(z; u) = u``, so the "fixed point" z* = u is reached after one step (N = 1) with
residual 0. Everything built for DEQs then works unchanged and at the network's true
cost: training (the phantom unroll reduces to w = u, so set ``objective.unroll: 0``),
every attack of the evaluation suite (the gradient reaches x through u), Algorithm 1,
archives, ONNX export and serving. Intermediate states and the early-state choice are
trivial here: z[1] is the network's output, z[0] = 0 carries no information.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEQModel
from .blocks import BasicResidual


class ExplicitResNet(DEQModel):
    """A CIFAR ResNet (He et al. 2016, Sec. 4.2): a 3x3 stem, three stages of
    ``blocks`` basic blocks with ``widths`` channels (strides 1, 2, 2), global pooling and
    a linear classifier. ``widths = (16, 32, 64)``, ``blocks = 3`` is ResNet-20 (0.27M)."""

    #: f ignores z: there is no Jacobian to regularise
    explicit = True

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        blocks: int = 3,
        num_classes: int = 10,
        readout_state: int = -1,
        input_size: int = 32,
        mean=None,
        std=None,
        class_names=None,
    ):
        super().__init__(solver="fixed_point", solver_kwargs={}, n_steps=1, readout_state=readout_state)
        normalize = self._configure_input(num_classes, input_size, mean, std, class_names)
        self.widths = tuple(int(w) for w in widths)
        w0 = self.widths[0]
        layers = [normalize, nn.Conv2d(3, w0, 3, padding=1, bias=False), nn.BatchNorm2d(w0), nn.ReLU()]
        # a larger input takes stride-2 residual blocks at the stem's width first (state near 8x8)
        layers += [BasicResidual(w0, w0, stride=2) for _ in range(self.extra_downsampling)]
        self.resolution = input_size
        for _ in range(self.extra_downsampling + 2):
            self.resolution = (self.resolution + 1) // 2
        cin = w0
        for stage, w in enumerate(self.widths):
            for b in range(blocks):
                layers.append(BasicResidual(cin, w, stride=2 if stage > 0 and b == 0 else 1))
                cin = w
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def inject(self, x: Tensor) -> Tensor:
        return self.body(x).flatten(1)

    def state_dim(self, u: Tensor) -> int:
        return u.shape[1]

    def cell(self, z: Tensor, u: Tensor) -> Tensor:
        return u

    def head(self, z: Tensor, u: Tensor) -> Tensor:
        h = z.view(z.shape[0], self.widths[-1], self.resolution, self.resolution)
        return self.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))
