"""RobustDEQ: robust deep equilibrium classifiers, their neural dynamics, and their defenses.

The public names are imported on first use (PEP 562), so ``import robustdeq.serving.health``
(a container health check) does not pay for importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "DEFAULT_READOUT": ".dynamics",
    "Trajectory": ".dynamics",
    "prediction_entropy": ".dynamics",
    "run_dynamics": ".dynamics",
    "create_model": ".models",
    "list_models": ".models",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'robustdeq' has no attribute {name!r}")
