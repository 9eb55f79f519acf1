"""How much of each flagged class the saved runs flag, and how much of it they leave (issue 6, the
``min_class_remainder`` rule): per run (``--save-scores`` files of detection.py or heldout.py) and flagged class, the
share of the class flagged, the unflagged remainder over the median class size, and the poisoned share of the
flags. An attack adds its poison to its target and leaves the target's own samples, so its remainder stays near a
class's worth; a quarantine that took a clean class leaves little of it.

    python benchmarks/class_remainder.py benchmarks/results/*/*.npz --min-share 0.4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def rows(path: Path, min_share: float) -> list[tuple]:
    """(share flagged, run, class, class size, flagged, poisoned share of the flags, remainder / median class)
    for each class of the run with at least ``min_share`` of it flagged."""
    saved = np.load(path)
    labels, flagged, truth = saved["labels"], saved["flagged"], saved["truth"]
    sizes = np.bincount(labels)
    median = float(np.median(sizes))
    out = []
    for c in np.unique(labels[flagged]):
        members = flagged & (labels == c)
        share = members.sum() / sizes[c]
        if share >= min_share:
            out.append((share, path, int(c), int(sizes[c]), int(members.sum()), truth[members].mean(),
                        (sizes[c] - members.sum()) / median))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scores", nargs="+", type=Path, help="RESULT.npz files (--save-scores); .logits.npz are skipped")
    ap.add_argument("--min-share", type=float, default=0.4, help="list the classes with at least this share flagged")
    args = ap.parse_args()
    found = [r for p in args.scores if not p.name.endswith(".logits.npz") for r in rows(p, args.min_share)]
    print("share flagged | remainder / median class | poisoned share of the flags | flagged / class size | run, class")
    for share, path, c, size, n, poisoned, remainder in sorted(found, key=lambda r: r[0]):
        run = f"{path.parent.name}/{path.name}"
        print(f"{share:.3f} | {remainder:.2f} | {poisoned:.3f} | {n} / {size} | {run}, class {c}")


if __name__ == "__main__":
    main()
