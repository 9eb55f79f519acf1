"""Write the cleaned dataset (and the quarantine) in the input's own format, so existing training code is unchanged.

Rules (design.md, Export):
- Image folder: every kept file copied byte for byte to the same relative path; every class folder is created,
  also one that ends up empty. Unreadable files (RUN/unreadable.csv) are not copied: no loader could use them.
- CIFAR-10/100: the training batches re-written with the kept rows in their original order (same keys, dtypes,
  layout; see :mod:`qtclean.data.cifar_writer`); the meta file and the test batch copied unchanged.
- The input is checked against the fingerprint in run.json before anything is written.
- Each output is built in a temporary sibling folder and renamed into place at the end; an interrupted export
  leaves no half dataset. An existing output is replaced only with ``force`` and only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import outputs
from .data import Dataset, load_dataset
from .data.cifar import safe_load
from .data.cifar_writer import select_rows, write_batch
from .errors import InputError, RunError
from .runs import is_inside, load_run_info


@dataclass
class ExportResult:
    """What an export removed and wrote. ``kept_per_class`` / ``removed_per_class`` count readable samples."""

    run_dir: Path
    dataset: Dataset
    removed: np.ndarray                      # sorted dataset indices removed (flagged or listed)
    kept_per_class: list[int]
    removed_per_class: list[int]
    written: dict[str, Path] = field(default_factory=dict)   # "clean"/"quarantine" -> folder
    bytes_written: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False


def read_flagged_list(text: str, *, source: str, num_total: int) -> np.ndarray:
    """Indices to remove from ``text`` (a CSV with an ``index`` column, or one integer per line), sorted, unique.

    Raises InputError naming the offending line; an input with no content at all is an error too (it is what a
    failed scan sends down a pipe), while a header with no rows means "remove nothing".
    """
    if not text.strip():
        raise InputError(f"{source}: empty; expected a CSV with an 'index' column (a header alone removes "
                         "nothing) or one index per line. Did the scan before the pipe fail?")
    try:
        values = outputs.read_index_list(text, source=source, num_total=num_total)
    except ValueError as exc:
        raise InputError(f"{exc}; fix or remove that line") from None
    return np.unique(np.asarray(values, dtype=np.int64))


def check_destination(dest: Path, *, data: Path, run_dir: Path | None, force: bool, option: str) -> None:
    """Refuse an output folder that exists (without ``force``), or sits inside the input or RUN, or holds them."""
    dest = Path(dest)
    if is_inside(dest, data):
        raise InputError(f"{option} {dest}: is inside the input dataset {data}; qtclean never writes into its "
                         "input, choose a folder outside it")
    if run_dir is not None and is_inside(dest, run_dir):
        raise InputError(f"{option} {dest}: is inside the run folder {run_dir}; choose a folder outside it")
    if dest.exists():
        if not force:
            raise InputError(f"{option} {dest}: already exists; choose a new folder or pass --force to replace it")
        if not dest.is_dir():
            raise InputError(f"{option} {dest}: exists and is not a folder; choose a folder path")
        for inner, what in ((data, "the input dataset"), (run_dir, "the run folder")):
            if inner is not None and is_inside(inner, dest):
                raise InputError(f"{option} {dest}: holds {what}; --force would delete it, choose another folder")
    if not dest.parent.exists():
        raise InputError(f"{option} {dest}: the parent folder {dest.parent} does not exist; create it first")


def export(run_dir: str | os.PathLike, *, clean_out: str | os.PathLike | None = None,
           quarantine_out: str | os.PathLike | None = None, flagged: np.ndarray | list[int] | None = None,
           min_score: float | None = None, data: str | os.PathLike | None = None, dry_run: bool = False,
           force: bool = False, dataset: Dataset | None = None, progress=None) -> ExportResult:
    """Write the dataset recorded in ``run_dir`` without the flagged samples (and/or only them).

    Parameters
    ----------
    run_dir : path
        A finished ``qtclean scan`` run folder.
    clean_out, quarantine_out : path, optional
        Where to write the kept / the removed samples. At least one unless ``dry_run``.
    flagged : indices, optional
        Dataset indices to remove instead of RUN/flagged.csv (see :func:`read_flagged_list`).
    min_score : float, optional
        Remove every sample whose RUN/scores.csv score is at least this instead (not with ``flagged``): a scan's
        flags score 0.5 and above (``readout.flag_ranked_scores``), so a lower bar also removes the unflagged samples
        ranked next, those of the classes with flags first.
    data : path, optional
        The input dataset, if it moved since the scan (default: the path recorded in run.json).
    dataset : Dataset, optional
        The already-loaded input (``scan --clean-out`` passes it); its fingerprint is still checked.

    Raises
    ------
    InputError
        Not a finished run, the input changed or is missing, bad indices, a refused destination.
    RunError
        Writing failed (disk full, permissions); nothing partial is left behind.
    """
    progress = progress or (lambda event, **info: None)
    run_dir = Path(run_dir)
    info = load_run_info(run_dir)
    if min_score is not None:  # read before the input is loaded and checked: a bad file fails fast
        if flagged is not None:
            raise InputError("--min-score and --flagged both choose what to remove: pass one of them")
        if not 0.0 <= min_score <= 1.0:
            raise InputError(f"--min-score {min_score}: scores are 0..1; pass a bar in that range")
        flagged = scoring_at_least(run_dir, min_score)
    data_path = Path(data) if data is not None else Path(info.get("data_path") or info["arguments"]["data"])
    if not dry_run and clean_out is None and quarantine_out is None:
        raise InputError("nothing to write: pass --clean-out DIR and/or --quarantine-out DIR (or --dry-run)")
    destinations = {name: Path(p) for name, p in (("clean", clean_out), ("quarantine", quarantine_out))
                    if p is not None}
    if len(destinations) == 2 and (is_inside(destinations["clean"], destinations["quarantine"])
                                   or is_inside(destinations["quarantine"], destinations["clean"])):
        raise InputError("--clean-out and --quarantine-out must be two separate folders, neither inside the other")
    for name, dest in destinations.items():
        check_destination(dest, data=data_path, run_dir=run_dir, force=force, option=f"--{name}-out")

    if dataset is None:
        if not data_path.exists():
            raise InputError(f"{data_path}: the input of this run is missing; pass its new location with --data")
        settings = info.get("settings", {})
        size = settings.get("image_size")
        progress("phase", name="checking input", path=str(data_path))
        dataset = load_dataset(data_path, format=info["dataset"]["format"], image_size=tuple(size) if size else None)
    if dataset.fingerprint()["sha256"] != info["dataset"]["sha256"]:
        raise InputError(f"{data_path}: the dataset changed since the scan (content hash differs from run.json); "
                         "scan it again before exporting")

    if flagged is None:
        flagged = read_flagged_list((run_dir / "flagged.csv").read_text(encoding="utf-8"),
                                    source=str(run_dir / "flagged.csv"), num_total=dataset.num_total)
    removed = np.unique(np.asarray(flagged, dtype=np.int64))
    if removed.size and (removed.min() < 0 or removed.max() >= dataset.num_total):
        raise InputError(f"index {int(removed.max())} is out of range 0..{dataset.num_total - 1}")
    removed_mask = np.isin(dataset.indices, removed)
    k = dataset.num_classes
    result = ExportResult(
        run_dir=run_dir, dataset=dataset, removed=removed, dry_run=dry_run,
        kept_per_class=np.bincount(dataset.labels[~removed_mask], minlength=k).tolist(),
        removed_per_class=np.bincount(dataset.labels[removed_mask], minlength=k).tolist(),
    )
    if dry_run:
        return result

    writer = _write_folder if dataset.format == "folder" else _write_cifar
    for name, dest in destinations.items():
        keep = ~removed_mask if name == "clean" else removed_mask
        progress("phase", name=f"writing {name} set", path=str(dest))
        result.bytes_written[name] = atomic_folder(dest, force, lambda tmp: writer(dataset, keep, tmp))
        result.written[name] = dest
    try:
        outputs.write_text(run_dir / "removed.csv", outputs.csv_text(_removed_rows(run_dir, removed)))
    except OSError as exc:
        raise RunError(f"{run_dir}/removed.csv: cannot write ({exc.strerror or exc}); the export itself is "
                       "complete") from exc
    return result


def scoring_at_least(run_dir: Path, min_score: float) -> np.ndarray:
    """The indices of RUN/scores.csv's rows whose score is at least ``min_score``."""
    path = run_dir / "scores.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"index", "score"} <= set(reader.fieldnames or ()):
                raise InputError(f"{path}: no index and score columns; scan again, or pass --flagged")
            return np.array([int(r["index"]) for r in reader if float(r["score"]) >= min_score], dtype=np.int64)
    except (OSError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the scores ({exc}); scan again, or pass --flagged") from None


def _removed_rows(run_dir: Path, removed: np.ndarray) -> list[list]:
    """scores.csv's rows of the removed indices, highest score first (flagged.csv's order)."""
    wanted = set(removed.tolist())
    text = (run_dir / "scores.csv").read_text(encoding="utf-8")
    rows = [r for r in csv.reader(io.StringIO(text))][1:]
    picked = [[int(r[0]), r[1], int(r[2]), r[3], r[4], int(r[5])] for r in rows if r and int(r[0]) in wanted]
    return sorted(picked, key=lambda r: (-float(r[4]), r[0]))


def atomic_folder(dest: Path, force: bool, fill) -> int:
    """Build ``dest`` in a temporary sibling via ``fill(tmp)``, then rename it into place; returns bytes written."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    old = None
    try:
        fill(tmp)
        os.chmod(tmp, outputs.default_mode(directory=True))
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if dest.exists():  # only with force, checked before
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.replace(old, dest)
        raise RunError(f"{dest}: writing failed ({exc.strerror or exc}); nothing was left behind, free space or "
                       "choose another folder") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return size


def _write_folder(dataset: Dataset, keep: np.ndarray, out: Path) -> None:
    root = Path(dataset.root)
    for name in dataset.classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    for rel in (dataset.ids[i] for i in np.flatnonzero(keep)):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)


def _write_cifar(dataset: Dataset, keep: np.ndarray, out: Path) -> None:
    root = Path(dataset.root)
    extra = dataset.extra
    start = 0
    for fname, num_rows in extra["batches"]:
        rows = np.flatnonzero(keep[start:start + num_rows])
        start += num_rows
        batch = safe_load(root / fname)
        write_batch(out / fname, select_rows(batch, rows, num_rows))
    for fname in (extra["meta"], extra["test"]):
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(root / fname, out / fname)
