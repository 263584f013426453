"""Training throughput of vanilla adversarial training vs. training on random intermediate
states (paper 1 Table 9: 30.2 -> 39.9 samples/s for PGD-AT, 24.0 -> 30.6 for TRADES on a GPU).

The variants are timed in interleaved rounds inside one process, so machine noise hits
them alike; throughput is total samples over total time (the cost a run actually sees,
averaged over the depth draws of Sec. 3.3).
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..models import create_model
from .config import AttackSection, ObjectiveSection
from .objectives import Objective, ObjectiveModule, training_step

#: (label, objective kind, random depth, Jacobian weight) as in paper 1 Appendix A
VARIANTS: Tuple[Tuple[str, str, bool, float], ...] = (
    ("PGD-AT", "pgd_at", False, 2.0),
    ("PGD-AT + Sec. 3.3", "pgd_at", True, 2.0),
    ("TRADES", "trades", False, 0.4),
    ("TRADES + Sec. 3.3", "trades", True, 0.4),
)


def measure_training_throughput(
    model_name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    rounds: int = 8,
    variants: Sequence[Tuple[str, str, bool, float]] = VARIANTS,
    attack_steps: int = 10,
    progress: bool = True,
) -> List[Dict[str, object]]:
    """Samples/s of one optimiser step (attack + update) per variant on batch ``x``."""
    setups = []
    for label, kind, random_depth, jac in variants:
        torch.manual_seed(0)
        model = create_model(model_name).to(x.device)
        section = ObjectiveSection(kind=kind, random_depth=random_depth, jacobian_weight=jac)
        objective = Objective(section, AttackSection(steps=attack_steps))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        setups.append((label, kind, random_depth, ObjectiveModule(model, objective), objective, optimizer))
    times: Dict[str, List[float]] = {s[0]: [] for s in setups}
    depths: Dict[str, List[int]] = {s[0]: [] for s in setups}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(rounds + 1) * len(setups), desc="training-step throughput", unit="step")
    for r in range(rounds + 1):  # round 0 warms up
        for label, _, _, module, objective, optimizer in setups:
            g = torch.Generator().manual_seed(r)
            t0 = time.perf_counter()
            stats = training_step(module, objective, optimizer, x, y, g)
            if x.is_cuda:
                torch.cuda.synchronize()
            if r > 0:
                times[label].append(time.perf_counter() - t0)
                depths[label].append(int(stats["depth"]))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    out = []
    for label, kind, random_depth, *_ in setups:
        total = sum(times[label])
        out.append(
            {
                "variant": label,
                "objective": kind,
                "random_depth": random_depth,
                "samples_per_s": len(times[label]) * x.shape[0] / total,
                "mean_step_s": total / len(times[label]),
                "mean_depth": sum(depths[label]) / len(depths[label]),
            }
        )
    return out


def speedups(rows: List[Dict[str, object]]) -> Dict[str, Optional[float]]:
    """Sec. 3.3 speed-up per objective, within this run."""
    by = {(r["objective"], r["random_depth"]): r["samples_per_s"] for r in rows}
    return {
        kind: (by[(kind, True)] / by[(kind, False)]) if (kind, True) in by and (kind, False) in by else None
        for kind in ("pgd_at", "trades")
    }
