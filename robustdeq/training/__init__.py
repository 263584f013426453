"""Training building blocks (paper 1 Sec. 3.3 and Appendix A): the phantom-gradient
forward, random intermediate states, Jacobian regularisation and adversarial steps."""

from .blocks import (
    PhantomOutput,
    draw_intermediate_step,
    jacobian_regularizer,
    phantom_forward,
)
from .quick import augment, train_clean
from .steps import AdversarialStepConfig, adversarial_training_step

__all__ = [
    "PhantomOutput",
    "draw_intermediate_step",
    "jacobian_regularizer",
    "phantom_forward",
    "AdversarialStepConfig",
    "adversarial_training_step",
    "augment",
    "train_clean",
]
