"""CIFAR-10 / CIFAR-100 python batches, read without trusting the pickle.

CIFAR-10: ``data_batch_1..5`` (training, in that order), ``test_batch``, ``batches.meta`` (``label_names``).
CIFAR-100: ``train``, ``test``, ``meta`` (``fine_label_names``); labels are ``fine_labels``.
``index`` = row position in the concatenated training batches, file order; ``id`` = ``BATCHFILE:ROW``.

The batches are untrusted: :class:`SafeUnpickler` only rebuilds plain containers, strings, bytes, numbers and
numpy arrays. A pickle asking for anything else (``os.system``, ``builtins.eval``, ...) is refused before any of
it runs. An md5 check cannot help here: a user's batches differ from the published ones by design.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from ..errors import InputError
from .dataset import Dataset, require_memory

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_META = "batches.meta"
CIFAR10_TEST = "test_batch"
CIFAR100_TRAIN = ["train"]
CIFAR100_META = "meta"
CIFAR100_TEST = "test"

# The only globals a CIFAR batch may name: numpy's array and scalar reconstruction (numpy 1 and 2 module paths)
# and the codec numpy uses to carry raw bytes in protocol-2 pickles. Nothing here can run user code.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` only answers :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file, *, name: str, encoding: str = "bytes"):
        super().__init__(file, encoding=encoding)
        self._name = name

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise InputError(
            f"{self._name}: the pickle refers to '{module}.{name}', which a CIFAR batch never needs; "
            "refusing to load it (only plain containers and numpy arrays are allowed)"
        )

    def persistent_load(self, pid):
        raise InputError(f"{self._name}: the pickle uses persistent ids, which a CIFAR batch never needs")


def safe_load(path: Path, *, encoding: str = "bytes"):
    """Unpickle ``path`` with :class:`SafeUnpickler`; every failure is an :class:`InputError` naming the file."""
    name = path.name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from exc
    try:
        obj = SafeUnpickler(io.BytesIO(data), name=name, encoding=encoding).load()
    except InputError:
        raise
    except RecursionError as exc:
        raise InputError(f"{name}: the pickle nests too deeply to be a CIFAR batch") from exc
    except Exception as exc:  # truncated or malformed bytes: any unpickling error is the file's fault
        raise InputError(f"{name}: not a readable CIFAR pickle ({type(exc).__name__}: {exc}); "
                         "re-download or re-create this batch") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{name}: expected a dict of arrays, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def detect_layout(root: Path) -> dict | None:
    """Which CIFAR layout ``root`` holds, or None."""
    if all((root / f).is_file() for f in CIFAR10_TRAIN[:1]) and (root / CIFAR10_META).is_file():
        train = [f for f in CIFAR10_TRAIN if (root / f).is_file()]
        return {"variant": "cifar10", "train": train, "meta": CIFAR10_META, "test": CIFAR10_TEST,
                "label_key": "labels", "names_key": "label_names"}
    if (root / "train").is_file() and (root / CIFAR100_META).is_file():
        return {"variant": "cifar100", "train": CIFAR100_TRAIN, "meta": CIFAR100_META, "test": CIFAR100_TEST,
                "label_key": "fine_labels", "names_key": "fine_label_names"}
    return None


def _as_str(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def load_cifar(root: str | os.PathLike, *, progress=None) -> Dataset:
    """Read CIFAR-10 or CIFAR-100 training batches into a :class:`Dataset` (test batch ignored).

    Raises
    ------
    InputError
        Missing files, a refused or broken pickle, wrong shapes, dtypes, keys or label range.
    """
    root_path = Path(root)
    layout = detect_layout(root_path)
    if layout is None:
        raise InputError(f"{root}: not a CIFAR folder; expected data_batch_1..5 + batches.meta (CIFAR-10) "
                         "or train + meta (CIFAR-100)")
    meta = safe_load(root_path / layout["meta"])
    names = meta.get(layout["names_key"])
    if not isinstance(names, (list, tuple)) or not names:
        raise InputError(f"{layout['meta']}: missing '{layout['names_key']}' (the list of class names)")
    classes = [_as_str(n) for n in names]
    k = len(classes)
    files_size = sum((root_path / f).stat().st_size for f in layout["train"])
    require_memory(2 * files_size, what=f"{root}: reading {len(layout['train'])} CIFAR batch file(s)",
                   fix="free memory or scan on a larger machine")
    images, labels, ids, batch_rows = [], [], [], []
    for bi, fname in enumerate(layout["train"]):
        if progress is not None:
            progress(bi, len(layout["train"]))
        batch = safe_load(root_path / fname)
        for key in ("data", layout["label_key"]):
            if key not in batch:
                raise InputError(f"{fname}: missing key '{key}'; found {sorted(map(str, batch))}")
        data = batch["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            found = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
            raise InputError(f"{fname}: 'data' must be a uint8 numpy array, found {found}")
        if data.ndim != 2 or data.shape[1] != 3072:
            raise InputError(f"{fname}: 'data' has shape {data.shape}, expected (rows, 3072) (32x32 RGB per row)")
        lab = batch[layout["label_key"]]
        try:
            lab_arr = np.asarray(lab)
        except Exception:
            lab_arr = np.asarray([], dtype=object)
        if lab_arr.ndim != 1 or not np.issubdtype(lab_arr.dtype, np.integer):
            raise InputError(f"{fname}: '{layout['label_key']}' must be a list of integers")
        if len(lab_arr) != data.shape[0]:
            raise InputError(f"{fname}: {data.shape[0]} rows of 'data' but {len(lab_arr)} labels; "
                             "the two must have the same length")
        if len(lab_arr) and (lab_arr.min() < 0 or lab_arr.max() >= k):
            bad = int(lab_arr[(lab_arr < 0) | (lab_arr >= k)][0])
            raise InputError(f"{fname}: label {bad} is out of range 0..{k - 1} ({k} class names in "
                             f"{layout['meta']})")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab_arr.astype(np.int64))
        ids.extend(f"{fname}:{r}" for r in range(data.shape[0]))
        batch_rows.append([fname, int(data.shape[0])])
    imgs = np.ascontiguousarray(np.concatenate(images))
    labs = np.concatenate(labels)
    return Dataset(
        images=imgs,
        labels=labs,
        indices=np.arange(len(labs), dtype=np.int64),
        ids=ids,
        classes=classes,
        format="cifar",
        root=str(root),
        num_total=len(labs),
        extra={"variant": layout["variant"], "batches": batch_rows, "meta": layout["meta"],
               "test": layout["test"], "label_key": layout["label_key"]},
    )
