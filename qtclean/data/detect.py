"""Pick the reader for a dataset path: ``auto`` looks for CIFAR batch files, otherwise an image folder."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from .cifar import detect_layout, load_cifar
from .dataset import Dataset
from .folder import load_folder

FORMATS = ("auto", "folder", "cifar")


def detect_format(root: str | os.PathLike) -> str:
    path = Path(root)
    if not path.exists():
        raise InputError(f"{root}: no such file or directory; pass the folder that holds the dataset")
    if not path.is_dir():
        raise InputError(f"{root}: is a file; pass the folder that holds the class folders or CIFAR batches")
    return "cifar" if detect_layout(path) is not None else "folder"


def load_dataset(root: str | os.PathLike, *, format: str = "auto", image_size: tuple[int, int] | None = None,
                 progress=None, min_classes: int = 2) -> Dataset:
    """Read a training set from disk.

    Parameters
    ----------
    root : path
        An image folder (``root/CLASS/image``) or a folder of CIFAR-10/100 python batches.
    format : {"auto", "folder", "cifar"}, default "auto"
    image_size : (H, W), optional
        Image folders only: force every image to this size.
    min_classes : int, default 2
        Classes that must hold images (detection needs two; a triggered test set may hold only the target).

    Raises
    ------
    InputError
        The path is missing or does not hold a usable dataset (message says what and how to fix).
    """
    if format not in FORMATS:
        raise InputError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    detected = detect_format(root)
    fmt = detected if format == "auto" else format
    if fmt == "cifar":
        if detected != "cifar":
            raise InputError(f"{root}: --format cifar but no CIFAR batches found (data_batch_1 + batches.meta, "
                             "or train + meta)")
        ds = load_cifar(root, progress=progress)
    else:
        ds = load_folder(root, image_size=image_size, progress=progress)
    present = sorted(set(ds.labels.tolist()))
    if len(present) < min_classes:
        only = ds.classes[present[0]] if present else "none"
        lost = ""  # a class whose every file failed to decode looks absent: say so, with the first such file
        if ds.unreadable:
            first = ds.unreadable[0]
            lost = f" ({len(ds.unreadable)} file(s) could not be read, the first {first.id}: {first.reason})"
        raise InputError(f"{root}: images of only one class ({only}) found{lost}; detection needs at least two "
                         "classes")
    return ds
