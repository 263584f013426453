"""Your own images: a dataset in torchvision's ``ImageFolder`` layout (one folder per class).

Two layouts are accepted under ``root``:

* ``train/<class>/...`` with optional ``val/<class>/...`` and ``test/<class>/...``;
* ``<class>/...`` directly: one pool, split by seed into train / val / test, stratified by class.

Class names are the folder names, sorted (torchvision's convention), 2 to 1,000 of them.
Files are found recursively; files whose extension is not an image's are ignored (counted).

**The input-size policy** (shared with the server, :func:`fit_image`): an image of any size
is converted to RGB, its shorter side resized to ``size`` (bilinear, antialiased) and the
centre ``size`` x ``size`` square cropped. Nothing is stretched.

**Bad files** are found before training starts: every image is decoded once when the folder
is first indexed (in worker processes, with a progress bar). Unreadable or truncated files
are listed with their paths and left out (``on_bad_file="skip"``, the default) or stop the
run (``"fail"``). The index (files, labels, the bad files, a content fingerprint, and the
per-channel mean and standard deviation of the training split) is cached, keyed by the
folder's file list, sizes and modification times, so a second run skips the scan.

**Memory.** A split whose decoded pixels fit ``in_memory_mb`` is decoded once into a uint8
tensor (cached on disk like CIFAR-10's) and served from memory. A larger split streams:
:class:`StreamingSplit` decodes each batch from disk, in worker processes when asked.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..image_size import fit_to
from . import Split, cache_dir, fingerprint

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_CLASSES",
    "MAX_CLASSES",
    "DatasetError",
    "FolderIndex",
    "ImageFolderData",
    "StreamingSplit",
    "fit_image",
    "decode_file",
    "load_image_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
MIN_CLASSES, MAX_CLASSES = 2, 1000
SPLITS = ("train", "val", "test")
#: bump when the index format or the decoding policy changes (invalidates cached indexes)
INDEX_VERSION = 1


class DatasetError(ValueError):
    """A dataset that cannot be trained on as it is; the message says what to fix."""


def fit_image(img, size: int):
    """The input-size policy (:func:`robustdeq.image_size.fit_to`) on an RGB copy of ``img``."""
    return fit_to(img.convert("RGB"), size, size)


def decode_file(path: os.PathLike, size: int) -> np.ndarray:
    """One image file -> uint8 [size, size, 3] under :func:`fit_image`; raises on a bad file
    (Pillow's warnings about truncated or malformed data count as errors)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Image.open(path) as img:
            img.load()
            return np.asarray(fit_image(img, size), dtype=np.uint8)


def _check_file(args: Tuple[str, int]) -> Tuple[Optional[str], str, List[float]]:
    """Worker: decode one file; (error or None, sha256 of its bytes, per-channel sums)."""
    path, size = args
    try:
        data = Path(path).read_bytes()
        arr = decode_file(path, size).astype(np.float64) / 255.0
    except Exception as exc:  # noqa: BLE001 - any decoder failure marks the file as bad
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}", "", []
    flat = arr.reshape(-1, 3)
    return None, hashlib.sha256(data).hexdigest(), [*flat.sum(0), *(flat**2).sum(0), float(len(flat))]


