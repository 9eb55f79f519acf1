"""A scan as the user runs it: dataset in, RUN folder out (scores, flags, model, run.json).

The RUN folder contract is in design.md; column meanings in :mod:`qtclean.outputs`.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__, outputs
from .baselines import BaselineConfig
from .data import Dataset, load_dataset
from .engine import channel_stats
from .errors import InputError, RunError
from .qt import QTConfig
from .scan import CHECKPOINT, ScanResult, TrainConfig, scan

RUN_FILES = ["scores.csv", "flagged.csv", "unreadable.csv", "model.safetensors", "run.json", CHECKPOINT,
             "removed.csv"]


@dataclass(frozen=True)
class ScanRun:
    """A finished scan: where it was written, the dataset it read and what it found."""

    run_dir: Path
    dataset: Dataset
    result: ScanResult
    rows: list[list]
    run_info: dict

    @property
    def flagged_rows(self) -> list[list]:
        return outputs.flagged_rows(self.rows)


def default_run_dir(data: str | Path) -> Path:
    """``./qtclean-<dataset folder name>`` in the current directory."""
    name = Path(data).resolve().name or "dataset"
    return Path.cwd() / f"qtclean-{name}"


def is_inside(path: Path, parent: Path) -> bool:
    """Whether ``path`` is ``parent`` or below it (both resolved, symlinks followed)."""
    path, parent = Path(path).resolve(), Path(parent).resolve()
    return path == parent or parent in path.parents


def _prepare_run_dir(run_dir: Path, data: Path, *, force: bool, resume: bool) -> None:
    if is_inside(run_dir, data):
        raise InputError(f"--out {run_dir}: is inside the dataset {data}; qtclean never writes into its input, "
                         "choose a folder outside it")
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir}: exists and is a file; choose a folder path")
    if run_dir.exists() and any(run_dir.iterdir()):
        if resume:
            return
        if not force:
            raise InputError(f"{run_dir}: already holds a run; use --resume to continue it, --force to start "
                             "over, or --out to choose another folder")
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    elif resume:
        raise InputError(f"{run_dir}: no run to resume; run without --resume")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"{run_dir}: cannot create the run folder ({exc.strerror}); choose a writable --out") from exc


def _check_resumable(run_dir: Path, fingerprint: dict, settings: dict) -> None:
    path = run_dir / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: missing or unreadable, cannot resume; start over with --force") from exc
    if info.get("qtclean_version") != __version__:
        raise InputError(f"{run_dir}: made by qtclean {info.get('qtclean_version')}, this is {__version__}; "
                         "start over with --force")
    if info.get("dataset", {}).get("sha256") != fingerprint["sha256"]:
        raise InputError(f"{run_dir}: the dataset changed since this run started; start over with --force")
    if info.get("settings") != settings:
        raise InputError(f"{run_dir}: resumed with different settings than the run started with; "
                         "repeat the original options or start over with --force")


def scan_to_run(data: str | Path, *, out: str | Path | None = None, format: str = "auto",
                image_size: tuple[int, int] | None = None, qt_config: QTConfig = QTConfig(),
                train_config: TrainConfig = TrainConfig(), seed: int = 0, force: bool = False,
                resume: bool = False, command: list[str] | None = None, progress=None, method: str = "qt",
                baseline_config: BaselineConfig = BaselineConfig()) -> ScanRun:
    """Load ``data``, scan it, and write the RUN folder; returns what was written.

    ``method``: "qt", or a baseline detector ("loss", "ss", "ac") written to the same files (see :func:`scan`).

    Raises
    ------
    InputError
        Bad dataset, existing RUN without ``force``/``resume``, RUN inside DATA, a RUN that cannot be resumed.
    RunError
        Disk or device failures while running.
    """
    progress = progress or (lambda event, **info: None)
    t0 = time.perf_counter()
    data = Path(data)
    run_dir = Path(out) if out is not None else default_run_dir(data)
    progress("phase", name="loading", path=str(data))
    dataset = load_dataset(data, format=format, image_size=image_size,
                           progress=lambda done, total: progress("load", done=done, total=total))
    progress("loaded", num_samples=dataset.num_samples, num_classes=dataset.num_classes,
             image_shape=dataset.image_shape, unreadable=len(dataset.unreadable), format=dataset.format)
    _prepare_run_dir(run_dir, data, force=force, resume=resume)
    fingerprint = dataset.fingerprint()
    settings = {"method": method,
                "qt": qt_config.to_dict() if method == "qt" else None,
                "baseline": baseline_config.to_dict() if method != "qt" else None,
                "train": {**train_config.to_dict(), "device": None, "threads": None, "cuda_graphs": None},
                "seed": seed, "format": dataset.format, "image_size": list(image_size) if image_size else None}
    if resume:
        _check_resumable(run_dir, fingerprint, settings)
    info = {
        "qtclean_version": __version__,
        "command": command or [],
        "arguments": {"data": str(data), "out": str(run_dir), "format": format, "seed": seed,
                      "device": train_config.device, "model": train_config.model, "force": force, "resume": resume,
                      "cuda_graphs": train_config.cuda_graphs},
        "settings": settings,
        "data_path": str(data.resolve()),
        "seed": seed,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "dataset": fingerprint,
        "class_to_idx": dataset.class_to_idx,
        "status": "running",
    }
    try:
        if not resume:
            outputs.write_json(run_dir / "run.json", info)
        outputs.write_text(run_dir / "unreadable.csv", outputs.csv_text(
            [[u.index, u.id, u.reason] for u in dataset.unreadable], ["index", "id", "reason"]))
        result = scan(dataset, qt_config=qt_config, train_config=train_config, seed=seed, progress=progress,
                      checkpoint_dir=run_dir, resume=resume, method=method, baseline_config=baseline_config)
        rows = outputs.result_rows(dataset.indices, dataset.ids, dataset.labels, dataset.classes, result.scores,
                                   result.flagged)
        outputs.write_text(run_dir / "scores.csv", outputs.csv_text(rows))
        outputs.write_text(run_dir / "flagged.csv", outputs.csv_text(outputs.flagged_rows(rows)))
        outputs.write_model(run_dir / "model.safetensors", result.model, _model_metadata(dataset, train_config,
                                                                                       result))
        info.update({
            "device": result.device,
            "epochs": result.epochs,
            "stop_reason": result.stop_reason,
            "flagged": int(result.flagged.sum()),
            "flagged_per_class": np.bincount(dataset.labels[result.flagged], minlength=dataset.num_classes).tolist(),
            "unreadable": len(dataset.unreadable),
            "total_seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_mib": _peak_rss_mib(),
            **result.extra,
            "status": "finished",
        })
        outputs.write_json(run_dir / "run.json", info)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    except OSError as exc:
        raise RunError(f"{run_dir}: writing the run failed ({exc.strerror or exc}); free space or choose another "
                       "--out, then --resume") from exc
    return ScanRun(run_dir=run_dir, dataset=dataset, result=result, rows=rows, run_info=info)


def _peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def _model_metadata(dataset: Dataset, train_config: TrainConfig, result: ScanResult) -> dict[str, str]:
    c, h, w = dataset.image_shape
    mean, std = channel_stats(dataset.images)
    k = dataset.num_classes
    return {
        "qtclean_version": __version__,
        "architecture": train_config.model,
        "num_classes": str(k),
        "class_names": json.dumps(dataset.classes),
        "image_size": json.dumps([h, w]),
        "channels": str(c),
        "normalization": json.dumps({"scale": "uint8 0..255", "mean": [round(float(m), 4) for m in mean],
                                     "std": [round(float(v), 4) for v in std]}),
        "head_layout": json.dumps({"outputs": 2 * k, "source": [0, k - 1], "quarantine": [k, 2 * k - 1],
                                   "rule": "output y+K is the quarantine class of class y"}
                                  if result.model.head.out_features == 2 * k else
                                  {"outputs": k, "source": [0, k - 1], "rule": "plain K-way classifier (baseline "
                                                                               "method)"}),
    }


def load_run_info(run_dir: str | Path) -> dict:
    """run.json of a finished run, or an InputError saying what is wrong."""
    path = Path(run_dir) / "run.json"
    if not Path(run_dir).is_dir():
        raise InputError(f"{run_dir}: no such run folder; pass the folder that `qtclean scan` wrote")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: missing or unreadable; is {run_dir} a qtclean run folder?") from exc
    if info.get("qtclean_version") != __version__:
        raise InputError(f"{run_dir}: made by qtclean {info.get('qtclean_version')}, this is {__version__}; "
                         "scan the dataset again with this version")
    if info.get("status") != "finished":
        raise InputError(f"{run_dir}: the scan did not finish; continue it with `qtclean scan DATA --out "
                         f"{run_dir} --resume`")
    return info

