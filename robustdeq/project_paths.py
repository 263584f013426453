"""Where the project's own files are: the checkout (``serving/``, ``handlers/``, ``model_store/``
...), or ``$ROBUSTDEQ_HOME`` when the library is installed as a wheel (the Docker image puts
those folders in ``/opt/robustdeq``). Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PROJECT_ROOT", "MODEL_STORE"]

PROJECT_ROOT = Path(os.environ.get("ROBUSTDEQ_HOME") or Path(__file__).resolve().parent.parent)
#: the shipped archives (``make archives``), one plain and one ``-defended`` .mar per model
MODEL_STORE = PROJECT_ROOT / "model_store"
