"""Write CIFAR python batches the way the published files are written, so every known reader loads them.

The published batches are Python 2 pickles: keys, filenames and the array's raw bytes are Python 2 ``str``
(opcode ``BINSTRING``). That is what lets the same file load with ``pickle.load(f, encoding='bytes')`` (the
CIFAR page's recipe: keys ``b'data'``) and with ``encoding='latin1'`` (torchvision: keys ``'data'``). A Python 3
pickle cannot do both (its ``str`` stays ``str`` and its ``bytes`` stay ``bytes``), so :class:`Py2StrPickler`
writes ``str`` and ``bytes`` as Python 2 strings and names numpy's functions by their ``numpy.core`` path, which
numpy 1 and 2 both resolve.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


class Py2StrPickler(pickle._Pickler):  # the pure-Python pickler: the C one cannot change how str is written
    """Protocol-2 pickler that writes ``str`` and ``bytes`` as Python 2 ``str``, as the CIFAR batches have them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file):
        super().__init__(file, protocol=2)

    def save_py2_str(self, obj):
        raw = obj if isinstance(obj, bytes) else _encode(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__
        name = name or obj.__qualname__
        if module.startswith("numpy._core"):  # numpy 2's private path; numpy 1 only knows numpy.core
            module = "numpy.core" + module[len("numpy._core"):]
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def _encode(text: str) -> bytes:
    try:
        return text.encode("latin1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def write_batch(path: Path, batch: dict) -> None:
    """Pickle ``batch`` (str keys) to ``path`` in the published CIFAR layout."""
    with open(path, "wb") as f:
        Py2StrPickler(f).dump(batch)


def select_rows(batch: dict, rows: np.ndarray, num_rows: int) -> dict:
    """``batch`` with only ``rows`` of every per-row field (arrays and lists of length ``num_rows``), in order.

    Other fields (``batch_label``) are kept as they are. Lists stay lists and arrays keep their dtype.
    """
    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == num_rows:
            out[key] = np.ascontiguousarray(value[rows])
        elif isinstance(value, (list, tuple)) and len(value) == num_rows:
            out[key] = type(value)(value[int(r)] for r in rows)
        else:
            out[key] = value
    return out
