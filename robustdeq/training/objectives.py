"""Training objectives: clean, PGD-AT (Madry et al.) and TRADES (Zhang et al.), each
optionally on a random intermediate state (paper 1 Sec. 3.3), with the phantom gradient
and Jacobian regularisation (paper 1 Appendix A, docs/design.md §4).

One training step is split in two so that DistributedDataParallel sees a module call:

1. :meth:`Objective.prepare` (outside DDP, eval mode): draw the depth n, craft the
   adversarial batch against the bare model.
2. :class:`ObjectiveModule` ``forward`` (through DDP, train mode): the differentiable loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import LossFn, pgd_linf, random_like, single_step_linf
from ..dynamics import phantom_forward, unrolled_forward
from .config import AttackSection, ObjectiveSection
from .loss_terms import draw_intermediate_step, jacobian_regularizer

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import DEQModel

__all__ = ["StepInputs", "Objective", "ObjectiveModule", "trades_kl", "training_step", "inner_maximisation"]


@dataclass
class StepInputs:
    """What one training step feeds the differentiable loss."""

    x: Tensor
    y: Tensor
    x_adv: Optional[Tensor]
    depth: Optional[int]  # solver steps before the phantom unroll (None = N)
    pretrain: bool = False
    use_jacobian: bool = False
    attack_depths: List[Optional[int]] = field(default_factory=list)  # the depth of every attack-loss call
    generator: Optional[torch.Generator] = None  # probe vectors of the Jacobian regulariser


def trades_kl(logits_adv: Tensor, logits_clean: Tensor) -> Tensor:
    """Per-sample KL(p(x) || p(x_adv)), the TRADES robustness term."""
    log_p_adv, log_p_clean = F.log_softmax(logits_adv, 1), F.log_softmax(logits_clean, 1)
    return F.kl_div(log_p_adv, log_p_clean, reduction="none", log_target=True).sum(1)


def inner_maximisation(
    loss_fn: LossFn, x: Tensor, attack: AttackSection, generator: torch.Generator, x_init: Optional[Tensor] = None
) -> Tensor:
    """The training attack of ``attack.kind``: PGD (from ``x_init`` when given, else the
    uniform random start), FGSM with random start, or N-FGSM (see :func:`single_step_linf`)."""
    if attack.kind == "pgd":
        return pgd_linf(
            loss_fn, x, attack.eps, attack.step_size, attack.steps, attack.random_start, generator, x_init=x_init
        )
    return single_step_linf(
        loss_fn,
        x,
        attack.eps,
        attack.step_size,
        noise=attack.noise * attack.eps,
        project=attack.kind == "fgsm_rs",
        generator=generator,
    )


class Objective:
    """The attack side of a training step (eval mode, bare model)."""

    def __init__(self, objective: ObjectiveSection, attack: AttackSection, pretrain_depth: Optional[int] = None):
        self.cfg = objective
        self.attack = attack
        self.pretrain_depth = pretrain_depth

    def draw_depth(self, model: "DEQModel", generator: torch.Generator) -> Optional[int]:
        """n ~ U{1..N} when training on random intermediate states (Sec. 3.3), else None (= N)."""
        return draw_intermediate_step(model.n_steps, generator) if self.cfg.random_depth else None

    def prepare(
        self,
        model: "DEQModel",
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        pretrain: bool = False,
        use_jacobian: bool = False,
        depth_generator: Optional[torch.Generator] = None,
    ) -> StepInputs:
        """``generator`` drives attack noise; ``depth_generator`` (default: the same) the
        depth draws, so that DDP processes can share depths but not noise."""
        if pretrain:
            return StepInputs(x, y, None, None, pretrain=True)
        depth_generator = depth_generator or generator
        depth = self.draw_depth(model, depth_generator)
        inputs = StepInputs(x, y, None, depth, use_jacobian=use_jacobian, generator=generator)
        if self.cfg.kind == "clean":
            return inputs
        cfg, atk = self.cfg, self.attack

        def attack_depth() -> Optional[int]:
            d = self.draw_depth(model, depth_generator) if cfg.redraw_depth_in_attack else depth
            inputs.attack_depths.append(d)
            return d

        was_training = model.training
        model.eval()
        try:
            attack_unroll = cfg.unroll if cfg.attack_unroll is None else cfg.attack_unroll
            if cfg.kind == "pgd_at":

                def loss_fn(xa: Tensor) -> Tensor:
                    out = phantom_forward(model, xa, attack_depth(), attack_unroll, cfg.tau)
                    return F.cross_entropy(out.logits, y, reduction="none")

                inputs.x_adv = inner_maximisation(loss_fn, x, atk, generator)
            else:  # trades: maximise KL(p(x) || p(x_adv)) from x + 0.001 N(0, I)
                with torch.no_grad():
                    clean_logits = phantom_forward(model, x, depth, cfg.unroll, cfg.tau).logits

                def loss_fn(xa: Tensor) -> Tensor:
                    out = phantom_forward(model, xa, attack_depth(), attack_unroll, cfg.tau)
                    return trades_kl(out.logits, clean_logits)

                start = x + 0.001 * random_like(x, generator, "normal") if atk.random_start else x
                inputs.x_adv = inner_maximisation(loss_fn, x, atk, generator, x_init=start)
        finally:
            model.train(was_training)
        return inputs


class ObjectiveModule(nn.Module):
    """The differentiable training loss as a module (so DDP can wrap it).

    ``forward`` returns the total loss and detached statistics.
    """

    def __init__(self, model: "DEQModel", objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, inputs: StepInputs) -> tuple:
        model, cfg = self.model, self.objective.cfg
        y = inputs.y
        stats: Dict[str, float] = {}
        if inputs.pretrain:
            logits = unrolled_forward(model, inputs.x, self.objective.pretrain_depth)
            loss = F.cross_entropy(logits, y)
            stats["ce"] = float(loss.detach())
            stats["train_acc"] = float((logits.argmax(1) == y).float().mean())
            return loss, stats
        if cfg.kind == "clean":
            out = phantom_forward(model, inputs.x, inputs.depth, cfg.unroll, cfg.tau)
            loss = F.cross_entropy(out.logits, y)
            stats["ce"] = float(loss.detach())
            stats["train_acc"] = float((out.logits.argmax(1) == y).float().mean())
        elif cfg.kind == "pgd_at":
            out = phantom_forward(model, inputs.x_adv, inputs.depth, cfg.unroll, cfg.tau)
            loss = F.cross_entropy(out.logits, y)
            stats["ce"] = float(loss.detach())
            stats["train_adv_acc"] = float((out.logits.argmax(1) == y).float().mean())
        else:
            clean = phantom_forward(model, inputs.x, inputs.depth, cfg.unroll, cfg.tau)
            out = phantom_forward(model, inputs.x_adv, inputs.depth, cfg.unroll, cfg.tau)
            ce = F.cross_entropy(clean.logits, y)
            kl = trades_kl(out.logits, clean.logits).mean()
            loss = ce + cfg.trades_beta * kl
            stats["ce"] = float(ce.detach())
            stats["kl"] = float(kl.detach())
            stats["train_acc"] = float((clean.logits.argmax(1) == y).float().mean())
            stats["train_adv_acc"] = float((out.logits.argmax(1) == y).float().mean())
        if inputs.use_jacobian and cfg.jacobian_weight > 0:
            jac = jacobian_regularizer(
                model, out.state, out.injection, generator=inputs.generator, fraction=cfg.jacobian_fraction
            )
            loss = loss + cfg.jacobian_weight * jac
            stats["jacobian"] = float(jac.detach())
        return loss, stats


def training_step(
    module: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    generator: torch.Generator,
    pretrain: bool = False,
    use_jacobian: bool = False,
    grad_clip: Optional[float] = None,
    depth_generator: Optional[torch.Generator] = None,
) -> Dict[str, float]:
    """One optimiser step: craft the batch (eval mode), then the loss through ``module``
    (an :class:`ObjectiveModule`, possibly wrapped in DDP) in train mode."""
    bare = module.module if hasattr(module, "module") and isinstance(module.module, ObjectiveModule) else module
    inputs = objective.prepare(
        bare.model, x, y, generator, pretrain=pretrain, use_jacobian=use_jacobian, depth_generator=depth_generator
    )
    module.train()
    loss, stats = module(inputs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(bare.parameters(), grad_clip))
    optimizer.step()
    stats["loss"] = float(loss.detach())
    stats["depth"] = inputs.depth if inputs.depth is not None else bare.model.n_steps
    if inputs.attack_depths:
        stats["attack_depths"] = [d if d is not None else bare.model.n_steps for d in inputs.attack_depths]
    return stats
