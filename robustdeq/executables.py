"""Finding this environment's console scripts (torchserve, torch-model-archiver, locust...)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

__all__ = ["find_executable"]


def find_executable(name: str, install_hint: str) -> str:
    """A console script of this environment (beside the interpreter), else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed ({install_hint})")
    return found
