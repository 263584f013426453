"""What makes a job reproducible and datable: seeds derived from its name, and its UTC date."""

from __future__ import annotations

import datetime
import zlib

__all__ = ["seed_of", "utc_now"]


def utc_now() -> str:
    """The current UTC time to the second, ISO 8601 (the date of a finished job or evaluation)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def seed_of(*parts) -> int:
    """A generator seed derived from names and numbers (each job and batch has its own)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF
