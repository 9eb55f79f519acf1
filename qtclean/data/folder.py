"""Image folders, read exactly by torchvision's ImageFolder rules.

class = first-level subfolder (sorted by name), files walked recursively in sorted order, filtered by
torchvision's ``IMG_EXTENSIONS``; ``index`` = position in that order. Unlike torchvision, the walk keeps a
set of visited directories, so a symlink loop is walked once instead of recursing forever.

Decoding rule for a whole set (one mode and size for all images):
- mode: grayscale (1 channel) when every readable image is single-band (``1``, ``L``, ``LA``, ``I``, ``I;16``,
  ``F``), RGB (3 channels) otherwise; palette, RGBA and CMYK images are converted to RGB, alpha is dropped.
  16-bit images are scaled to 8 bits (value / 257).
- size: the most common size among the images (ties: larger area first); other images are resized to it
  (bilinear). ``image_size`` forces a size for all.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from .dataset import Dataset, Unreadable, require_memory

# torchvision.datasets.folder.IMG_EXTENSIONS, repeated so that reading a folder does not import torchvision.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def find_classes(root: Path) -> list[str]:
    """Sorted first-level subfolder names (torchvision's ``find_classes``)."""
    try:
        entries = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as exc:
        raise InputError(f"{root}: cannot list the folder ({exc.strerror}); check the path and permissions") from exc
    if not entries:
        raise InputError(
            f"{root}: no class folders found; an image folder needs one subfolder per class (DATA/CLASS/image.png)"
        )
    return entries


def _walk_sorted(top: Path) -> list[tuple[str, list[str]]]:
    """``sorted(os.walk(top, followlinks=True))`` as torchvision does it, but each real directory once."""
    seen: set[str] = set()
    out: list[tuple[str, list[str]]] = []
    stack = [str(top)]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        files, dirs = [], []
        for e in entries:
            try:
                (dirs if e.is_dir() else files).append(e.name)
            except OSError:
                files.append(e.name)
        out.append((d, files))
        stack.extend(os.path.join(d, name) for name in dirs)
    out.sort(key=lambda t: t[0])
    return out


def list_files(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (relative POSIX path, label) in ImageFolder order."""
    classes = find_classes(root)
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for d, fnames in _walk_sorted(root / name):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    rel = Path(os.path.relpath(os.path.join(d, fname), root)).as_posix()
                    samples.append((rel, label))
    return classes, samples


def _to_array(img: Image.Image, gray: bool, size: tuple[int, int]) -> np.ndarray:
    """Decode one image to uint8 (C, H, W) under the set-wide mode and size rule."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode != "F" and (mode.startswith("I;16") or arr.max(initial=0) > 255):
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if gray:
        img = img.convert("L")
    elif img.mode != "RGB":
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        img = img.convert("RGB")
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def load_folder(root: str | os.PathLike, *, image_size: tuple[int, int] | None = None, progress=None) -> Dataset:
    """Read an image folder into a :class:`Dataset`.

    Parameters
    ----------
    root : path
        ``root/CLASS/.../image.ext``.
    image_size : (H, W), optional
        Force every image to this size; default is the most common size in the set.
    progress : callable(done, total), optional
        Called while decoding.

    Raises
    ------
    InputError
        No class folders, no images, fewer than two classes with images.
    """
    root_path = Path(root)
    classes, samples = list_files(root_path)
    if not samples:
        raise InputError(
            f"{root}: no images found in {len(classes)} class folder(s); "
            f"supported extensions: {', '.join(IMG_EXTENSIONS)}"
        )
    unreadable: list[Unreadable] = []
    headers: list[tuple[int, str, tuple[int, int]] | None] = []
    for i, (rel, _label) in enumerate(samples):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(root_path / rel) as img:
                    headers.append((i, img.mode, img.size))
        except Exception as exc:  # any decoder error on untrusted bytes is a per-file problem
            unreadable.append(Unreadable(i, rel, _reason(exc)))
            headers.append(None)
    seen = [h for h in headers if h is not None]
    gray = all(mode in GRAY_MODES for _, mode, _ in seen)
    if image_size is not None:
        size_wh = (image_size[1], image_size[0])
    elif seen:
        counts = Counter(size for _, _, size in seen)
        size_wh = max(counts, key=lambda s: (counts[s], s[0] * s[1], s))
    else:
        size_wh = (1, 1)
    channels = 1 if gray else 3
    shape = (channels, size_wh[1], size_wh[0])
    require_memory(len(seen) * int(np.prod(shape)), what=f"{root}: {len(seen)} images decoded at {shape[1]}x{shape[2]}",
                   fix="pass a smaller --image-size, or scan a subset")
    images = np.empty((len(seen), *shape), dtype=np.uint8)  # filled in place: no second copy of the set
    keep: list[int] = []
    for n, h in enumerate(headers):
        if progress is not None and n % 256 == 0:
            progress(n, len(samples))
        if h is None:
            continue
        i = h[0]
        rel = samples[i][0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(root_path / rel) as img:
                    img.load()
                    images[len(keep)] = _to_array(img, gray, size_wh)
            keep.append(i)
        except Exception as exc:
            unreadable.append(Unreadable(i, rel, _reason(exc)))
    if progress is not None:
        progress(len(samples), len(samples))
    unreadable.sort(key=lambda u: u.index)
    labels_all = np.array([lab for _, lab in samples], dtype=np.int64)
    keep_arr = np.array(keep, dtype=np.int64)
    if keep_arr.size == 0:
        raise InputError(f"{root}: none of the {len(samples)} images could be decoded (see the first: "
                         f"{unreadable[0].id}: {unreadable[0].reason})")
    if len(keep) < len(images):  # some files failed only at full decode
        images = images[:len(keep)].copy()
    return Dataset(
        images=images,
        labels=labels_all[keep_arr],
        indices=keep_arr,
        ids=[samples[i][0] for i in keep],
        classes=classes,
        format="folder",
        root=str(root),
        num_total=len(samples),
        unreadable=unreadable,
        extra={"all_ids": [rel for rel, _ in samples], "all_labels": labels_all.tolist()},
    )
