"""Optimisers, learning-rate schedules and the weight average of a training run.

* Adam with cosine decay is paper 1's recipe (Appendix A);
* SGD with Nesterov momentum and a one-cycle schedule (linear up to the peak, then down
  to zero) is the budget recipe of fast adversarial training (Wong et al. 2020);
* an exponential moving average (EMA) of the weights is validated and shipped instead of
  the raw weights when ``optim.ema_decay`` is set.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, Iterable

import torch
from torch import nn

from .config import OptimSection

__all__ = ["build_optimizer", "learning_rate", "WeightEMA"]


def build_optimizer(cfg: OptimSection, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def learning_rate(cfg: OptimSection, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) out of ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "onecycle":
        peak = cfg.onecycle_peak
        t = min(1.0, (step + 1) / max(1, total_steps))
        return cfg.lr * (t / peak if t <= peak else (1.0 - t) / (1.0 - peak))
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


class WeightEMA:
    """An exponential moving average of a model's parameters; buffers (BatchNorm
    statistics) are copied from the live model. The decay warms up as
    min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not dominated
    by the random initialisation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, live in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(live.detach(), 1.0 - d)
        for avg, live in zip(self.model.buffers(), model.buffers()):
            avg.copy_(live)

    def state_dict(self) -> Dict[str, Any]:
        return {"updates": self.updates, "weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["weights"])
