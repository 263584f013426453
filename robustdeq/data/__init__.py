"""CIFAR-10 from three sources, all returned as uint8 tensors [N, 3, 32, 32] + int64 labels.

* the JPEG archive of ``../shared/data`` (``train/<class>/NNNN.jpg``, ``test/...``),
  decoded once into a cached tensor file (it never decodes 60,000 JPEGs twice);
* a ``cifar-10-batches-py`` folder (the official pickled batches);
* torchvision's ``CIFAR10`` with ``download=True`` for users with internet.

Pixels in the JPEG copy differ slightly from the original binaries (quality 75):
accuracies measured on it are close to, not identical with, figures on the original data.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..project_paths import PROJECT_ROOT  # its home; other modules still import it from here

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"

__all__ = [
    "CLASSES",
    "Split",
    "load_cifar10",
    "default_archive",
    "cache_dir",
    "fingerprint",
    "augment",
    "train_val_split",
    "epoch_batches",
    "batches_per_epoch",
]


@dataclass
class Split:
    images: Tensor  # uint8 [N, 3, 32, 32]
    labels: Tensor  # int64 [N]
    source: str
    fingerprint: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def float_images(self, idx=None) -> Tensor:
        """Images in [0, 1] as float32 (the models normalise internally)."""
        imgs = self.images if idx is None else self.images[idx]
        return imgs.float().div_(255.0)

    def subset(self, idx: Tensor, source: Optional[str] = None) -> "Split":
        images, labels = self.images[idx], self.labels[idx]
        return Split(images, labels, source or self.source, fingerprint(images, labels))


def cache_dir() -> Path:
    """``$ROBUSTDEQ_CACHE`` or ``~/.cache/robustdeq``."""
    path = Path(os.environ.get("ROBUSTDEQ_CACHE", Path.home() / ".cache" / "robustdeq"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_archive() -> Optional[Path]:
    """``$ROBUSTDEQ_DATA`` (a file or a folder holding the archive), else ``../shared/data``."""
    candidates = []
    env = os.environ.get("ROBUSTDEQ_DATA")
    if env:
        p = Path(env)
        candidates.append(p / ARCHIVE_NAME if p.is_dir() else p)
    candidates.append(PROJECT_ROOT.parent / "shared" / "data" / ARCHIVE_NAME)
    for c in candidates:
        if c.is_file():
            return c
    return None


def fingerprint(images: Tensor, labels: Tensor) -> str:
    """A short sha256 of the exact pixels and labels (recorded in checkpoints)."""
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process."""
    st = path.stat()
    return _digest_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode_archive(path: Path, split: str, progress: bool) -> Tuple[Tensor, Tensor]:
    from PIL import Image

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    images, labels = [], []
    with tarfile.open(path, "r:gz") as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.isfile() and m.name.startswith(f"{split}/") and m.name.lower().endswith((".jpg", ".jpeg", ".png"))
        ]
        if not members:
            raise ValueError(f"{path} holds no '{split}/<class>/*.jpg' images")
        members.sort(key=lambda m: m.name)
        it = tqdm(members, desc=f"decoding CIFAR-10 {split}", unit="img", disable=not progress) if tqdm else members
        for m in it:
            cls = m.name.split("/")[1]
            if cls not in CLASSES:
                raise ValueError(f"unexpected class folder {cls!r} in {path}")
            data = tar.extractfile(m).read()
            with Image.open(io.BytesIO(data)) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
            if arr.shape != (32, 32, 3):
                raise ValueError(f"{m.name}: expected a 32x32 RGB image, got {arr.shape}")
            images.append(arr)
            labels.append(CLASSES.index(cls))
    imgs = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return imgs, torch.tensor(labels, dtype=torch.int64)


