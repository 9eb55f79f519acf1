"""Patch-trigger attacks on uint8 image arrays (N, C, H, W).

- ``badnets`` (Gu et al. 2017): a 3x3 white square in the bottom-right corner, 1 pixel from the edges.
- ``checker`` : a 4x4 black/white checkerboard in the top-left corner, 1 pixel from the edges (another patch
  shape and position, the kind of trigger that defeated the earlier port).
Poisoned samples are drawn from the non-target classes, triggered and relabelled to ``target`` (all-to-one).
"""

from __future__ import annotations

import numpy as np


def _badnets(h: int, w: int) -> tuple[np.ndarray, tuple[int, int]]:
    return np.full((3, 3), 255, np.uint8), (h - 4, w - 4)


def _checker(h: int, w: int) -> tuple[np.ndarray, tuple[int, int]]:
    yy, xx = np.mgrid[0:4, 0:4]
    return np.where((yy + xx) % 2 == 0, 255, 0).astype(np.uint8), (1, 1)


ATTACKS = {"badnets": _badnets, "checker": _checker}


def apply_trigger(images: np.ndarray, attack: str) -> np.ndarray:
    """A copy of ``images`` (N, C, H, W) with the attack's patch stamped on every image."""
    out = images.copy()
    patch, (top, left) = ATTACKS[attack](images.shape[2], images.shape[3])
    ph, pw = patch.shape
    out[:, :, top:top + ph, left:left + pw] = patch
    return out


def poison(images: np.ndarray, labels: np.ndarray, *, attack: str, rate: float, target: int = 0,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poison ``rate`` x N samples (from classes other than ``target``) with ``attack``.

    Returns new images, new labels and the bool (N,) mask of poisoned samples.
    """
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(labels != target)
    count = min(int(round(rate * len(labels))), len(candidates))
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    imgs, labs = images.copy(), labels.copy()
    imgs[chosen] = apply_trigger(images[chosen], attack)
    labs[chosen] = target
    mask = np.zeros(len(labels), bool)
    mask[chosen] = True
    return imgs, labs, mask
