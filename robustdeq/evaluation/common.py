"""Old path, kept for one release: the pieces live in :mod:`.best_input`, :mod:`.measures`
and :mod:`.job_ids`."""

from .best_input import BestInput
from .job_ids import seed_of, utc_now
from .measures import median_ratio, per_sample_ce, relative_deviation

__all__ = ["BestInput", "seed_of", "utc_now", "per_sample_ce", "relative_deviation", "median_ratio"]
