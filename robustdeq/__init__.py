"""RobustDEQ: robust deep equilibrium classifiers, their neural dynamics, and their defenses."""

__version__ = "0.1.0"

from .dynamics import DEFAULT_READOUT, Trajectory, prediction_entropy, run_dynamics  # noqa: E402
from .models import create_model, list_models  # noqa: E402

__all__ = [
    "__version__",
    "DEFAULT_READOUT",
    "Trajectory",
    "prediction_entropy",
    "run_dynamics",
    "create_model",
    "list_models",
]
