"""The jobs every evaluation starts with, before any family: clean accuracy along the dynamics
(paper 1 Fig. 2), the entropy gate's threshold chosen on validation, and each defense's clean
pass (paper 1 Algorithm 1), which seeds the per-sample best inputs the attacks then improve."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..attacks import margin
from ..stats import correct_string
from .best_input import BestInput
from .context import proportion

if TYPE_CHECKING:  # pragma: no cover
    from .context import EvaluationContext

__all__ = ["clean_accuracy", "choose_gate", "seed_best_inputs"]


def clean_accuracy(ctx: "EvaluationContext") -> dict:
    """Job ``clean``: accuracy and mean entropy at every state, margins and entropies per sample."""
    N, k = ctx.N, ctx.k
    per_state = torch.zeros(N, dtype=torch.long)
    entropies = torch.zeros(N)
    margins, h_final, h_k = [], [], []
    with ctx.bar(ctx.n, "clean") as bar:
        for chunk in ctx.chunks(ctx.all_images()):
            x, y = ctx.x[chunk].to(ctx.device), ctx.y[chunk].to(ctx.device)
            with torch.no_grad():
                traj = ctx.model.trajectory(x)
                logits = traj.all_logits(1)
                per_state += (logits.argmax(-1) == y.view(-1, 1)).sum(0).cpu()
                entropies += traj.entropies(1).sum(0).cpu()
                margins.append(margin(traj.logits(k), y).cpu())
                h_final.append(traj.entropy(-1).cpu())
                h_k.append(traj.entropy(k).cpu())
            bar.update(len(chunk))
    m = torch.cat(margins)
    correct_k = m <= 0
    out = {
        "state": k,
        "acc": proportion(correct_k),
        "correct": correct_string(correct_k.tolist()),
        "acc_per_state": (per_state.float() / ctx.n).tolist(),
        "mean_entropy_per_state": (entropies / ctx.n).tolist(),
        "entropy_final": torch.cat(h_final).tolist(),
        "entropy_readout": torch.cat(h_k).tolist(),
        "margin": m.tolist(),
        "defenses": {},
    }
    return out


def choose_gate(ctx: "EvaluationContext") -> dict:
    """Job ``gate``: the ``gate_quantile`` of clean validation entropy at the gate state."""
    val = ctx.validation_split()
    n = min(ctx.config.val_n, len(val))
    xv = val.images[:n].float().div(255.0)
    gate = ctx.gate_state()
    hs = []
    batch = ctx.config.batch_size
    with ctx.bar(n, "gate threshold (validation)") as bar:
        for i in range(0, n, batch):
            with torch.no_grad():
                hs.append(ctx.model.trajectory(xv[i : i + batch].to(ctx.device)).entropy(gate))
            bar.update(min(batch, n - i))
    h = torch.cat(hs).cpu()
    threshold = float(torch.quantile(h, ctx.config.gate_quantile))
    ctx.apply_threshold(threshold)
    return {
        "threshold": threshold,
        "gate_state": gate,
        "quantile": ctx.config.gate_quantile,
        "val_n": n,
        "split": "validation split of the checkpoint's training run",
    }


def seed_best_inputs(ctx: "EvaluationContext") -> None:
    """Initialise the per-setting bests from the clean inputs (and clean defended results)."""
    if "none" not in ctx.best:
        ctx.best["none"] = BestInput(ctx.x, torch.tensor(ctx.jobs["clean"]["margin"]))
    changed = False
    for d in ctx.defenses:
        if d.name in ctx.best:
            continue
        out, cost = ctx.timed_defense(d, ctx.x, f"clean, {d.name}")
        ctx.best[d.name] = BestInput(ctx.x, out[:, 0])
        ctx.jobs["clean"]["defenses"][d.name] = {
            "setting": d.to_dict(),
            "acc": proportion(out[:, 0] <= 0),
            "correct": correct_string((out[:, 0] <= 0).tolist()),
            "trigger_rate": float(out[:, 1].mean()),
            "mean_perturbation": float(out[:, 2].mean()),
            "cost_vs_plain": cost,
        }
        changed = True
    if changed:
        ctx.save()
