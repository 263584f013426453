"""Attacks that see the test-time defense (docs/design.md §6; Croce et al. 2022's guidelines).

Algorithm 1 changes the input while the solver runs, so an attacker who differentiates
only the undefended model is not adaptive. Every attack here differentiates a stand-in
for the defended pipeline and reads its prediction from the real one (straight-through):

* BPDA: the defended input x' = D(x) is treated as the identity in the backward pass;
* full unroll: the R sign steps of every intervention are replayed with a smooth
  surrogate for sign() and differentiated to second order (with z held fixed, exactly
  as the defense holds it, paper 1 Eq. 8);
* Square (black box) queries the whole defended pipeline;
* against the entropy gate: flip the label while keeping the gate's entropy under its
  threshold, so that the defense never runs.

In all of them the loss is read through paper 1's Eq. 11 surrogate at the strongest
(i, K_a, lambda) found on the undefended model, started from the DEFENDED state z[i].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks import IntermediateAttack, intermediate_state_logits, straight_through
from ..defense import DefenseSetting, entropy_descent, per_sample
from ..dynamics import damped_steps, prediction_entropy

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import DEQModel

# The full unroll keeps a second-order graph of all N / T_f * R entropy steps alive (about
# 100 MB per image for deq-tiny at T_f = 2, R = 10), so it runs in batches of this size.
UNROLL_BATCH = 25
# Square through the defended pipeline costs minutes of CPU per image (its 1,000 queries each run
# Algorithm 1), so it runs in batches this small: a long run that stops resumes at the next batch.
DEFENDED_SQUARE_BATCH = 10

__all__ = [
    "UNROLL_BATCH",
    "soft_sign",
    "readout_logits",
    "surrogate_logits",
    "defended_logits",
    "defended_surrogate_logits",
    "gate_aware_loss",
]


def soft_sign(temperature: float = 1.0) -> Callable[[Tensor], Tensor]:
    """tanh(g / (temperature * mean|g|)) per sample: a smooth, scale-free stand-in for sign(g)."""

    def fn(g: Tensor) -> Tensor:
        scale = g.detach().abs().flatten(1).mean(1).clamp_min(1e-20) * temperature
        return torch.tanh(g / scale.view((-1,) + (1,) * (g.dim() - 1)))

    return fn


def readout_logits(model: "DEQModel", x: Tensor) -> Tensor:
    """The undefended model's prediction at its early state (no gradient)."""
    with torch.no_grad():
        return model(x)


def surrogate_logits(model: "DEQModel", x: Tensor, attack: IntermediateAttack) -> Tensor:
    """Real readout logits forward, Eq. 11 gradient backward (what APGD and PGD attack)."""
    return straight_through(readout_logits(model, x), attack.logits(model, x))


def defended_logits(model: "DEQModel", x: Tensor, setting: DefenseSetting) -> Tensor:
    """The defended pipeline's prediction at the model's early state (no gradient to x)."""
    if setting.is_plain:
        return readout_logits(model, x)
    with torch.no_grad():
        return setting.run(model, x.detach()).trajectory.logits(model.readout_index())


def defended_surrogate_logits(
    model: "DEQModel",
    x: Tensor,
    setting: DefenseSetting,
    attack: IntermediateAttack,
    mode: str = "unroll",
    temperature: float = 1.0,
) -> Tuple[Tensor, Tensor]:
    """(defended readout logits, differentiable surrogate logits) for one batch.

    ``mode='bpda'`` passes the gradient straight through the input purification;
    ``mode='unroll'`` replays it with ``soft_sign`` steps. Either way the surrogate is the
    Eq. 11 unroll from the defended trajectory's state z[i] under the final input.
    Combine the two with :func:`straight_through` for attacks that need one tensor.
    """
    if mode not in ("bpda", "unroll"):
        raise ValueError(f"mode must be 'bpda' or 'unroll', got {mode!r}")
    if setting.is_plain:
        return readout_logits(model, x), attack.logits(model, x)
    with torch.no_grad():
        result = setting.run(model, x.detach(), record=mode == "unroll")
    value = result.trajectory.logits(model.readout_index())
    if mode == "bpda":
        x_eff = straight_through(result.x_defended, x)
    else:
        B, sign = x.shape[0], soft_sign(temperature)
        R = per_sample(setting.R, B, torch.long, x.device, "R")
        beta = per_sample(setting.beta, B, x.dtype, x.device, "beta")
        eps = per_sample(setting.eps, B, x.dtype, x.device, "eps")
        x_eff = x
        for idx, z, _ in result.interventions or []:
            x_sub = entropy_descent(model, z, x_eff[idx], x[idx], R[idx], beta[idx], eps[idx], soft_sign=sign)
            x_eff = x_eff.index_copy(0, idx, x_sub)
    u = model.inject(x_eff)
    z_i = result.trajectory.states[attack.state].detach()
    return value, model.head(damped_steps(model, z_i, u, attack.unroll, attack.lam), u)


def gate_aware_loss(
    model: "DEQModel",
    x: Tensor,
    y: Tensor,
    setting: DefenseSetting,
    attack: IntermediateAttack,
    weight: float = 10.0,
    slack: float = 0.05,
) -> Tensor:
    """Per-sample loss for an attacker who wants the gate to stay shut: Eq. 11 cross-entropy
    minus ``weight`` * relu(H_gate - threshold + slack), with H_gate the entropy of
    h(f(z[g]; x)) at the gate state g (the quantity the defense itself descends)."""
    if not setting.gated or setting.threshold is None:
        raise ValueError("the gate-aware attack needs a gated setting with a chosen threshold")
    ce = F.cross_entropy(attack.logits(model, x), y, reduction="none")
    g = model.readout_index() if setting.gate_state is None else setting.gate_state % (model.n_steps + 1)
    h_gate = prediction_entropy(intermediate_state_logits(model, x, g, 1, 1.0))
    return ce - weight * F.relu(h_gate - setting.threshold + slack)
