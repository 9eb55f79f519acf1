"""Fashion-MNIST from the IDX files of `apt-get install -y dataset-fashion-mnist` (MIT licence, Zalando)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

import os

ROOT = Path(os.environ.get("QTCLEAN_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# Prefixed with the label so that ImageFolder's sorted class order equals the Fashion-MNIST label order.
CLASSES = ["0_T-shirt_top", "1_Trouser", "2_Pullover", "3_Dress", "4_Coat", "5_Sandal", "6_Shirt", "7_Sneaker",
           "8_Bag", "9_Ankle_boot"]


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fmnist(split: str = "train", root: Path = ROOT) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 1, 28, 28) and int64 labels (N,)."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")[:, None]
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return np.ascontiguousarray(images), labels


def subset(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of the training split."""
    images, labels = load_fmnist("train")
    idx = np.sort(np.random.default_rng(seed).choice(len(labels), size=n, replace=False))
    return images[idx], labels[idx]


def as_rgb32(images: np.ndarray) -> np.ndarray:
    """(N, 1, 28, 28) grayscale -> (N, 3, 32, 32): a 2-pixel black border and the gray value in all channels."""
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.ascontiguousarray(np.repeat(padded, 3, axis=1))
