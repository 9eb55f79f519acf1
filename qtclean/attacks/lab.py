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
| ``wanet`` | a fixed smooth warp (4x4 control grid, strength 0.5, upsampled bicubic) | all-to-one, plus 2x as many "noise" cover samples warped with a randomly perturbed grid and labels kept | Nguyen & Tran 2021 (their MNIST settings k=4, s=0.5, cross ratio 2) |
| ``adaptive-blend`` | 0.15 blend of the blend-image pattern, on a random half of its 4x4 pieces per sample | all-to-one, plus as many cover samples (same partial trigger, labels kept) | Qi et al. 2023 (their test-time trigger is the whole pattern at 0.2) |
| ``adaptive-patch`` | 2 of 4 fixed random 3x3 patches (four positions) per sample | all-to-one, plus as many cover samples (labels kept) | Qi et al. 2023 (simplified: full opacity) |
| ``iab`` | a per-input pattern and mask from a generator trained here with a classifier (mask density 0.032) | all-to-one (backdoor samples only, as backdoor-toolbox writes it) | Nguyen & Tran 2020 (adaptation: ``learned.py``) |
| ``issba`` | a per-input invisible residual from a StegaStamp-style encoder trained here, hiding a fixed 32-bit code | all-to-one | Li et al. 2021 (adaptation: ``learned.py``) |
| ``none`` | - | - | a plain copy: the clean control |

``rate`` is a fraction of the whole training set; clean-label attacks can poison at most the target class.
Cover samples (WaNet's noise mode, the adaptive attacks' regularisation samples) carry a trigger variant but keep
their labels, so a detector cannot key on "trigger present"; they are not counted as poisoned (the truth file marks
them in a ``cover`` column), since training on them teaches no backdoor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blend import adaptive_blend, blend, image_pattern, noise_pattern, sig
from .patch import adaptive_patch, adaptive_patches, apply_trigger, trojan
from .learned import LEARNED_ATTACKS, LearnedTrigger, train_trigger
from .warp import wanet, wanet_noise


TRIGGERS = {
    "badnets": lambda x: apply_trigger(x, "badnets"),
    "checker": lambda x: apply_trigger(x, "checker"),
    "trojan": trojan,
    "blend-noise": lambda x: blend(x, noise_pattern(x.shape)),
    "blend-image": lambda x: blend(x, image_pattern(x.shape)),
    "sig": sig,
    "badnets-a2a": lambda x: apply_trigger(x, "badnets"),
    "badnets-cl": lambda x: apply_trigger(x, "badnets"),
    "wanet": wanet,
    "adaptive-blend": None,  # per-sample random pieces: applied with the poisoning rng below
    "adaptive-patch": None,
    "iab": None,  # a trained network per dataset: see LearnedTrigger
    "issba": None,
}
RANDOMISED = {"adaptive-blend": adaptive_blend, "adaptive-patch": adaptive_patch}
# cover samples per poisoned sample, and how they are made
COVER = {"wanet": (2.0, wanet_noise), "adaptive-blend": (1.0, adaptive_blend), "adaptive-patch": (1.0, adaptive_patch)}
LABEL_RULE = {"sig": "clean-label", "badnets-cl": "clean-label", "badnets-a2a": "all-to-all"}
ATTACK_NAMES = ["none", *TRIGGERS]


def test_time_trigger(images: np.ndarray, attack: str, trigger: LearnedTrigger | None = None) -> np.ndarray:
    """``images`` with the attack's trigger as it is applied at test time (to measure attack success): the training
    trigger, except that the adaptive attacks use their whole trigger (all pieces at alpha 0.2, all four patches),
    as in Qi et al. 2023. Learned attacks need the ``trigger`` their poisoning trained. Labels are the caller's
    business (the attacker wants ``target``)."""
    if attack in LEARNED_ATTACKS:
        if trigger is None or trigger.attack != attack:
            raise ValueError(f"{attack}: give the trigger network the poisoning trained (Poisoned.trigger)")
        return trigger.apply(images)
    if attack == "adaptive-blend":
        return blend(images, image_pattern(images.shape), alpha=0.2)
    if attack == "adaptive-patch":
        out = images.copy()
        for patch, top, left in adaptive_patches(*images.shape[2:]):
            out[:, :, top:top + patch.shape[0], left:left + patch.shape[1]] = patch
        return out
    if attack not in TRIGGERS:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACK_NAMES)}")
    return TRIGGERS[attack](images)


@dataclass
class Poisoned:
    """A poisoned copy: images, labels, the poisoned and cover masks (N,), and the trained trigger if learned."""

    images: np.ndarray
    labels: np.ndarray
    poisoned: np.ndarray
    cover: np.ndarray
    trigger: LearnedTrigger | None = None


def poison_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int, *, attack: str, rate: float,
                  target: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New images, new labels and the poisoned mask (N,) for ``attack`` at ``rate`` of the set."""
    p = poison(images, labels, num_classes, attack=attack, rate=rate, target=target, seed=seed)
    return p.images, p.labels, p.poisoned


def poison_with_cover(images: np.ndarray, labels: np.ndarray, num_classes: int, *, attack: str, rate: float,
                      target: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`poison_arrays`, plus the mask (N,) of cover samples (trigger variant, label kept; none for most)."""
    p = poison(images, labels, num_classes, attack=attack, rate=rate, target=target, seed=seed)
    return p.images, p.labels, p.poisoned, p.cover


def poison(images: np.ndarray, labels: np.ndarray, num_classes: int, *, attack: str, rate: float,
           target: int = 0, seed: int = 0, trigger: LearnedTrigger | None = None) -> Poisoned:
    """Poison ``rate`` of the set with ``attack``. A learned attack (iab, issba) trains its trigger network on
    ``images`` first (seeded), unless ``trigger`` gives one (e.g. the training set's, to poison its test set)."""
    n = len(labels)
    if attack == "none":
        return Poisoned(images.copy(), labels.copy(), np.zeros(n, bool), np.zeros(n, bool))
    if attack not in TRIGGERS:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACK_NAMES)}")
    if attack in LEARNED_ATTACKS and trigger is None:
        trigger = train_trigger(attack, images, labels, num_classes, target=target, seed=seed)
    rule = LABEL_RULE.get(attack, "all-to-one")
    rng = np.random.default_rng(seed)
    if rule == "clean-label":
        candidates = np.flatnonzero(labels == target)
    elif rule == "all-to-all":
        candidates = np.arange(n)
    else:
        candidates = np.flatnonzero(labels != target)
    count = min(int(round(rate * n)), len(candidates))
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    imgs, labs = images.copy(), labels.copy()
    if attack in LEARNED_ATTACKS:
        imgs[chosen] = trigger.apply(images[chosen])
    elif attack in RANDOMISED:
        imgs[chosen] = RANDOMISED[attack](images[chosen], rng)
    else:
        imgs[chosen] = TRIGGERS[attack](images[chosen])
    if rule == "all-to-one":
        labs[chosen] = target
    elif rule == "all-to-all":
        labs[chosen] = (labels[chosen] + 1) % num_classes
    mask = np.zeros(n, bool)
    mask[chosen] = True
    cover = np.zeros(n, bool)
    if attack in COVER:
        per_poison, make = COVER[attack]
        free = np.flatnonzero(~mask)
        covered = np.sort(rng.choice(free, size=min(int(round(per_poison * count)), len(free)), replace=False))
        imgs[covered] = make(images[covered], rng)
        cover[covered] = True
    return Poisoned(imgs, labs, mask, cover, trigger)
