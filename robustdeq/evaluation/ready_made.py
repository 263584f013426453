"""Accuracy along the dynamics, clean and under the ready-made PGD attack.

"Ready-made" PGD (paper 1 Sec. 4) follows the gradient the model offers: the phantom
gradient of the final state z[N]. The accuracy of every state z[1..N] is then read off
the same adversarial batch, which is how the early state is chosen on the validation
split (never on the test set, DESIGN.md §2).

Everything works on shards: with ``world_size > 1`` each process evaluates every
``world_size``-th image and the counts are summed with ``all_reduce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks import pgd_linf
from ..dynamics import phantom_forward

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import DEQModel

__all__ = [
    "ready_made_pgd",
    "StateAccuracy",
    "state_accuracies",
    "choose_early_state",
    "choose_readout_state",
    "READOUT_RULES",
    "checkpoint_accuracy",
]

#: how a training run chooses its readout state on the validation split (``validation.select``)
READOUT_RULES = ("robust", "clean", "final")


def ready_made_pgd(
    model: "DEQModel",
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """PGD on the cross-entropy of the final state through the phantom gradient (eval mode)."""

    def loss_fn(xa: Tensor) -> Tensor:
        return F.cross_entropy(phantom_forward(model, xa).logits, y, reduction="none")

    return pgd_linf(loss_fn, x, eps, step_size, steps, generator=generator)


@dataclass
class StateAccuracy:
    """Per-state correct counts for states z[1..N] (index 0 of the lists is z[1])."""

    clean_correct: List[int]
    clean_n: int
    robust_correct: List[int]
    robust_n: int

    def clean(self, k: int) -> float:
        return self.clean_correct[_pos(k, len(self.clean_correct))] / max(1, self.clean_n)

    def robust(self, k: int) -> float:
        return self.robust_correct[_pos(k, len(self.robust_correct))] / max(1, self.robust_n)

    def to_dict(self) -> Dict[str, object]:
        return {
            "clean_acc_per_state": [c / max(1, self.clean_n) for c in self.clean_correct],
            "robust_acc_per_state": [c / max(1, self.robust_n) for c in self.robust_correct],
            "clean_n": self.clean_n,
            "robust_n": self.robust_n,
        }


def _pos(k: int, n_states: int) -> int:
    """State index k (1..N, or negative as in Trajectory) -> list position."""
    if k < 0:
        k = n_states + 1 + k
    if not 1 <= k <= n_states:
        raise IndexError(f"state {k} outside z[1]..z[{n_states}]")
    return k - 1


def _correct_per_state(model: "DEQModel", x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        traj = model.trajectory(x)
        return (traj.all_logits(1).argmax(-1) == y.view(-1, 1)).sum(0)


def state_accuracies(
    model: "DEQModel",
    images: Tensor,
    labels: Tensor,
    n_clean: int,
    n_robust: int,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    pgd_steps: int = 10,
    batch_size: int = 250,
    device: Optional[torch.device] = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    desc: str = "validating",
) -> StateAccuracy:
    """Clean accuracy of every state on the first ``n_clean`` images and ready-made PGD
    accuracy of every state on the first ``n_robust`` (uint8 or float images in [0, 1])."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    N = model.n_steps
    clean = torch.zeros(N, dtype=torch.long, device=device)
    robust = torch.zeros(N, dtype=torch.long, device=device)
    n_clean, n_robust = min(n_clean, len(labels)), min(n_robust, len(labels))
    total = max(n_clean, n_robust)
    starts = range(rank * batch_size, total, batch_size * world_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(starts), desc=desc, unit="batch", leave=False)
    try:
        for start in starts:
            stop = min(start + batch_size, total)
            x = images[start:stop]
            x = (x.float().div(255.0) if x.dtype == torch.uint8 else x.float()).to(device)
            y = labels[start:stop].to(device)
            c = min(stop, n_clean) - start
            if c > 0:
                clean += _correct_per_state(model, x[:c], y[:c])
            r = min(stop, n_robust) - start
            if r > 0:
                g = torch.Generator().manual_seed(seed * 1_000_003 + start)
                x_adv = ready_made_pgd(model, x[:r], y[:r], eps, step_size, pgd_steps, generator=g)
                robust += _correct_per_state(model, x_adv, y[:r])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(clean)
        dist.all_reduce(robust)
    return StateAccuracy(clean.tolist(), n_clean, robust.tolist(), n_robust)


