"""What ``robustdeq bench`` measures: a model (a checkpoint with its robustness card, or a
random-init registered model), and a pool of real CIFAR-10 test images to batch from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..card import card_for_checkpoint, load_card

__all__ = ["Subject", "default_checkpoint", "load_subject", "cifar_test_images"]


def default_checkpoint() -> Path:
    """The checkpoint of the default served model (the first one ``make serve`` serves), independent of the cwd."""
    from ..serving.archive import SHIPPED
    from ..serving.server import DEFAULT_MODELS

    return SHIPPED[DEFAULT_MODELS[0]]


@dataclass
class Subject:
    model: Any  # a DEQModel in eval mode
    name: str  # registry name
    origin: str  # where the weights come from, for the report
    checkpoint: Optional[Path]
    card: Optional[Dict[str, Any]]
    card_note: str  # which card, or why there is none
    images: Tensor  # [M, 3, 32, 32] in [0, 1], a seeded random draw of the test split
    data_note: str  # where the images come from (or that they are random noise)

    def batch(self, size: int) -> Tensor:
        return self.images[:size]


def cifar_test_images(n: int, source: Optional[str], seed: int = 0) -> Tuple[Tensor, str]:
    """``n`` CIFAR-10 test images drawn by a seeded permutation (the archive is grouped by
    class), or uniform noise with a note saying so when no data is found and none was named."""
    from ..data import load_cifar10

    try:
        test = load_cifar10("test", source=source, progress=False)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        if source is not None:
            raise
        noise = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        return noise, f"RANDOM NOISE (no CIFAR-10 test split found: {str(exc).splitlines()[0]})"
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]
    return test.float_images(idx), f"CIFAR-10 test images ({test.source}), seeded random draw (seed {seed})"


def _load_card(checkpoint: Path, card: Optional[str]) -> Tuple[Optional[Dict[str, Any]], str]:
    path = card_for_checkpoint(checkpoint, card)
    if path is None:
        return None, f"no robustness card beside {checkpoint}"
    return load_card(path), str(path)


def load_subject(
    checkpoint: Optional[str], model_name: Optional[str], card: Optional[str], n_images: int, data: Optional[str]
) -> Subject:
    """A checkpoint (default: :func:`default_checkpoint`) or, with ``model_name``, a random-init model."""
    images, data_note = cifar_test_images(n_images, data)
    if model_name is not None:
        from ..models import create_model

        torch.manual_seed(0)
        model = create_model(model_name).eval()
        return Subject(model, model_name, f"random init (--model {model_name})", None, None,
                       "random-init model: no robustness card", images, data_note)  # fmt: skip
    from ..checkpoint import load_checkpoint

    path = Path(checkpoint) if checkpoint else default_checkpoint()
    ckpt = load_checkpoint(path)
    card_dict, card_note = _load_card(path, card)
    return Subject(ckpt.build_model(), ckpt.model_name, f"checkpoint {path}", path, card_dict, card_note,
                   images, data_note)  # fmt: skip
