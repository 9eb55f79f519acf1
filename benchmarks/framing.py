"""What the framing rule (``qtclean.content.out_of_frame``, issue 6, session 39) sees in the data alone, before
any model: for the whole Fashion-MNIST training and test sets (28x28 and CIFAR format) and for the cells of the
detection tables (every lab attack in both formats, BadNets also at 0.5-20 %, each held-out trigger all-to-one
and all-to-all, the clean control), where the set frames its images (the offsets its content sits at, per axis,
and how many images each holds) and what flagging the images out of frame would give at each band (TPR, and the
clean images among them).

    python benchmarks/framing.py                          # all of it
    python benchmarks/framing.py --attacks none --triggers shift --bands 1,2,3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import heldout  # noqa: E402
from class_blocks import cells  # noqa: E402
from fmnist import as_rgb32, load_fmnist  # noqa: E402

from qtclean.attacks.lab import ATTACK_NAMES  # noqa: E402
from qtclean.content import framing_offsets, out_of_frame  # noqa: E402


def offsets_held(images: np.ndarray) -> str:
    """Per axis, each offset the set's content sits at and how many images sit there."""
    offsets = framing_offsets(images)
    parts = []
    for axis, name in enumerate(("x", "y")):
        values, counts = np.unique(offsets[:, axis], return_counts=True)
        parts.append(f"{name} " + " ".join(f"{v:+d}:{c}" for v, c in zip(values, counts)))
    return "; ".join(parts)


def report(name: str, images: np.ndarray, truth: np.ndarray, bands: list[int]) -> None:
    parts = []
    for band in bands:
        start = time.perf_counter()
        outside, found = out_of_frame(images, band)
        seconds = time.perf_counter() - start
        tpr = f"{100 * (outside & truth).sum() / truth.sum():.1f} %" if truth.any() else "-"
        where = ", ".join(f"{f['axis']} from {f['from']:+d}" for f in found) or "none"
        parts.append(f"band {band}: {int(outside.sum())} out of frame ({where}), TPR {tpr}, "
                     f"{int((outside & ~truth).sum())} clean [{seconds:.2f} s]")
    print(f"{name}: " + "; ".join(parts) + f"\n    offsets: {offsets_held(images)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attacks", default=",".join(ATTACK_NAMES), help="lab attacks (default: all, and none)")
    ap.add_argument("--triggers", default=",".join(heldout.TRIGGERS), help="held-out triggers ('' for none)")
    ap.add_argument("--bands", default="1,2,3", help="bands of empty offsets to try")
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    bands = [int(b) for b in args.bands.split(",")]
    for split in ("train", "test"):
        images, _ = load_fmnist(split)
        clean = np.zeros(len(images), dtype=bool)
        report(f"Fashion-MNIST {split} 28x28 ({len(images)})", images, clean, bands)
        report(f"Fashion-MNIST {split} cifar ({len(images)})", as_rgb32(images), clean, bands)
    triggers = [t for t in args.triggers.split(",") if t]
    for name, dataset, truth in cells([a for a in args.attacks.split(",") if a], triggers, args.n):
        report(name, dataset.images, truth, bands)


if __name__ == "__main__":
    main()
