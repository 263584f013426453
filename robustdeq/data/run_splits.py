"""The splits of a training run, rebuilt from what its checkpoint recorded: the test split,
and the validation split its readout state was chosen on (never the test set, docs/design.md §4).
CIFAR-10 and your own image folders alike, so that evaluation, ``robustdeq accuracy`` and
training read the same images."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from . import load_cifar10, train_val_split

__all__ = ["IMAGEFOLDER", "image_folder_train_val", "split_of_run"]

IMAGEFOLDER = "imagefolder"


def image_folder_train_val(data, val_fraction: float, seed: int) -> Tuple[Any, Any]:
    """(train, val) of an indexed folder: its ``val/`` split, or a stratified ``val_fraction``
    of the training split carved by ``seed`` when it has none."""
    train = data.splits["train"]
    if "val" in data.splits:
        return train, data.splits["val"]
    n_val = max(1, round(val_fraction * len(train)))
    train, val, _ = train_val_split(train, n_val, seed)
    return train, val


def _folder_of_run(record: Dict[str, Any], root: Optional[str], progress: bool):
    from .image_folder import load_image_folder

    return load_image_folder(
        root or record["root"],
        int(record["input_size"]),
        float(record.get("val_fraction", 0.1)),
        float(record.get("test_fraction", 0.1)),
        int(record.get("split_seed", 0)),
        progress=progress,
    )


def split_of_run(record: Dict[str, Any], split: str, data: Optional[str] = None, progress: bool = True):
    """The ``split`` ('test' or 'val') of the run whose checkpoint recorded ``record``.

    ``data`` overrides where the images are (a CIFAR-10 source, or the image folder's root when
    it moved); the training split's fingerprint must still match the record."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    if record.get("dataset") == IMAGEFOLDER:
        folder = _folder_of_run(record, data, progress)
        recorded = record.get("train_fingerprint")
        if recorded and folder.index.fingerprints["train"] != recorded:
            raise ValueError(
                f"the images under {folder.index.root} are not the ones this model was trained on "
                f"(training split fingerprint {folder.index.fingerprints['train']}, recorded {recorded})"
            )
        if split == "test":
            if "test" not in folder.splits:
                raise ValueError(f"{folder.index.root} has no test split: add a test/ folder of class folders")
            return folder.splits["test"]
        return image_folder_train_val(folder, float(record.get("val_fraction", 0.1)), int(record["split_seed"]))[1]
    if split == "test":
        return load_cifar10("test", data, progress=progress)
    full = load_cifar10("train", data, progress=progress)
    recorded = record.get("train_fingerprint")
    if recorded and recorded != full.fingerprint:
        raise ValueError(f"training data fingerprint {full.fingerprint} differs from the recorded {recorded}")
    return train_val_split(full, int(record["val_size"]), int(record["split_seed"]))[1]


def materialised(split, idx: torch.Tensor):
    """``split`` restricted to ``idx`` with its pixels in memory (a streaming split decodes them)."""
    sub = split.subset(idx)
    return sub.materialise() if hasattr(sub, "materialise") else sub
