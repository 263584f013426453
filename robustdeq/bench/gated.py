"""The entropy-gated defense (docs/design.md §3): Algorithm 1 of paper 1 only for inputs whose
plain entropy at the gate state exceeds the robustness card's threshold.

Measured here: how often the gate triggers on clean test images and on ready-made PGD-10
inputs (the attack of ``robustdeq accuracy``, aimed at the model's own early-state
prediction), what the gated defense costs relative to plain inference on the same batch,
and, from the card, its adaptive robust accuracy against the ungated defense's.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..attacks import ready_made_pgd
from ..card import ADAPTIVE, find_setting, gate_from_card, gate_setting
from ..defense import DefenseSetting
from ..stats import wilson_interval
from .inference import defended_forward, plain_forward
from .timing import interleaved_medians

PGD = dict(eps=8 / 255, step_size=2 / 255, steps=10)
#: images per call when attacking and gating the whole pool
POOL_CHUNK = 64

__all__ = ["PGD", "card_gate", "card_robust_comparison", "pgd_inputs", "measure_gated"]


def card_gate(card: Optional[Dict[str, Any]]) -> Optional[DefenseSetting]:
    """The card's evaluated gated setting (threshold and gate state from ``card.gate_from_card``)."""
    gate = gate_from_card(card)
    if gate is None:
        return None
    row = gate_setting(card)
    return DefenseSetting(T_f=int(row["T_f"]), R=int(row["R"]), gated=True, threshold=gate["threshold"],
                          gate_state=gate["state"])  # fmt: skip


def card_robust_comparison(card: Dict[str, Any], gated: DefenseSetting) -> Optional[Dict[str, Any]]:
    """The card's adaptive robust accuracy of the gated setting and of the ungated one with the
    same (T_f, R); the card also lists non-adaptive (transferred) rows, which are skipped."""
    g = find_setting(card, gated.T_f, gated.R, gated=True, kind=ADAPTIVE)
    u = find_setting(card, gated.T_f, gated.R, gated=False, kind=ADAPTIVE)
    if g is None or u is None:
        return None

    points = 100 * (g["robust"]["acc"] - u["robust"]["acc"])
    return {"gated": _robust_summary(g), "ungated": _robust_summary(u), "points": points}


def _robust_summary(row: Dict[str, Any]) -> Dict[str, Any]:
    robust = row["robust"]
    keep = {"name": row["name"], "kind": row.get("robust_kind"), "cost_vs_plain": row.get("cost_vs_plain")}
    return {**keep, "acc": robust["acc"], "ci95": robust.get("ci95"), "n": robust.get("n")}


def pgd_inputs(model, x: Tensor, seed: int = 0) -> Tensor:
    """Ready-made PGD-10 (eps 8/255, step 2/255, phantom gradient of z[N], as ``robustdeq
    accuracy``) against the model's own early-state prediction: no labels needed."""
    y = plain_forward(model, x).argmax(1)
    return ready_made_pgd(model, x, y, generator=torch.Generator().manual_seed(seed), **PGD)


def _trigger(model, setting: DefenseSetting, x: Tensor) -> Dict[str, Any]:
    chunks = range(0, x.shape[0], POOL_CHUNK)
    ran = torch.cat([setting.run(model, x[i : i + POOL_CHUNK]).ran for i in chunks])
    k, n = int(ran.sum()), int(ran.numel())
    return {"triggered": k, "n": n, "trigger_rate": k / n, "ci95": list(wilson_interval(k, n))}


def _attack_pool(model, pool: Tensor, progress: bool) -> Tensor:
    from tqdm import tqdm

    starts = range(0, pool.shape[0], POOL_CHUNK)
    bar = tqdm(starts, desc="PGD-10 inputs for the gate", unit="batch", leave=False, disable=not progress)
    return torch.cat([pgd_inputs(model, pool[i : i + POOL_CHUNK], seed=i) for i in bar])


def _costs(model, gated: DefenseSetting, clean: Tensor, perturbed: Tensor, repeats: int) -> Dict[str, float]:
    """Seconds of plain, gated (clean / PGD) and ungated inference on one batch, interleaved."""
    ungated = DefenseSetting(T_f=gated.T_f, R=gated.R)
    fns = {
        "plain_s": lambda: plain_forward(model, clean),
        "gated_clean_s": lambda: defended_forward(model, clean, gated),
        "gated_pgd_s": lambda: defended_forward(model, perturbed, gated),
        "ungated_clean_s": lambda: defended_forward(model, clean, ungated),
    }
    times = interleaved_medians(fns, repeats)
    return {
        **times,
        "cost_clean_vs_plain": times["gated_clean_s"] / times["plain_s"],
        "cost_pgd_vs_plain": times["gated_pgd_s"] / times["plain_s"],
        "cost_ungated_vs_plain": times["ungated_clean_s"] / times["plain_s"],
    }


def measure_gated(
    model, card: Optional[Dict[str, Any]], pool: Tensor, batch_size: int, repeats: int, progress: bool = True
) -> Dict[str, Any]:
    """Trigger rates on ``pool`` clean and PGD-10-perturbed, and the costs relative to plain
    inference on its first ``batch_size`` images; ``{"skipped": why}`` without a gate."""
    gated = card_gate(card)
    if gated is None:
        why = "no robustness card" if card is None else "the robustness card has no gated setting with a threshold"
        return {"skipped": f"{why}, hence no evaluated gate"}
    x_adv = _attack_pool(model, pool, progress)
    linf = (x_adv - pool).flatten(1).abs().amax(1)
    card_row = find_setting(card, gated.T_f, gated.R, gated=True) or {}
    return {
        "setting": gated.to_dict(),
        "batch_size": batch_size,
        "attack": f"ready-made PGD-{PGD['steps']} (eps {PGD['eps']:.5f}, step {PGD['step_size']:.5f}, phantom "
        "gradient of z[N]) against the model's plain early-state prediction",
        "clean": _trigger(model, gated, pool),
        "pgd": {
            **_trigger(model, gated, x_adv),
            "eps": PGD["eps"],
            "perturbation_linf": {"min": float(linf.min()), "max": float(linf.max())},
        },
        "card_trigger_rate_clean": card_row.get("trigger_rate_clean"),
        "timing": _costs(model, gated, pool[:batch_size], x_adv[:batch_size], repeats),
        "card_robust": card_robust_comparison(card, gated),
    }
