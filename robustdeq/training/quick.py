"""Old path, kept for one release: use :mod:`robustdeq.training.clean_training`."""

from .clean_training import train_clean

__all__ = ["train_clean"]
