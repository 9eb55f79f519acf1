"""What the trigger-residual rules of step 3 cost as the set grows (issue 6, session 30): the time of
``readout.flag_residual_in_flagged_classes`` (an attack with one target) and ``readout.flag_by_trigger_residual`` (a
many-target one) on a synthetic pixel embedding of N images, 50 dimensions as ``qtclean.content`` keeps, 10 classes.

Both read the pixel residual of every image of a reference (the classes without flags, or the flagged classes'
unflagged images) against the look-alikes of every unflagged image, so their time grows with the square of N. The
embedding is made so that each rule acts in full: the one-target case plants a shared trigger in a tenth of the
images, all labelled class 0, 70 % of them flagged (both bars are computed); the many-target case relabels a tenth
of each class to the next with the trigger and flags it in six classes of ten.

    python benchmarks/residual_cost.py --sizes 20000,60000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qtclean import qt, readout  # noqa: E402

DIMS, CLASSES = 50, 10


def one_target(n: int, g: torch.Generator):
    """Embedding, labels, flags and truth of an all-to-one attack whose quarantine took 70 % of its poison."""
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    centres = 8.0 * torch.eye(CLASSES, DIMS)
    spread = torch.full((DIMS,), 2.0)
    spread[-1] = 0.2  # the trigger's dimension: images vary little along it
    embedding = centres[labels] + spread * torch.randn(n, DIMS, generator=g)
    poisoned = (torch.rand(n, generator=g) < 0.1) & (labels != 0)
    embedding[poisoned, -1] += 4.0
    labels = torch.where(poisoned, torch.zeros_like(labels), labels)
    flagged = poisoned & (torch.rand(n, generator=g) < 0.7)
    return embedding, labels, flagged, poisoned


def many_targets(n: int, g: torch.Generator):
    """The same with each class's tenth relabelled to the next class, flagged in classes 0-5 only."""
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    centres = 8.0 * torch.eye(CLASSES, DIMS)
    spread = torch.full((DIMS,), 2.0)
    spread[-1] = 0.2
    embedding = centres[labels] + spread * torch.randn(n, DIMS, generator=g)
    poisoned = torch.rand(n, generator=g) < 0.1
    embedding[poisoned, -1] += 4.0
    labels = torch.where(poisoned, (labels + 1) % CLASSES, labels)
    flagged = poisoned & (labels < 6)
    return embedding, labels, flagged, poisoned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,60000", help="comma-separated N")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| N | one target: seconds (added, of them poisoned) | many targets: seconds (added, of them poisoned) |")
    print("|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        row = []
        for make, rule in ((one_target, readout.flag_residual_in_flagged_classes),
                           (many_targets, readout.flag_by_trigger_residual)):
            embedding, labels, flagged, poisoned = make(n, torch.Generator().manual_seed(0))
            start = time.perf_counter()
            out, _, _ = rule(embedding, labels, flagged, CLASSES, qt.QTConfig(), 0.8)
            seconds = time.perf_counter() - start
            added = out & ~flagged
            row.append(f"{seconds:.1f} ({int(added.sum())}, {int((added & poisoned).sum())})")
        print(f"| {n:,} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
