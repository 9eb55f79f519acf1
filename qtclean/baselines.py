"""Baseline detectors, run on the same engine and written to the same outputs as QT, so they compare on equal terms.

N = number of samples, K = number of classes, D = feature width (the model's ``embed``). Scores follow the qtclean
convention: 0..1, higher = more likely poisoned. Each baseline trains a plain K-way model (hard labels, no
quarantine) and reads its decision from it:

- ``loss``: the ABL-style ranking (Li et al. 2021, "Anti-Backdoor Learning"): a backdoor is fitted first, so after
  a few epochs the poison has the lowest loss. score = p(label | x); flagged = the ``poison_rate`` x N highest.
- ``ss``: spectral signatures (Tran et al. 2018): per class, the squared projection of the centred features on
  their top singular vector; flagged = the 1.5 x ``poison_rate`` x n_c highest of each class (their removal rule).
- ``ac``: activation clustering (Chen et al. 2018): per class, the centred features reduced to ``ac_dims``
  dimensions (PCA here; the paper uses ICA), split by 2-means; a class whose smaller cluster holds less than
  ``ac_size_threshold`` of it is poisoned and that cluster is flagged ("relative size" criterion).

Like qt.py, nothing here reads files or knows the training loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .clustering import class_indices, principal_components, smaller_cluster

METHODS = ("qt", "loss", "ss", "ac")


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of the baseline detectors (``scan(method=...)`` other than "qt").

    epochs : int or None       K-way training epochs; None = 4 for ``loss`` (the early phase, as QT's
                               pre-quarantine) and 12 for ``ss``/``ac`` (a trained model, as in their papers).
    poison_rate : float        the poison share the ``loss`` and ``ss`` removal rules assume (their papers'
                               epsilon); ``ac`` needs none.
    ac_dims : int              dimensions kept before clustering (Chen et al.: 10).
    ac_size_threshold : float  a class is poisoned when its smaller cluster is below this share (Chen et al.: 0.35).
    """

    epochs: int | None = None
    poison_rate: float = 0.1
    ac_dims: int = 10
    ac_size_threshold: float = 0.35

    def epochs_for(self, method: str) -> int:
        if self.epochs is not None:
            return self.epochs
        return 4 if method == "loss" else 12

    def to_dict(self) -> dict:
        return asdict(self)


def top_count(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask (N,) of the ``count`` highest scores (ties broken by index)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    count = max(0, min(int(count), scores.numel()))
    if count:
        mask[torch.argsort(-scores, stable=True)[:count]] = True
    return mask


def loss_ranking(logits: torch.Tensor, labels: torch.Tensor, poison_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores p(label | x) (N,) and the flag of the ``poison_rate`` x N best-fitted samples."""
    scores = torch.softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return scores, top_count(scores, round(poison_rate * labels.numel()))


def _rank_in_class(values: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to 0..1 (1 = highest), so per-class statistics on different scales share one score range."""
    if values.numel() < 2:
        return torch.ones_like(values)
    ranks = torch.empty_like(values)
    ranks[torch.argsort(values, stable=True)] = torch.arange(values.numel(), device=values.device, dtype=values.dtype)
    return ranks / (values.numel() - 1)


def spectral_signature(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       poison_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N,) and flags (N,): per class, rank of the squared projection on the top singular vector."""
    feats = features.double()
    scores = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    flagged = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    for _, idx in class_indices(labels, num_classes, min_size=2):
        outlier = principal_components(feats[idx], 1)[:, 0] ** 2
        scores[idx] = _rank_in_class(outlier).float()
        flagged[idx[top_count(outlier, round(1.5 * poison_rate * idx.numel()))]] = True
    return scores, flagged


def activation_clustering(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, dims: int = 10,
                          size_threshold: float = 0.35) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N,) and flags (N,). Score = how much nearer a sample is to its class's smaller cluster than to the
    larger, (d_large - d_small) / (d_large + d_small) mapped to 0..1; flagged = the smaller cluster of a class
    where it holds less than ``size_threshold``."""
    feats = features.double()
    scores = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    flagged = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    for _, idx in class_indices(labels, num_classes, min_size=3):
        reduced, in_small = smaller_cluster(feats[idx], dims)
        centres = torch.stack([reduced[part].mean(dim=0) if part.any() else reduced.mean(dim=0)
                               for part in (in_small, ~in_small)])
        dist = torch.cdist(reduced, centres)
        d_small, d_large = dist[:, 0], dist[:, 1]
        scores[idx] = (0.5 * (1 + (d_large - d_small) / (d_large + d_small).clamp_min(1e-12))).float()
        if float(in_small.sum()) / idx.numel() < size_threshold:
            flagged[idx[in_small]] = True
    return scores, flagged
