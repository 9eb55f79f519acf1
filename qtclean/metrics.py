"""Metrics against known truth: AUROC of a score, TPR / FPR / precision of a decision, ACC / ASR of a model.

Scores follow the qtclean convention: higher = more likely poisoned.
"""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    pos, neg = int(truth.sum()), int((~truth).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[truth].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def detection_rates(flagged: np.ndarray, truth: np.ndarray) -> dict:
    """TPR (recall on poisoned), FPR (share of clean flagged), precision; counts included."""
    flagged = np.asarray(flagged, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    tp = int((flagged & truth).sum())
    fp = int((flagged & ~truth).sum())
    pos, neg = int(truth.sum()), int((~truth).sum())
    return {
        "tpr": tp / pos if pos else float("nan"),
        "fpr": fp / neg if neg else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "tp": tp, "fp": fp, "positives": pos, "negatives": neg,
    }


def backdoor_rates(predicted: np.ndarray, labels: np.ndarray, original_labels: np.ndarray, triggered: np.ndarray,
                   num_classes: int, has_quarantine: bool) -> dict:
    """Clean accuracy, attack success rate and the quarantined share of a model's predictions on a test set.

    ``labels`` are the test set's labels after poisoning (the attacker's for triggered samples), ``original_labels``
    before. ACC: clean samples predicted as their label, a quarantine prediction y + K read as class y. ASR:
    triggered samples whose label the attack changed, predicted as that label. ``quarantined``: those predicted in
    that label's quarantine class instead (NaN for a model without a quarantine half).
    """
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    clean = ~np.asarray(triggered, dtype=bool)
    relabelled = ~clean & (np.asarray(original_labels) != labels)

    def share(hits: np.ndarray, mask: np.ndarray) -> float:
        return float(hits[mask].mean()) if mask.any() else float("nan")

    return {
        "clean": int(clean.sum()), "triggered": int(relabelled.sum()),
        "acc": share((predicted % num_classes) == labels, clean),
        "asr": share(predicted == labels, relabelled),
        "quarantined": share(predicted == labels + num_classes, relabelled) if has_quarantine else float("nan"),
    }
