"""CIFAR-10 written out as an image folder (``robustdeq cifar-folder``): a real dataset in the
``ImageFolder`` layout, to try the own-data path with, and the worked example's data.

``train/<class>/NNNNN.png`` and ``test/<class>/NNNNN.png``, each image upscaled (bilinear) to
``--size``; optionally only some classes and the first N images of each."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

from . import CLASSES, load_cifar10

__all__ = ["write_cifar_folder", "add_cifar_folder_arguments", "run_cifar_folder"]


def write_cifar_folder(
    out: Path,
    size: int = 64,
    classes: Optional[Sequence[str]] = None,
    per_class: Optional[int] = None,
    test_per_class: Optional[int] = None,
    source: Optional[str] = None,
    progress: bool = True,
) -> List[Path]:
    """Write the chosen classes of both CIFAR-10 splits under ``out``; returns the split folders."""
    from PIL import Image
    from tqdm import tqdm

    chosen = list(classes or CLASSES)
    unknown = [c for c in chosen if c not in CLASSES]
    if unknown:
        raise ValueError(f"unknown CIFAR-10 class(es) {', '.join(unknown)}; the classes are {', '.join(CLASSES)}")
    written = []
    for split, limit in (("train", per_class), ("test", test_per_class)):
        data = load_cifar10(split, source, progress=progress)
        for name in chosen:
            folder = Path(out) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            idx = (data.labels == CLASSES.index(name)).nonzero().squeeze(1)
            idx = idx[:limit] if limit else idx
            for i in tqdm(idx.tolist(), desc=f"{split}/{name}", disable=not progress, leave=False):
                img = Image.fromarray(data.images[i].permute(1, 2, 0).numpy())
                if size != 32:
                    img = img.resize((size, size), Image.BILINEAR)
                img.save(folder / f"{i:05d}.png")
        written.append(Path(out) / split)
    return written


def add_cifar_folder_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0].replace("``", "'")
    p.add_argument("out", type=Path, help="the folder to write (train/ and test/ inside)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--classes", default=None, help="comma-separated CIFAR-10 class names (default: all 10)")
    p.add_argument("--per-class", type=int, default=None, help="training images per class (default: all 5,000)")
    p.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: all 1,000)")
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: the shared archive, else torchvision)")
    p.add_argument("--no-progress", action="store_true")


def run_cifar_folder(args: argparse.Namespace) -> int:
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    for folder in write_cifar_folder(
        args.out, args.size, classes, args.per_class, args.test_per_class, args.data, not args.no_progress
    ):
        print(f"wrote {folder}")
    return 0
