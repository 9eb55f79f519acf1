"""Score a finished scan against known truth (a poisoned copy whose poisoned samples you know).

Truth file: CSV with at least ``index`` and ``poisoned`` (1/0) columns, one row per sample of the dataset
(``qtclean poison`` and ``samples/*.truth.csv`` use ``index,id,poisoned,original_label,label``). Samples that
were unreadable in the scan have no score and are left out of every figure.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .metrics import auroc, detection_rates
from .runs import load_run_info


def read_truth(path: str | os.PathLike) -> dict[int, bool]:
    """``index -> poisoned`` from a truth CSV; a one-line InputError naming the line on anything malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--truth {path}: cannot read ({exc}); pass the truth CSV of the poisoned copy") from exc
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"index", "poisoned"} <= {f.strip() for f in reader.fieldnames}:
        raise InputError(f"--truth {path}: needs the columns 'index' and 'poisoned' (found "
                         f"{', '.join(reader.fieldnames or []) or 'nothing'})")
    truth: dict[int, bool] = {}
    for lineno, row in enumerate(reader, start=2):
        try:
            index = int(row["index"])
            flag = int(row["poisoned"])
        except (TypeError, ValueError):
            raise InputError(f"--truth {path} line {lineno}: 'index' and 'poisoned' must be integers") from None
        if flag not in (0, 1):
            raise InputError(f"--truth {path} line {lineno}: 'poisoned' must be 0 or 1, found {flag}")
        truth[index] = bool(flag)
    return truth


def evaluate_run(run_dir: str | os.PathLike, truth_path: str | os.PathLike) -> dict:
    """AUROC of ``score``, TPR / FPR / precision of ``flagged``, overall and per class (given label).

    Raises InputError when the run is not a finished qtclean run, or the truth does not cover its samples.
    """
    run_dir = Path(run_dir)
    info = load_run_info(run_dir)
    truth = read_truth(truth_path)
    with open(run_dir / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [r["index"] for r in rows if int(r["index"]) not in truth]
    if missing:
        raise InputError(f"--truth {truth_path}: no row for index {missing[0]} ({len(missing)} samples of the run "
                         "missing); is it the truth of the dataset this run scanned?")
    index = np.array([int(r["index"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    flagged = np.array([r["flagged"] == "1" for r in rows])
    poisoned = np.array([truth[i] for i in index])
    classes = info["dataset"]["classes"]
    per_class = []
    for k, name in enumerate(classes):
        m = labels == k
        per_class.append({"label": k, "class": name, "samples": int(m.sum()), "poisoned": int(poisoned[m].sum()),
                          "flagged": int(flagged[m].sum()), **detection_rates(flagged[m], poisoned[m])})
    return {"run": str(run_dir), "truth": str(truth_path), "samples": len(rows), "flagged": int(flagged.sum()),
            "auroc": auroc(scores, poisoned), **detection_rates(flagged, poisoned), "per_class": per_class,
            "roc": roc_curve(scores, poisoned)}


def roc_curve(scores: np.ndarray, truth: np.ndarray, max_points: int = 200) -> dict:
    """False/true positive rates at descending score thresholds (thinned to about ``max_points``)."""
    order = np.argsort(-scores, kind="mergesort")
    t = truth[order]
    pos, neg = max(int(t.sum()), 1), max(int((~t).sum()), 1)
    tpr = np.concatenate([[0.0], np.cumsum(t) / pos])
    fpr = np.concatenate([[0.0], np.cumsum(~t) / neg])
    keep = np.unique(np.linspace(0, len(tpr) - 1, num=min(max_points, len(tpr))).round().astype(int))
    return {"fpr": [round(float(x), 6) for x in fpr[keep]], "tpr": [round(float(x), 6) for x in tpr[keep]]}


def plot_roc(result: dict, path: str | os.PathLike) -> None:
    """ROC curve as an image (needs matplotlib: ``pip install 'qtclean[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib; install it with pip install 'qtclean[plot]'") from None
    from .outputs import atomic_path

    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    ax.plot(result["roc"]["fpr"], result["roc"]["tpr"], label=f"qtclean (AUROC {result['auroc']:.4f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="gray")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