@dataclass
class FolderIndex:
    """What a scan of ``root`` found, per split: files (relative to root) and labels."""

    root: str
    layout: str  # "splits" (train/ val/ test/) or "pool" (class folders, split by seed)
    classes: List[str]
    files: Dict[str, List[str]]
    labels: Dict[str, List[int]]
    bad_files: List[Dict[str, str]] = field(default_factory=list)  # {"path", "error"}
    ignored_files: int = 0  # non-image files
    fingerprints: Dict[str, str] = field(default_factory=dict)
    mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: Tuple[float, float, float] = (0.25, 0.25, 0.25)

    def to_dict(self) -> Dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _class_folders(folder: Path) -> List[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _scan_classes(folder: Path, root: Path, classes: Optional[Sequence[str]] = None) -> Tuple[List[str], Dict, int]:
    """Class folders of ``folder`` -> (class names, {class: [relative image paths]}, ignored)."""
    dirs = _class_folders(folder)
    if not dirs:
        raise DatasetError(f"{folder} holds no class folders (expected {folder}/<class>/<image files>)")
    found: Dict[str, List[str]] = {}
    ignored = 0
    for d in dirs:
        images = []
        for dirpath, dirnames, filenames in os.walk(d, followlinks=False):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(str((Path(dirpath) / name).relative_to(root)))
                else:
                    ignored += 1
        if not images:
            raise DatasetError(f"class folder {d} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        found[d.name] = images
    names = sorted(found)
    if classes is None:
        if len(names) < MIN_CLASSES:
            raise DatasetError(f"{folder} holds {len(names)} class folder; a classifier needs at least {MIN_CLASSES}")
        if len(names) > MAX_CLASSES:
            raise DatasetError(f"{folder} holds {len(names)} class folders; at most {MAX_CLASSES} are supported")
    else:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DatasetError(
                f"{folder} has class folders that train/ does not: {', '.join(unknown[:10])}; "
                "every class must have training images"
            )
    return names, found, ignored


def _stratified_pool_split(
    per_class: Dict[str, List[str]], classes: List[str], val_fraction: float, test_fraction: float, seed: int
) -> Tuple[Dict[str, List[str]], Dict[str, List[int]]]:
    """Split one pool of class folders into train / val / test by seed, per class."""
    files = {s: [] for s in SPLITS}
    labels = {s: [] for s in SPLITS}
    g = torch.Generator().manual_seed(seed)
    for label, name in enumerate(classes):
        items = per_class[name]
        order = torch.randperm(len(items), generator=g).tolist()
        n_test = int(round(test_fraction * len(items)))
        n_val = int(round(val_fraction * len(items)))
        if len(items) - n_test - n_val < 1:
            raise DatasetError(f"class {name!r} has {len(items)} images: too few to split into train, val and test")
        parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        for split, idx in parts.items():
            files[split] += [items[i] for i in sorted(idx)]
            labels[split] += [label] * len(idx)
    return files, labels


def _index_key(root: Path, size: int, layout_args: Tuple) -> str:
    """Digest of the folder's file list, sizes and mtimes and the indexing arguments."""
    h = hashlib.sha256(f"{INDEX_VERSION}|{root.resolve()}|{size}|{layout_args}".encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            st = (Path(dirpath) / name).stat()
            h.update(f"{dirpath}/{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def index_folder(
    root: os.PathLike,
    size: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
    use_cache: bool = True,
) -> FolderIndex:
    """Scan ``root``, decode every image once (bad files listed), and compute the training
    split's per-channel statistics; cached under :func:`cache_dir` by the folder's contents."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    layout = "splits" if (root / "train").is_dir() else "pool"
    key = _index_key(root, size, (layout, val_fraction, test_fraction, seed))
    cached = cache_dir() / f"imagefolder-{key}.json"
    if use_cache and cached.is_file():
        raw = json.loads(cached.read_text())
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        return FolderIndex(**raw)
    if layout == "splits":
        classes, train_files, ignored = _scan_classes(root / "train", root)
        files = {"train": [f for c in classes for f in train_files[c]]}
        labels = {"train": [i for i, c in enumerate(classes) for _ in train_files[c]]}
        for split in ("val", "test"):
            if (root / split).is_dir():
                names, found, more = _scan_classes(root / split, root, classes)
                ignored += more
                files[split] = [f for c in names for f in found[c]]
                labels[split] = [classes.index(c) for c in names for _ in found[c]]
    else:
        classes, per_class, ignored = _scan_classes(root, root)
        files = {"pool": [f for c in classes for f in per_class[c]]}
        labels = {"pool": [i for i, c in enumerate(classes) for _ in per_class[c]]}
    # decode every file once: bad files are found before training, the statistics come for free
    bad: List[Dict[str, str]] = []
    digests: Dict[str, str] = {}
    stats: Dict[str, List[float]] = {}
    for split in list(files):
        jobs = [(str(root / f), size) for f in files[split]]
        results = _map(_check_file, jobs, workers, progress, f"checking {split} images")
        keep_files, keep_labels = [], []
        for f, y, (error, digest, sums) in zip(files[split], labels[split], results):
            if error is not None:
                bad.append({"path": f, "error": error})
                continue
            keep_files.append(f)
            keep_labels.append(y)
            digests[f], stats[f] = digest, sums
        files[split], labels[split] = keep_files, keep_labels
    if layout == "pool":
        per_class = {c: [f for f, y in zip(files["pool"], labels["pool"]) if y == i] for i, c in enumerate(classes)}
        for c, kept in per_class.items():
            if not kept:
                raise DatasetError(f"class folder {root / c} holds no readable images")
        files, labels = _stratified_pool_split(per_class, classes, val_fraction, test_fraction, seed)
    fingerprints: Dict[str, str] = {}
    for split in files:
        h = hashlib.sha256()
        for f, y in zip(files[split], labels[split]):
            h.update(f"{f}|{y}|{digests[f]}\n".encode())
        fingerprints[split] = h.hexdigest()[:16]
    sums = np.sum([stats[f] for f in files["train"]], axis=0) if files["train"] else np.zeros(7)
    if not files["train"]:
        raise DatasetError(f"no readable training images under {root}")
    n = sums[6]
    mean = sums[:3] / n
    std = np.sqrt(np.maximum(sums[3:6] / n - mean**2, 1e-12))
    index = FolderIndex(
        root=str(root),
        layout=layout,
        classes=classes,
        files=files,
        labels=labels,
        bad_files=bad,
        ignored_files=ignored,
        fingerprints=fingerprints,
        mean=tuple(round(float(v), 6) for v in mean),
        std=tuple(round(float(v), 6) for v in std),
    )
    if use_cache:
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(index.to_dict()))
        os.replace(tmp, cached)
    return index


def _map(fn, jobs: List, workers: int, progress: bool, desc: str) -> List:
    from tqdm import tqdm

    if workers and workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(fn, jobs, chunksize=32), total=len(jobs), desc=desc, disable=not progress))
    return [fn(j) for j in tqdm(jobs, desc=desc, disable=not progress)]


class StreamingSplit:
    """A split decoded from disk batch by batch: same reading interface as :class:`Split`
    (``len``, ``labels``, ``float_images(idx)``, ``subset``), without holding the pixels."""

    def __init__(self, root: str, files: List[str], labels: Tensor, size: int, source: str, fingerprint_: str):
        self.root, self.files, self.labels, self.size = Path(root), list(files), labels, size
        self.source, self.fingerprint = source, fingerprint_

    def __len__(self) -> int:
        return len(self.files)

    def load(self, idx: Tensor) -> Tensor:
        """uint8 [B, 3, size, size] of the files at ``idx``."""
        arrays = [decode_file(self.root / self.files[int(i)], self.size) for i in idx]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def float_images(self, idx=None) -> Tensor:
        idx = torch.arange(len(self)) if idx is None else idx
        return self.load(idx).float().div_(255.0)

    @property
    def images(self) -> Tensor:
        """Every image, decoded now (for the evaluation's subsets; training streams)."""
        return self.load(torch.arange(len(self)))

    def subset(self, idx: Tensor, source: Optional[str] = None) -> "StreamingSplit":
        files = [self.files[int(i)] for i in idx]
        digest = hashlib.sha256("\n".join(files).encode() + self.fingerprint.encode()).hexdigest()[:16]
        return StreamingSplit(str(self.root), files, self.labels[idx], self.size, source or self.source, digest)

    def materialise(self) -> Split:
        """This split decoded into memory (a :class:`Split`)."""
        images = self.images
        return Split(images, self.labels, self.source, fingerprint(images, self.labels))

    def batches(self, index_batches: Sequence[Tensor], workers: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        """(uint8 images, labels) per index batch, decoded ahead by ``workers`` processes."""
        if not workers:
            for idx in index_batches:
                yield self.load(idx), self.labels[idx]
            return
        loader = torch.utils.data.DataLoader(
            _BatchDecoder(self, list(index_batches)), batch_size=None, num_workers=workers, prefetch_factor=2
        )
        yield from loader


class _BatchDecoder(torch.utils.data.Dataset):
    def __init__(self, split: StreamingSplit, index_batches: List[Tensor]):
        self.split, self.index_batches = split, index_batches

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        idx = self.index_batches[i]
        return self.split.load(idx), self.split.labels[idx]


@dataclass
class ImageFolderData:
    """An indexed folder's splits and what a checkpoint must remember of it."""

    index: FolderIndex
    size: int
    splits: Dict[str, object]  # "train" / "val" / "test" -> Split or StreamingSplit

    @property
    def classes(self) -> List[str]:
        return self.index.classes

    def record(self) -> Dict:
        """The dataset's description for checkpoints and run summaries."""
        return {
            "dataset": "imagefolder",
            "root": self.index.root,
            "layout": self.index.layout,
            "classes": self.index.classes,
            "input_size": self.size,
            "mean": list(self.index.mean),
            "std": list(self.index.std),
            "split_sizes": {k: len(v) for k, v in self.splits.items()},
            "fingerprints": self.index.fingerprints,
            "bad_files": len(self.index.bad_files),
            "ignored_files": self.index.ignored_files,
        }


def load_image_folder(
    root: os.PathLike,
    size: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    on_bad_file: str = "skip",
    in_memory_mb: float = 2048,
    workers: int = 0,
    progress: bool = True,
) -> ImageFolderData:
    """Index ``root`` and return its splits (in memory when they fit ``in_memory_mb``)."""
    if on_bad_file not in ("skip", "fail"):
        raise ValueError(f"on_bad_file must be 'skip' or 'fail', got {on_bad_file!r}")
    if not 8 <= size <= 1024:
        raise ValueError(f"input size must be between 8 and 1024 pixels, got {size}")
    index = index_folder(root, size, val_fraction, test_fraction, seed, workers, progress)
    if index.bad_files:
        listed = "\n  ".join(f"{b['path']}: {b['error']}" for b in index.bad_files[:20])
        more = f"\n  ... and {len(index.bad_files) - 20} more" if len(index.bad_files) > 20 else ""
        if on_bad_file == "fail":
            raise DatasetError(f"{len(index.bad_files)} unreadable image file(s) under {root}:\n  {listed}{more}")
        print(f"skipping {len(index.bad_files)} unreadable image file(s) under {root}:\n  {listed}{more}")
    splits: Dict[str, object] = {}
    for split, files in index.files.items():
        if not files:
            continue
        labels = torch.tensor(index.labels[split], dtype=torch.int64)
        source = f"{index.root}[{split}]"
        streaming = StreamingSplit(index.root, files, labels, size, source, index.fingerprints[split])
        if len(files) * 3 * size * size <= in_memory_mb * 2**20:
            splits[split] = _in_memory(streaming, workers, progress)
        else:
            splits[split] = streaming
    return ImageFolderData(index, size, splits)


def _in_memory(split: StreamingSplit, workers: int, progress: bool) -> Split:
    """Decode a split once into a uint8 tensor, cached on disk by its fingerprint."""
    cache = cache_dir() / f"imagefolder-{split.fingerprint}-{split.size}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        return Split(blob["images"], blob["labels"], split.source, blob["fingerprint"])
    jobs = [(str(split.root / f), split.size) for f in split.files]
    arrays = _map(_decode_job, jobs, workers, progress, f"decoding {split.source}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    fp = fingerprint(images, split.labels)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": images, "labels": split.labels, "fingerprint": fp}, tmp)
    os.replace(tmp, cache)
    return Split(images, split.labels, split.source, fp)


def _decode_job(args: Tuple[str, int]) -> np.ndarray:
    return decode_file(*args)
