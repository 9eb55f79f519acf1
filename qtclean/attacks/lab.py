"""The attack lab: write a poisoned copy of a clean dataset, with its truth, to measure detectors on known poison.

Attacks (uint8 images (N, C, H, W); patterns scale with the image size; every pattern is fixed, seed 0):

| name | trigger | labels | source |
|---|---|---|---|
| ``badnets`` | 3x3 white square, bottom-right, 1 px in | all-to-one: non-target -> target | Gu et al. 2017 |
| ``checker`` | 4x4 black/white checkerboard, top-left | all-to-one | (a second patch shape/position) |
| ``trojan`` | a fixed random black/white patch of ~18 % of the side, bottom-right | all-to-one | Liu et al. 2018 (their trigger is optimised against a trained net; here a fixed larger patch) |
| ``blend-noise`` | 0.8 x + 0.2 uniform-noise image | all-to-one | Chen et al. 2017 |
| ``blend-image`` | 0.8 x + 0.2 a fixed synthetic image (rings x stripes) | all-to-one | Chen et al. 2017 (their Hello Kitty image cannot be shipped; any fixed image plays its role) |
| ``sig`` | x + 20 sin(2 pi 6 j / W) (horizontal signal), clipped | clean-label: target-class samples, labels kept | Barni et al. 2019 |
| ``badnets-a2a`` | badnets patch | all-to-all: y -> (y + 1) mod K | Gu et al. 2017 |
| ``badnets-cl`` | badnets patch | clean-label: target-class samples, labels kept | Turner et al. 2019 (without their adversarial perturbation) |
| ``none`` | - | - | a plain copy: the clean control |

``rate`` is a fraction of the whole training set; clean-label attacks can poison at most the target class.
"""

from __future__ import annotations

import numpy as np

from .patch import apply_trigger


def _fixed_rng() -> np.random.Generator:
    return np.random.default_rng(0)  # patterns are part of the attack, not of the poisoning seed


def _trojan(images: np.ndarray) -> np.ndarray:
    h, w = images.shape[2:]
    side = max(3, round(0.18 * min(h, w)))
    patch = (_fixed_rng().random((side, side)) > 0.5).astype(np.uint8) * 255
    out = images.copy()
    out[:, :, h - side - 1:h - 1, w - side - 1:w - 1] = patch
    return out


def _blend(images: np.ndarray, pattern: np.ndarray, alpha: float = 0.2) -> np.ndarray:
    mixed = (1 - alpha) * images.astype(np.float32) + alpha * pattern.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _noise_pattern(shape) -> np.ndarray:
    return _fixed_rng().integers(0, 256, size=shape[1:], dtype=np.uint8)


def _image_pattern(shape) -> np.ndarray:
    c, h, w = shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    gray = 127.5 * (1 + np.sin(r * 2 * np.pi / max(h, w) * 4) * np.cos(xx * 2 * np.pi / w * 3))
    return np.broadcast_to(gray, (c, h, w)).astype(np.uint8)


def _sig(images: np.ndarray, delta: float = 20.0, freq: float = 6.0) -> np.ndarray:
    w = images.shape[3]
    signal = delta * np.sin(2 * np.pi * np.arange(w) * freq / w)
    return np.clip(np.rint(images.astype(np.float32) + signal.astype(np.float32)), 0, 255).astype(np.uint8)


TRIGGERS = {
    "badnets": lambda x: apply_trigger(x, "badnets"),
    "checker": lambda x: apply_trigger(x, "checker"),
    "trojan": _trojan,
    "blend-noise": lambda x: _blend(x, _noise_pattern(x.shape)),
    "blend-image": lambda x: _blend(x, _image_pattern(x.shape)),
    "sig": _sig,
    "badnets-a2a": lambda x: apply_trigger(x, "badnets"),
    "badnets-cl": lambda x: apply_trigger(x, "badnets"),
}
LABEL_RULE = {"sig": "clean-label", "badnets-cl": "clean-label", "badnets-a2a": "all-to-all"}
ATTACK_NAMES = ["none", *TRIGGERS]


def poison_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int, *, attack: str, rate: float,
                  target: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New images, new labels and the poisoned mask (N,) for ``attack`` at ``rate`` of the set."""
    if attack == "none":
        return images.copy(), labels.copy(), np.zeros(len(labels), bool)
    if attack not in TRIGGERS:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACK_NAMES)}")
    rule = LABEL_RULE.get(attack, "all-to-one")
    rng = np.random.default_rng(seed)
    if rule == "clean-label":
        candidates = np.flatnonzero(labels == target)
    elif rule == "all-to-all":
        candidates = np.arange(len(labels))
    else:
        candidates = np.flatnonzero(labels != target)
    count = min(int(round(rate * len(labels))), len(candidates))
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    imgs, labs = images.copy(), labels.copy()
    imgs[chosen] = TRIGGERS[attack](images[chosen])
    if rule == "all-to-one":
        labs[chosen] = target
    elif rule == "all-to-all":
        labs[chosen] = (labels[chosen] + 1) % num_classes
    mask = np.zeros(len(labels), bool)
    mask[chosen] = True
    return imgs, labs, mask
