"""Run-folder files (the only writer of them). Every file is written to a temporary name, then renamed.

Result columns of ``scores.csv`` / ``flagged.csv``, in contract order (extra columns may only follow):
- ``index``: position of the sample in the dataset order (image folder: ImageFolder order; CIFAR: row in the
  concatenated training batches), int;
- ``id``: image folder: path relative to DATA, POSIX separators; CIFAR: ``BATCHFILE:ROW``;
- ``label``: the integer label given in the dataset; ``class``: its name;
- ``score``: 0..1, higher = more likely poisoned, by default at least 0.5 exactly on the flagged rows
  (``readout.flag_ranked_scores``, the last rule: a flag scores 0.5 + p / 2, any other sample
  (share + (1 - share) p) / 2 with its class's flagged share, 0 in a many-target attack). p: the probability mass on
  the sample's quarantine class, averaged over the last ``readout_epochs`` epochs in a seeded class (for a sample
  flagged in another class's quarantine class, on the quarantine classes of every class that quarantines),
  ``qt.quarantine_probability``; scaled down in a withdrawn class that nothing vouches for,
  ``readout.demote_withdrawn_scores``; for a flag of the trigger residual, at least 0.5, rising with how closely its
  pixels follow the trigger, ``readout.flag_by_trigger_residual``, ``readout.flag_residual_in_flagged_classes``; in a
  class whose flags a rule completed, at least 0.5 for a flag and at most 0.5 for the rest,
  ``readout.scores_follow_flags``; for an unflagged sample of a many-target attack whose flags share a trigger in
  their pixels, the larger of p and its trigger residual's rank among the flagged classes' unflagged samples,
  ``readout.residual_ranks``. ``--model-scores`` (and the paper's variant) writes p;
- ``flagged``: 1 if the quarantine model predicts the sample's quarantine class (in a class that quarantines,
  any such class's quarantine class, ``qt.is_quarantined``), else 0; in a class whose
  quarantine did not separate, withdrawn, or its members whose pixels look like images of other classes
  (``readout.withdraw_ambiguous``, ``readout.widen_content_seed``); in a flagged class, also the samples whose score
  stands out from the class and whose pixels look like other classes (``readout.flag_score_outliers``); where the
  quarantine stood, a sample whose pixels look like its own class is flagged exactly when its score stands far
  out from the class (``readout.own_looking_by_score``), and its unflagged images that look like other classes yet are
  labelled as surely as the class's own are flagged (``readout.flag_confident_lookalikes``), and so are those whose
  pixels carry the trigger its flags show (``readout.flag_residual_in_flagged_classes``); in a withdrawn class, the
  members scored like its content seed or its trigger-residual flags that look like images of other classes
  (``readout.complete_content_fallback``, ``readout.complete_residual_flags``). Last, in images up to 64x64: the
  carriers of a block of pixels that most of one class's images carry exactly and other classes' do not
  (``readout.flag_class_bound_blocks``), and, where most of a class's flags carry a block of pixels exactly, its
  flags without one withdrawn and its other carriers that look like other classes flagged, also in the classes
  without flags where most carriers there look like other classes (``readout.flag_shared_blocks``), and the
  carriers of a block a large share of the whole set carries exactly, where most look like other classes
  (``readout.flag_common_blocks``); and the
  samples whose histogram of pixel values moved the flags' way past a wide gap (``readout.flag_value_residual``),
  and, where the flags' values moved one way, the flags whose values moved the other way withdrawn
  (``readout.withdraw_against_value_move``); and the images that hold no pixel at the values the flags' filter
  skips (``readout.flag_palette_holes``); and the images whose content sits apart from where the set frames its
  images, content rolled round the edge read as such (``readout.flag_out_of_frame``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()


def default_mode(directory: bool = False) -> int:
    """Permissions a plain ``open``/``mkdir`` would give (mkstemp/mkdtemp use 0600/0700)."""
    return (0o777 if directory else 0o666) & ~UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on failure removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


COLUMNS = ["index", "id", "label", "class", "score", "flagged"]


def result_rows(indices: np.ndarray, ids: list[str], labels: np.ndarray, classes: list[str], scores: np.ndarray,
                flagged: np.ndarray) -> list[list]:
    """Rows in index order, columns :data:`COLUMNS`."""
    return [[int(indices[i]), ids[i], int(labels[i]), classes[int(labels[i])], f"{float(scores[i]):.6f}",
             int(bool(flagged[i]))] for i in range(len(ids))]


def flagged_rows(rows: list[list]) -> list[list]:
    """Only the flagged rows, highest score first (ties: lower index first)."""
    return sorted((r for r in rows if r[5] == 1), key=lambda r: (-float(r[4]), r[0]))


def csv_text(rows: list[list], columns: list[str] = COLUMNS) -> str:
    """UTF-8 CSV text with a header row, RFC 4180 quoting."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8", newline="")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_model(path: str | os.PathLike, model, metadata: dict[str, str]) -> None:
    """safetensors file of ``model``'s state dict; metadata is str -> str (lists and dicts JSON-encoded)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_tensors(path, tensors, {k: str(v) for k, v in metadata.items()})


def write_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> None:
    """Atomic safetensors file; its I/O errors surface as OSError like every other write here."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            raise OSError(str(exc)) from exc


def read_index_list(text: str, *, source: str, num_total: int) -> list[int]:
    """Indices from a CSV with an ``index`` column, or one integer per line.

    Raises ``ValueError`` with the offending line number on anything else (callers turn it into an input error).
    """
    lines = text.splitlines()
    out: list[int] = []
    first = next((ln for ln in lines if ln.strip()), "")
    if "index" in [c.strip() for c in next(csv.reader([first]), [])]:
        reader = csv.reader(io.StringIO(text))
        header = [c.strip() for c in next(reader)]
        col = header.index("index")
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            value = row[col].strip() if col < len(row) else ""
            out.append(_parse_index(value, source, lineno, num_total))
    else:
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                out.append(_parse_index(line.strip(), source, lineno, num_total))
    return out


def _parse_index(value: str, source: str, lineno: int, num_total: int) -> int:
    try:
        idx = int(value)
    except ValueError:
        raise ValueError(f"{source} line {lineno}: {value!r} is not an integer index") from None
    if not 0 <= idx < num_total:
        raise ValueError(f"{source} line {lineno}: index {idx} is out of range 0..{num_total - 1}")
    return idx
