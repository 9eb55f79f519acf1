"""Score a finished scan against known truth (a poisoned copy whose poisoned samples you know).

Truth file: CSV with at least ``index`` and ``poisoned`` (1/0) columns, one row per sample of the dataset
(``qtclean poison`` and ``samples/*.truth.csv`` use ``index,id,poisoned,original_label,label``). Samples that
were unreadable in the scan have no score and are left out of every figure.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .metrics import auroc, backdoor_rates, detection_rates
from .runs import load_run_info


def _truth_rows(path: str | os.PathLike, option: str, columns: tuple[str, ...],
                optional: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, row) of a truth CSV holding ``columns`` (and those of ``optional`` it has), each of them an
    integer; one-line InputErrors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{option} {path}: cannot read ({exc}); pass the truth CSV of the poisoned copy") from exc
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not set(columns) <= {f.strip() for f in reader.fieldnames}:
        raise InputError(f"{option} {path}: needs the columns {' and '.join(repr(c) for c in columns)} (found "
                         f"{', '.join(reader.fieldnames or []) or 'nothing'})")
    columns += tuple(c for c in optional if c in {f.strip() for f in reader.fieldnames})
    rows = []
    for lineno, row in enumerate(reader, start=2):
        try:
            rows.append((lineno, {c: int(row[c]) for c in columns}))
        except (TypeError, ValueError):
            raise InputError(f"{option} {path} line {lineno}: {' and '.join(repr(c) for c in columns)} must be "
                             "integers") from None
        if rows[-1][1]["poisoned"] not in (0, 1):
            raise InputError(f"{option} {path} line {lineno}: 'poisoned' must be 0 or 1, found "
                             f"{rows[-1][1]['poisoned']}")
    return rows


def read_truth(path: str | os.PathLike) -> dict[int, bool]:
    """``index -> poisoned`` from a truth CSV; a one-line InputError naming the line on anything malformed."""
    return {row["index"]: bool(row["poisoned"]) for _, row in _truth_rows(path, "--truth", ("index", "poisoned"))}


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


def read_test_truth(path: str | os.PathLike) -> dict[int, tuple[bool, int]]:
    """``index -> (carries a trigger, original_label)`` from a truth CSV with ``index,poisoned,original_label``
    columns; a ``cover`` column (what `qtclean poison` writes) marks trigger variants too, so they are not counted
    as clean samples for ACC."""
    rows = _truth_rows(path, "--test-truth", ("index", "poisoned", "original_label"), optional=("cover",))
    return {row["index"]: (bool(row["poisoned"] or row.get("cover", 0)), row["original_label"]) for _, row in rows}


def load_run_model(run_dir: str | os.PathLike):
    """The model a run saved (safetensors: tensors and JSON metadata only, nothing executable) and its metadata."""
    from safetensors import SafetensorError, safe_open

    from .models import MODELS, build_model

    path = Path(run_dir) / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        arch = meta["architecture"]
        outputs = int(json.loads(meta["head_layout"])["outputs"])
        channels = int(meta["channels"])
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a readable qtclean model ({exc}); run `qtclean scan` again") from exc
    if arch not in MODELS:
        raise InputError(f"{path}: architecture {arch!r} is not one this qtclean knows ({', '.join(MODELS)})")
    model = build_model(arch, channels, outputs)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not match a {arch} with {outputs} outputs; was it edited?") from exc
    return model.eval(), meta


def evaluate_test_set(run_dir: str | os.PathLike, test_dir: str | os.PathLike,
                      test_truth_path: str | os.PathLike | None = None) -> dict:
    """Clean accuracy (ACC) and attack success rate (ASR) of the run's model on a test set with known triggers.

    ``test_dir`` is read like `qtclean scan` reads DATA (resized to the model's image size); its truth
    (default: TEST_DIR.truth.csv beside it, what `qtclean poison` writes) says which samples carry the trigger and
    their original labels. ACC: clean test samples predicted as their label, a quarantine prediction y+K read as
    class y. ASR: triggered samples whose label was changed by the attack (all-to-one, all-to-all) predicted as
    that label, the attacker's target. ``quarantined``: the share of triggered samples predicted in the target's
    quarantine class instead, QT's claim that the trigger lands there (Yu & Zhang 2024, Sec. IV).
    """
    import torch

    from .data import load_dataset
    from .engine import DeviceData, predict

    model, meta = load_run_model(run_dir)
    info = load_run_info(run_dir)
    test_dir = Path(test_dir)
    truth_path = Path(test_truth_path) if test_truth_path is not None else test_dir.with_name(
        test_dir.name + ".truth.csv")
    if not truth_path.is_file():
        raise InputError(f"--test-truth {truth_path}: not found; pass the truth CSV of the test set "
                         "(qtclean poison writes it beside the copy)")
    truth = read_test_truth(truth_path)
    h, w = json.loads(meta["image_size"])
    dataset = load_dataset(test_dir, image_size=(h, w), min_classes=1)
    classes = info["dataset"]["classes"]
    if dataset.classes != classes:
        raise InputError(f"--test {test_dir}: classes {dataset.classes} differ from the scanned dataset's "
                         f"{classes}; the test set must use the same class folders/labels")
    images = dataset.images
    channels = int(meta["channels"])
    if images.shape[1] != channels:
        if images.shape[1] == 1 and channels == 3:
            images = np.repeat(images, 3, axis=1)
        else:
            raise InputError(f"--test {test_dir}: {images.shape[1]}-channel images for a {channels}-channel model; "
                             "use a test set in the training set's colour mode")
    norm = json.loads(meta["normalization"])
    k = len(classes)
    data = DeviceData(images=torch.from_numpy(np.ascontiguousarray(images)),
                      labels=torch.from_numpy(dataset.labels.astype(np.int64)),
                      mean=torch.tensor(norm["mean"], dtype=torch.float32).view(1, -1, 1, 1),
                      std=torch.tensor(norm["std"], dtype=torch.float32).view(1, -1, 1, 1), dtype=torch.float32)
    pred = predict(model, data).argmax(dim=1).numpy()
    missing = [int(i) for i in dataset.indices if int(i) not in truth]
    if missing:
        raise InputError(f"--test-truth {truth_path}: no row for index {missing[0]}; is it the test set's truth?")
    poisoned = np.array([truth[int(i)][0] for i in dataset.indices])
    original = np.array([truth[int(i)][1] for i in dataset.indices])
    has_quarantine = int(json.loads(meta["head_layout"])["outputs"]) == 2 * k
    return {"test": str(test_dir), "test_truth": str(truth_path), "samples": int(len(dataset.labels)),
            **backdoor_rates(pred, dataset.labels, original, poisoned, k, has_quarantine)}
