"""Model registry: ``create_model(name, **overrides)`` (in the style of timm's presets)."""

from __future__ import annotations

from typing import Any, Dict, List

from .base import DEQModel
from .deq import SingleScaleDEQ
from .explicit import ExplicitResNet
from .lyadeq import LyaDEQ
from .mdeq import MDEQ

__all__ = [
    "DEQModel",
    "SingleScaleDEQ",
    "ExplicitResNet",
    "MDEQ",
    "LyaDEQ",
    "MODEL_PRESETS",
    "create_model",
    "list_models",
    "model_from_config",
]

#: the CPU configuration; the larger single-scale preset changes only its widths
_DEQ_TINY = dict(
    channels=48,
    stem_channels=32,
    downsample=2,
    expansion=1,
    num_groups=4,
    wnorm=False,
    solver="broyden",
    solver_kwargs={"m": 8},
    n_steps=8,
)

#: name -> (class, default constructor arguments, one-line description)
MODEL_PRESETS: Dict[str, tuple] = {
    "deq-tiny": (
        SingleScaleDEQ,
        _DEQ_TINY,
        "single-scale conv DEQ, 48x8x8 state, Broyden N=8: the CPU configuration",
    ),
    "deq-small": (
        SingleScaleDEQ,
        dict(_DEQ_TINY, channels=96, stem_channels=48, num_groups=8),
        "single-scale conv DEQ, 96x8x8 state, Broyden N=8: the larger CPU configuration",
    ),
    "resnet20": (
        ExplicitResNet,
        dict(widths=(16, 32, 64), blocks=3),
        "explicit ResNet-20 (He et al. 2016), 0.27M parameters, in the DEQ interface (N = 1)",
    ),
    "resnet-peer": (
        ExplicitResNet,
        dict(widths=(15, 30, 60), blocks=3),
        "explicit ResNet-20 at widths 15/30/60 (0.24M parameters): the peer of deq-small, +3.5% parameters",
    ),
    "mdeq-small": (
        MDEQ,
        dict(
            channels=(8, 16, 32, 64),
            head_channels=(4, 8, 16, 32),
            final_channels=200,
            expansion=5,
            num_groups=4,
            solver="broyden",
            solver_kwargs={"m": 8},
            n_steps=8,
        ),
        "multiscale MDEQ, 4 scales 8/16/32/64 channels (GPU)",
    ),
    "mdeq-large": (
        MDEQ,
        dict(
            channels=(32, 64, 128, 256),
            head_channels=(14, 28, 56, 112),
            final_channels=1680,
            expansion=5,
            num_groups=8,
            solver="broyden",
            solver_kwargs={"m": 8},
            n_steps=8,
        ),
        "paper 1's DEQ-Large: 4 scales 32/64/128/256, head 14/28/56/112, final 1680 (GPU)",
    ),
    "lyadeq-tiny": (
        LyaDEQ,
        dict(backbone="tiny", dim=64, hidden=128, solver="anderson", solver_kwargs={"m": 5}, n_steps=30),
        "LyaDEQ with a 3-layer conv feature extractor, Anderson m=5",
    ),
    "lyadeq-small": (
        LyaDEQ,
        dict(
            backbone="resnet20",
            backbone_widths=(14, 28, 56),
            dim=64,
            hidden=128,
            solver="anderson",
            solver_kwargs={"m": 5},
            n_steps=30,
        ),  # fmt: skip
        "LyaDEQ with ResNet-20 features at widths 14/28/56 (0.24M): deq-small's size class, Anderson m=5, N=30",
    ),
    "lyadeq-resnet20": (
        LyaDEQ,
        dict(backbone="resnet20", dim=64, hidden=128, solver="anderson", solver_kwargs={"m": 5}, n_steps=50),
        "paper 2's CIFAR LyaDEQ: ResNet-20 features -> 64-d DEQ, Anderson m=5, 50 iterations",
    ),
}


def list_models() -> List[str]:
    return sorted(MODEL_PRESETS)


def create_model(name: str, **overrides: Any) -> DEQModel:
    """Build a registered model; keyword overrides replace preset arguments."""
    try:
        cls, defaults, _ = MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    kwargs = {**defaults, **overrides}
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        raise TypeError(f"bad override for model {name!r}: {exc}") from None
    model.name = name
    model._config = {"name": name, **kwargs}
    return model


def model_from_config(config: Dict[str, Any]) -> DEQModel:
    """Rebuild a model from :meth:`DEQModel.config` output."""
    config = dict(config)
    return create_model(config.pop("name"), **config)
