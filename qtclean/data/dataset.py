"""The one record every data format produces.

N = number of readable samples, C = channels (1 or 3), H x W = image size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import RunError


@dataclass(frozen=True)
class Unreadable:
    """A sample that could not be decoded; it keeps its index so that no other index shifts."""

    index: int
    id: str
    reason: str


@dataclass
class Dataset:
    """A decoded training set.

    Attributes
    ----------
    images : uint8 array (N, C, H, W)
        Readable samples only, in index order.
    labels : int64 array (N,)
        Label given in the dataset, 0..K-1.
    indices : int64 array (N,)
        Each readable sample's ``index`` in the full dataset order (gaps where samples were unreadable).
    ids : list of str (N,)
        Image folder: path relative to the root (POSIX); CIFAR: ``BATCHFILE:ROW``.
    classes : list of str (K,)
        Class names; ``classes[label]`` is the name of a label.
    format : {"folder", "cifar"}
    root : str
        The dataset directory, as given.
    num_total : int
        Samples in the full order, readable or not.
    unreadable : list of Unreadable
    extra : dict
        Format details the exporter needs (e.g. CIFAR batch layout).
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    ids: list[str]
    classes: list[str]
    format: str
    root: str
    num_total: int
    unreadable: list[Unreadable] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> dict:
        """What identifies this dataset for `--resume` and `export`: format, counts, classes and a content hash.

        The hash covers the decoded pixels, labels and ids, so an edited, added or removed file changes it.
        """
        h = hashlib.sha256()
        h.update(memoryview(np.ascontiguousarray(self.images)).cast("B"))  # no second copy of the set
        h.update(np.ascontiguousarray(self.labels.astype("<i8")).tobytes())
        h.update(np.ascontiguousarray(self.indices.astype("<i8")).tobytes())
        h.update("\n".join(self.ids).encode("utf-8"))
        h.update("\n".join(self.classes).encode("utf-8"))
        h.update("\n".join(f"{u.index}\t{u.id}" for u in self.unreadable).encode("utf-8"))
        return {
            "format": self.format,
            "count": self.num_total,
            "readable": self.num_samples,
            "classes": list(self.classes),
            "image_shape": list(self.image_shape),
            "sha256": h.hexdigest(),
        }


def available_memory() -> int | None:
    """Bytes of RAM the OS says are available now (Linux: MemAvailable), or None where it cannot tell."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def require_memory(need: int, *, what: str, fix: str) -> None:
    """Stop with a message naming the memory needed, before an allocation the machine cannot hold."""
    free = available_memory()
    if free is not None and need > free:
        raise RunError(f"{what} needs {need / 2**20:,.0f} MiB of memory, {free / 2**20:,.0f} MiB are available; "
                       f"{fix}")
