"""Old path, kept for one release: use :mod:`robustdeq.training.loss_terms` (and :mod:`robustdeq.dynamics`)."""

from ..dynamics import PhantomOutput, phantom_forward, unrolled_forward
from .loss_terms import draw_intermediate_step, jacobian_regularizer

__all__ = ["PhantomOutput", "phantom_forward", "unrolled_forward", "draw_intermediate_step", "jacobian_regularizer"]