def _load_batches_py(folder: Path, split: str) -> Tuple[Tensor, Tensor]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry.get("labels", entry.get("fine_labels")))
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def load_cifar10(
    split: str = "test", source: Optional[str] = None, root: Optional[str] = None, progress: bool = True
) -> Split:
    """Load a CIFAR-10 split ('train' or 'test').

    ``source`` is a path to the JPEG archive or to a ``cifar-10-batches-py`` folder, or
    ``"torchvision"`` (downloads into ``root``); by default the JPEG archive found by
    :func:`default_archive`, else torchvision.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source is None:
        archive = default_archive()
        source = str(archive) if archive else "torchvision"
    if source == "torchvision":
        import torchvision

        ds = torchvision.datasets.CIFAR10(
            root or str(cache_dir() / "torchvision"), train=split == "train", download=True
        )
        imgs = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(ds.targets, dtype=torch.int64)
        return Split(imgs, labels, "torchvision", fingerprint(imgs, labels))
    path = Path(source)
    if path.is_dir():
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        if not (folder / "test_batch").is_file():
            raise FileNotFoundError(f"{path} is not a cifar-10-batches-py folder (no test_batch)")
        imgs, labels = _load_batches_py(folder, split)
        return Split(imgs, labels, str(folder), fingerprint(imgs, labels))
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 source {path} does not exist")
    cache = cache_dir() / f"cifar10-jpeg-{_file_digest(path)[:16]}-{split}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        return Split(blob["images"], blob["labels"], str(path), blob["fingerprint"])
    imgs, labels = _decode_archive(path, split, progress)
    fp = fingerprint(imgs, labels)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": imgs, "labels": labels, "fingerprint": fp}, tmp)
    os.replace(tmp, cache)
    return Split(imgs, labels, str(path), fp)


def train_val_split(train: Split, val_size: int, seed: int = 0) -> Tuple[Split, Split, Tensor]:
    """Carve a class-stratified validation split of ``val_size`` images out of the
    training set (model selection never looks at the test set, docs/design.md §4).

    Deterministic in ``seed``; returns (train, val, val_indices). The validation images come
    in shuffled order, so any prefix of them is close to class-balanced.
    """
    n = len(train)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    classes = train.labels.unique()
    per_class = [order[train.labels[order] == c] for c in classes]
    quota = [val_size // len(classes) + (1 if i < val_size % len(classes) else 0) for i in range(len(classes))]
    val_idx = torch.cat([idx[:q] for idx, q in zip(per_class, quota)])
    # a seeded shuffle, not sorted: the JPEG archive stores images grouped by class, and
    # consumers read prefixes ("the first 500 validation images") that must be balanced
    val_idx = val_idx[torch.randperm(len(val_idx), generator=g)]
    mask = torch.ones(n, dtype=torch.bool)
    mask[val_idx] = False
    train_idx = mask.nonzero().squeeze(1)
    return train.subset(train_idx, f"{train.source}[train]"), train.subset(val_idx, f"{train.source}[val]"), val_idx


def batches_per_epoch(n: int, batch_size: int, epoch_size: Optional[int] = None) -> int:
    """How many batches :func:`epoch_batches` yields per epoch (incomplete batches dropped)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    size = n if epoch_size is None else min(int(epoch_size), n)
    if size < batch_size:
        raise ValueError(f"an epoch of {size} samples holds no batch of {batch_size}")
    return size // batch_size


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, epoch_size: Optional[int] = None) -> List[Tensor]:
    """Index batches of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    sees exactly the batches it would have seen. Incomplete last batches are dropped.

    ``epoch_size`` (samples) shortens an epoch to a prefix of that permutation, cycling
    through the data over consecutive epochs, for CPU budgets where a full pass is long.
    """
    count = batches_per_epoch(n, batch_size, epoch_size)
    size = n if epoch_size is None else min(int(epoch_size), n)
    if size == n:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        # consecutive short epochs walk through one permutation per full pass
        per_pass = n // size
        pass_idx, offset = divmod(epoch, per_pass)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + 7919 * (pass_idx + 1)))
        order = perm[offset * size : (offset + 1) * size]
    return list(order[: count * batch_size].view(-1, batch_size))


def augment(x: Tensor, generator: Optional[torch.Generator] = None, padding: Optional[int] = None) -> Tensor:
    """Random crop with zero padding and random horizontal flip, per sample, vectorised.

    The padding scales with the image: an eighth of its side unless given (4 pixels at 32x32,
    the CIFAR recipe; 8 at 64x64)."""
    B, _, H, W = x.shape
    padding = max(1, round(H / 8)) if padding is None else padding
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dx = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    dy = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    rows = (dy.view(B, 1) + torch.arange(H).view(1, H)).to(x.device)  # [B, H]
    cols = (dx.view(B, 1) + torch.arange(W).view(1, W)).to(x.device)  # [B, W]
    flip = torch.rand(B, generator=generator) < 0.5
    cols = torch.where(flip.view(B, 1).to(x.device), cols.flip(1), cols)
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    out = padded.permute(0, 2, 3, 1)[b, rows.view(B, H, 1), cols.view(B, 1, W)]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
