"""Blend-type triggers: a pattern mixed into the whole image (uint8 arrays (N, C, H, W)).

- ``blend-noise`` / ``blend-image`` (Chen et al. 2017): 0.8 x + 0.2 pattern, a uniform-noise image or a fixed
  synthetic image (rings x stripes; their Hello Kitty image cannot be shipped, any fixed image plays its role).
- ``sig`` (Barni et al. 2019): a horizontal sinusoid added to the image (clean-label).
- ``adaptive-blend`` (Qi et al. 2023): the image pattern at 0.15 on a random half of its 4x4 tiles per sample.
"""

from __future__ import annotations

import numpy as np

from .common import fixed_rng


def blend(images: np.ndarray, pattern: np.ndarray, alpha: float = 0.2) -> np.ndarray:
    mixed = (1 - alpha) * images.astype(np.float32) + alpha * pattern.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def noise_pattern(shape) -> np.ndarray:
    return fixed_rng().integers(0, 256, size=shape[1:], dtype=np.uint8)


def image_pattern(shape) -> np.ndarray:
    c, h, w = shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    gray = 127.5 * (1 + np.sin(r * 2 * np.pi / max(h, w) * 4) * np.cos(xx * 2 * np.pi / w * 3))
    return np.broadcast_to(gray, (c, h, w)).astype(np.uint8)


def sig(images: np.ndarray, delta: float = 20.0, freq: float = 6.0) -> np.ndarray:
    w = images.shape[3]
    signal = delta * np.sin(2 * np.pi * np.arange(w) * freq / w)
    return np.clip(np.rint(images.astype(np.float32) + signal.astype(np.float32)), 0, 255).astype(np.uint8)


def _pieces_mask(h: int, w: int, rng: np.random.Generator, pieces: int = 4,
                 keep: float = 0.5) -> np.ndarray:
    """(H, W) bool: a random ``keep`` share of the pattern's ``pieces`` x ``pieces`` tiles."""
    chosen = rng.permutation(pieces * pieces)[:max(1, round(keep * pieces * pieces))]
    tiles = np.zeros(pieces * pieces, bool)
    tiles[chosen] = True
    rows = np.minimum(np.arange(h) * pieces // h, pieces - 1)
    cols = np.minimum(np.arange(w) * pieces // w, pieces - 1)
    return tiles.reshape(pieces, pieces)[rows[:, None], cols[None, :]]


def adaptive_blend(images: np.ndarray, rng: np.random.Generator, alpha: float = 0.15) -> np.ndarray:
    pattern = image_pattern(images.shape).astype(np.float32)
    out = images.copy()
    for i in range(len(images)):
        m = _pieces_mask(images.shape[2], images.shape[3], rng)
        x = images[i].astype(np.float32)
        out[i] = np.clip(np.rint(np.where(m, (1 - alpha) * x + alpha * pattern, x)), 0, 255).astype(np.uint8)
    return out
