"""Training (paper 1 Sec. 3.3 and Appendix A, paper 2 Sec. 5): objectives, configs and the
trainer behind ``robustdeq train``."""

from ..dynamics import PhantomOutput, phantom_forward, unrolled_forward
from .clean_training import train_clean
from .config import TrainConfig, load_config
from .loss_terms import draw_intermediate_step, jacobian_regularizer
from .objectives import Objective, ObjectiveModule, StepInputs, trades_kl, training_step

__all__ = [
    "PhantomOutput",
    "phantom_forward",
    "unrolled_forward",
    "draw_intermediate_step",
    "jacobian_regularizer",
    "TrainConfig",
    "load_config",
    "Objective",
    "ObjectiveModule",
    "StepInputs",
    "trades_kl",
    "training_step",
    "train_clean",
]
