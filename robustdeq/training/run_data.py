"""The data a training run reads: CIFAR-10 with its validation split carved from the training
set, or your own image folder (``data.source = imagefolder``) with its own or a carved one;
the record of both that checkpoints keep; and what the model must know of an image folder."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from ..data import Split, load_cifar10, train_val_split
from ..data.run_splits import IMAGEFOLDER
from .config import TrainConfig

__all__ = ["training_data", "model_overrides_for"]


def training_data(cfg: TrainConfig, progress: bool) -> Tuple[Split, Split, Dict[str, Any]]:
    """The training images, the held-out validation split, and the record of both that
    checkpoints keep (model selection never looks at the test set). CIFAR-10 carves the
    validation split from its training set; an image folder brings its own or has one carved."""
    if cfg.data.source == IMAGEFOLDER:
        return _image_folder_data(cfg, progress)
    full = load_cifar10("train", cfg.data.source, progress=progress)
    train, val, _ = train_val_split(full, cfg.data.val_size, cfg.data.split_seed)
    if cfg.data.train_subset is not None:
        keep = torch.arange(min(cfg.data.train_subset, len(train)))
        train = train.subset(keep, f"{train.source}[:{len(keep)}]")
    record = {
        "dataset": "cifar10",
        "source": full.source,
        "train_fingerprint": full.fingerprint,
        "val_size": cfg.data.val_size,
        "split_seed": cfg.data.split_seed,
        "val_fingerprint": val.fingerprint,
    }
    return train, val, record


def _image_folder_data(cfg: TrainConfig, progress: bool):
    """:func:`training_data` for ``data.source = imagefolder`` (robustdeq/data/image_folder.py)."""
    from ..data.image_folder import load_image_folder
    from ..data.run_splits import image_folder_train_val, materialised

    d = cfg.data
    data = load_image_folder(
        d.root, d.input_size, d.val_fraction, d.test_fraction, d.split_seed, d.on_bad_file, d.in_memory_mb,
        d.workers, progress,
    )  # fmt: skip
    train, val = image_folder_train_val(data, d.val_fraction, d.split_seed)
    val_n = max(cfg.validation.n_clean, cfg.validation.n_robust, cfg.validation.selection_n)
    val = materialised(val, torch.arange(min(val_n, len(val))))  # validation reads its images at once
    if d.train_subset is not None:
        train = train.subset(torch.arange(min(d.train_subset, len(train))))
    record = {
        **data.record(),
        "mean": list(d.mean) if d.mean else list(data.index.mean),
        "std": list(d.std) if d.std else list(data.index.std),
        "train_fingerprint": data.index.fingerprints["train"],
        "split_seed": d.split_seed,
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "val_fingerprint": val.fingerprint,
        "bad_file_paths": [b["path"] for b in data.index.bad_files],
    }
    return train, val, record


def model_overrides_for(record: Dict[str, Any]) -> Dict[str, Any]:
    """What a model must know of its data beyond CIFAR-10: classes, input size, statistics."""
    if record.get("dataset") != IMAGEFOLDER:
        return {}
    return {
        "num_classes": len(record["classes"]),
        "class_names": list(record["classes"]),
        "input_size": int(record["input_size"]),
        "mean": list(record["mean"]),
        "std": list(record["std"]),
    }
