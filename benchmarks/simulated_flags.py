"""Session 40's step-3 rules (issue 6) on every cell with flags made up from the truth, no model: what each would
add where the quarantine had flagged (a) exactly the poison, (b) half of it and clean images of the same classes
(a quarter of the flags), (c) 500 clean images of class 0 (a quarantine that took clean images only; the clean
control's only case), (d) nothing. The rules read the flags, the pixels and the labels alone, so this bounds
what they can add on each cell whatever a scan's quarantine flags, without the hours of scanning every cell
again:

- the palette rule (``readout.flag_palette_holes``): its core of flags, the holes it found, and the images it
  adds (clean among them);
- the shared-block carriers in the classes without flags (``readout.flag_shared_blocks`` with
  ``shared_block_other_classes``): the carriers there, how many look relabelled, and what it adds (clean);
- the common-block rule (``readout.flag_common_blocks``, needing no flag): the unflagged carriers of the blocks
  it finds, how many look relabelled, and what it adds (clean).

The cells: every lab attack in both formats (BadNets also at 0.5-20 %), each held-out trigger all-to-one and
all-to-all, and the clean control, as benchmarks/framing.py.

    python benchmarks/simulated_flags.py
    python benchmarks/simulated_flags.py --attacks none --triggers gamma,dct
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import heldout  # noqa: E402
from class_blocks import cells  # noqa: E402

from qtclean import QTConfig  # noqa: E402
from qtclean.attacks.lab import ATTACK_NAMES  # noqa: E402
from qtclean.content import label_agreement, pixel_embedding, value_counts  # noqa: E402
from qtclean.readout import flag_common_blocks, flag_palette_holes, flag_shared_blocks  # noqa: E402

ONE_CLASS_CLEAN = 500


def made_up_flags(labels: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The three flag sets of the module's docstring (the first two only where the cell has poison)."""
    flags: dict[str, np.ndarray] = {}
    poisoned = np.flatnonzero(truth)
    if poisoned.size:
        flags["poison"] = truth.copy()
        half = np.zeros_like(truth)
        half[rng.choice(poisoned, poisoned.size // 2, replace=False)] = True
        same_classes = np.flatnonzero(~truth & np.isin(labels, np.unique(labels[poisoned])))
        half[rng.choice(same_classes, min(same_classes.size, poisoned.size // 6), replace=False)] = True
        flags["half+clean"] = half
    class_0 = np.flatnonzero(~truth & (labels == 0))
    one_class = np.zeros_like(truth)
    one_class[rng.choice(class_0, min(class_0.size, ONE_CLASS_CLEAN), replace=False)] = True
    flags["clean class 0"] = one_class
    flags["none"] = np.zeros_like(truth)
    return flags


def report(name: str, dataset, truth: np.ndarray, num_classes: int, rng: np.random.Generator) -> None:
    start = time.perf_counter()
    images, labels = dataset.images, np.asarray(dataset.labels)
    labels_t = torch.from_numpy(labels).long()
    counts = value_counts(images)
    embedding = pixel_embedding(images)
    baseline = label_agreement(embedding, labels_t)
    cfg, flagged_only = QTConfig(), QTConfig(shared_block_other_classes=False)
    parts = []
    for what, flags in made_up_flags(labels, truth, rng).items():
        flags_t = torch.from_numpy(flags)
        out, info = flag_palette_holes(counts, labels_t, flags_t, num_classes, cfg)
        added = (out.numpy() & ~flags)
        palette = (f"palette core {info.get('core', 0)}, {info.get('holes', 0)} holes, +{int(added.sum())} "
                   f"({int((added & ~truth).sum())} clean)")
        out, info = flag_shared_blocks(images, embedding, labels_t, flags_t, num_classes, cfg, baseline)
        before, _ = flag_shared_blocks(images, embedding, labels_t, flags_t, num_classes, flagged_only, baseline)
        added = out.numpy() & ~before.numpy()
        elsewhere = info.get("elsewhere", {})
        blocks = (f"blocks elsewhere {elsewhere.get('carriers', 0)} ({elsewhere.get('look_relabelled', 0)} look "
                  "relabelled), "
                  f"+{int(added.sum())} ({int((added & ~truth).sum())} clean)")
        out, info = flag_common_blocks(images, embedding, labels_t, flags_t, cfg, baseline)
        added = out.numpy() & ~flags
        common = (f"common blocks {info.get('positions', 0)}: {info.get('carriers', 0)} carriers "
                  f"({info.get('look_relabelled', 0)} look relabelled), +{int(added.sum())} "
                  f"({int((added & ~truth).sum())} clean)")
        parts.append(f"{what} ({int(flags.sum())}): {palette}; {blocks}; {common}")
    print(f"{name} [{time.perf_counter() - start:.1f} s]\n    " + "\n    ".join(parts), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attacks", default=",".join(ATTACK_NAMES), help="lab attacks (default: all, and none)")
    ap.add_argument("--triggers", default=",".join(heldout.TRIGGERS), help="held-out triggers ('' for none)")
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    triggers = [t for t in args.triggers.split(",") if t]
    for name, dataset, truth in cells([a for a in args.attacks.split(",") if a], triggers, args.n):
        report(name, dataset, truth, len(dataset.classes), rng)


if __name__ == "__main__":
    main()