def choose_early_state(acc: StateAccuracy) -> int:
    """The state with the highest ready-made PGD accuracy (paper 1 Sec. 4); ties go to the
    later state, whose clean accuracy is usually higher. Returns k in 1..N."""
    best = max(acc.robust_correct)
    candidates = [i + 1 for i, c in enumerate(acc.robust_correct) if c == best]
    return max(candidates, key=lambda k: (acc.clean_correct[k - 1], k))


def choose_readout_state(acc: StateAccuracy, rule: str = "robust") -> int:
    """The readout state by ``rule``: ``robust`` is :func:`choose_early_state`; ``clean`` the
    highest clean accuracy (ties to the later state); ``final`` z[N]. A plain-trained model has
    next to no PGD accuracy anywhere, so ``robust`` would pick a state by noise: its recipes use
    ``final``, the fixed point that paper 2 reads and attacks."""
    if rule == "robust":
        return choose_early_state(acc)
    if rule == "clean":
        return max(range(1, len(acc.clean_correct) + 1), key=lambda k: (acc.clean_correct[k - 1], k))
    if rule == "final":
        return len(acc.clean_correct)
    raise ValueError(f"unknown readout rule {rule!r}; choose from {', '.join(READOUT_RULES)}")


def checkpoint_accuracy(
    checkpoint: str,
    split: str = "test",
    n: Optional[int] = None,
    pgd_steps: int = 10,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    batch_size: int = 250,
    data: Optional[str] = None,
    device: Optional[str] = None,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, object]:
    """Clean and ready-made PGD accuracy of a checkpoint at its chosen early state and at
    z[N], on the test split (or the checkpoint's own validation split with ``split='val'``).

    This is the quick, non-adaptive number recorded with every shipped checkpoint; the
    adaptive evaluation lives in ``robustdeq evaluate``.
    """
    from ..checkpoint import load_checkpoint
    from ..data import load_cifar10, train_val_split

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    model = ckpt.build_model(dev)
    if split == "val":
        full = load_cifar10("train", data, progress=progress)
        ckpt.check_dataset(full.fingerprint)
        _, data_split, _ = train_val_split(full, int(ckpt.data["val_size"]), int(ckpt.data["split_seed"]))
    elif split == "test":
        data_split = load_cifar10("test", data, progress=progress)
        # a seeded shuffle: the archive stores the test images grouped by class
        order = torch.randperm(len(data_split), generator=torch.Generator().manual_seed(seed))
        data_split = data_split.subset(order)
    else:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    n = len(data_split) if n is None else min(int(n), len(data_split))
    acc = state_accuracies(
        model,
        data_split.images,
        data_split.labels,
        n,
        n if pgd_steps > 0 else 0,
        eps=eps,
        step_size=step_size,
        pgd_steps=pgd_steps,
        batch_size=batch_size,
        device=dev,
        seed=seed,
        progress=progress,
        desc=f"{split} accuracy",
    )
    k = model.readout_index()
    return {
        "checkpoint": str(checkpoint),
        "model": ckpt.model_name,
        "split": split,
        "n": n,
        "state": k,
        "clean_acc": acc.clean(k),
        "pgd_acc": acc.robust(k) if pgd_steps > 0 else None,
        "clean_acc_final": acc.clean(-1),
        "pgd_acc_final": acc.robust(-1) if pgd_steps > 0 else None,
        "attack": f"ready-made PGD-{pgd_steps} (phantom gradient of z[N]), eps {eps:.5f}, step {step_size:.5f}",
        **acc.to_dict(),
    }
