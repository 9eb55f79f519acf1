"""Patch-trigger attacks on uint8 image arrays (N, C, H, W).

- ``badnets`` (Gu et al. 2017): a 3x3 white square in the bottom-right corner, 1 pixel from the edges.
- ``checker`` : a 4x4 black/white checkerboard in the top-left corner, 1 pixel from the edges (another patch
  shape and position, the kind of trigger that defeated the earlier port).
- ``trojan`` (Liu et al. 2018): a fixed random black/white patch of ~18 % of the side, bottom-right (their trigger
  is optimised against a trained network; here it is fixed).
- ``adaptive-patch`` (Qi et al. 2023): 2 of 4 fixed random patches (four positions) per sample.
Poisoned samples are drawn from the non-target classes, triggered and relabelled to ``target`` (all-to-one).
"""

from __future__ import annotations

import numpy as np

from .common import fixed_rng


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


def trojan(images: np.ndarray) -> np.ndarray:
    h, w = images.shape[2:]
    side = max(3, round(0.18 * min(h, w)))
    patch = (fixed_rng().random((side, side)) > 0.5).astype(np.uint8) * 255
    out = images.copy()
    out[:, :, h - side - 1:h - 1, w - side - 1:w - 1] = patch
    return out


def adaptive_patches(h: int, w: int) -> list[tuple[np.ndarray, int, int]]:
    rng = fixed_rng()
    side = max(2, round(3 * min(h, w) / 28))
    spots = [(1, 1), (1, w - side - 1), (h - side - 1, 1), (h - side - 1, w - side - 1)]
    return [((rng.random((side, side)) > 0.5).astype(np.uint8) * 255, top, left) for top, left in spots]


def adaptive_patch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    patches = adaptive_patches(*images.shape[2:])
    out = images.copy()
    for i in range(len(images)):
        for j in rng.permutation(len(patches))[:2]:
            patch, top, left = patches[j]
            out[i, :, top:top + patch.shape[0], left:left + patch.shape[1]] = patch
    return out
