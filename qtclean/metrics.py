"""Detection metrics against known truth: AUROC of a score, TPR / FPR / precision of a decision.

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
