"""Old path, kept for one release: :mod:`robustdeq.allocator` and :mod:`robustdeq.executables`."""

from .allocator import tune_cpu_allocator
from .executables import find_executable

__all__ = ["tune_cpu_allocator", "find_executable"]
