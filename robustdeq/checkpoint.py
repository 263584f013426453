"""Checkpoint files: one format for training, evaluation and serving.

A checkpoint is a plain dictionary of tensors, strings, numbers, lists and dicts, so it
loads with ``torch.load(weights_only=True)`` (no pickled Python objects, no code runs
on load). It carries everything a consumer needs to rebuild and trust the model:

* ``model``: registry name and constructor config (with the chosen readout state);
* ``state_dict``: the weights;
* ``recipe``: the full training configuration;
* ``val_metrics``: validation accuracies at the end of training;
* ``early_state``: the chosen early-state index and the per-state PGD-10 accuracies it
  was chosen from (paper 1 Sec. 4, on the validation split);
* ``data``: dataset fingerprint, source and how the validation split was carved;
* ``library_version`` and the file ``format`` / ``format_version``.

Resume files (``last.pt``) add a ``training_state`` entry (optimizer, position).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from . import __version__

FORMAT = "robustdeq.checkpoint"
FORMAT_VERSION = 1

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "file_sha256",
    "load_checkpoint",
    "save_checkpoint",
]


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, unsafe or does not match what was asked for."""


@dataclass
class Checkpoint:
    model_name: str
    model_config: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    recipe: Dict[str, Any] = field(default_factory=dict)
    val_metrics: Dict[str, Any] = field(default_factory=dict)
    early_state: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)
    library_version: str = __version__
    training_state: Optional[Dict[str, Any]] = None
    path: Optional[str] = None

    @property
    def early_state_index(self) -> Optional[int]:
        idx = self.early_state.get("index")
        return None if idx is None else int(idx)

    def build_model(self, device: Union[str, torch.device] = "cpu", eval_mode: bool = True):
        """Rebuild the registered model and load the weights (strict: every tensor must match)."""
        from .models import model_from_config

        try:
            model = model_from_config(self.model_config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self._where()}: cannot rebuild model {self.model_name!r}: {exc}") from None
        expected = model.state_dict()
        missing = [k for k in expected if k not in self.state_dict]
        unexpected = [k for k in self.state_dict if k not in expected]
        shape_errors = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in self.state_dict.items()
            if k in expected and expected[k].shape != v.shape
        ]
        if missing or unexpected or shape_errors:
            parts = []
            if missing:
                parts.append(f"missing {_preview(missing)}")
            if unexpected:
                parts.append(f"unexpected {_preview(unexpected)}")
            if shape_errors:
                parts.append(f"shape mismatch {_preview(shape_errors)}")
            raise CheckpointError(
                f"{self._where()}: weights do not match model {self.model_name!r}: " + "; ".join(parts)
            )
        model.load_state_dict(self.state_dict)
        model.to(device)
        return model.eval() if eval_mode else model

    def check_dataset(self, fingerprint: str, what: str = "training data") -> None:
        """Raise if the checkpoint was trained on different data than ``fingerprint``."""
        recorded = self.data.get("train_fingerprint")
        if recorded and recorded != fingerprint:
            raise CheckpointError(
                f"{self._where()}: {what} fingerprint {fingerprint} differs from the one the checkpoint "
                f"was trained on ({recorded})"
            )

    def to_dict(self) -> Dict[str, Any]:
        blob = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "model": {"name": self.model_name, "config": self.model_config},
            "state_dict": self.state_dict,
            "recipe": self.recipe,
            "val_metrics": self.val_metrics,
            "early_state": self.early_state,
            "data": self.data,
        }
        if self.training_state is not None:
            blob["training_state"] = self.training_state
        return blob

    def _where(self) -> str:
        return f"checkpoint {self.path}" if self.path else "checkpoint"


def _preview(items, limit: int = 4) -> str:
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(map(str, items[:limit])) + more


def file_sha256(path: Union[str, Path]) -> str:
    """Hex sha256 of a file (robustness cards and archives name their checkpoint by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(checkpoint: Checkpoint, path: Union[str, Path]) -> Path:
    """Write atomically (temporary file + rename) so an interrupted save never leaves a
    truncated checkpoint behind; verify that it loads with ``weights_only=True``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(checkpoint.to_dict(), tmp)
    try:
        torch.load(tmp, map_location="cpu", weights_only=True)
    except Exception as exc:  # a bug in what we save, not user error
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"refusing to write {path}: it would not load with weights_only=True ({exc})") from exc
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: Union[str, Path],
    map_location: Union[str, torch.device] = "cpu",
    expect_model: Optional[str] = None,
) -> Checkpoint:
    """Load a checkpoint safely (``weights_only=True``) with clear errors for files that are
    missing, truncated or corrupt, unsafe (pickled objects), of another format, or of
    another model than ``expect_model``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not load with weights_only=True (it contains pickled Python objects); "
            f"refusing to load it: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {str(exc).splitlines()[0]}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a RobustDEQ checkpoint (expected format {FORMAT!r}; a bare state_dict or another "
            "project's file cannot be served without its model config)"
        )
    version = blob.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this library (robustdeq {__version__}) "
            f"reads versions <= {FORMAT_VERSION}"
        )
    try:
        model = blob["model"]
        ckpt = Checkpoint(
            model_name=str(model["name"]),
            model_config=dict(model["config"]),
            state_dict=dict(blob["state_dict"]),
            recipe=dict(blob.get("recipe") or {}),
            val_metrics=dict(blob.get("val_metrics") or {}),
            early_state=dict(blob.get("early_state") or {}),
            data=dict(blob.get("data") or {}),
            library_version=str(blob.get("library_version", "unknown")),
            training_state=blob.get("training_state"),
            path=str(path),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing or malformed entry {exc}") from None
    if expect_model is not None and ckpt.model_name != expect_model:
        raise CheckpointError(f"checkpoint {path} holds model {ckpt.model_name!r}, not {expect_model!r}")
    return ckpt
