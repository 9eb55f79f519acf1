"""Where a filter trigger leaves its mark in an all-to-all attack (issue 6, session 34): the held-out triggers'
all-to-all cells at the point where ``qt.shared_trigger_seed`` runs (after pre-quarantine, on the K-way model's
features), per class, the AUROC of poison against clean along three directions, each estimated from the loss seed
(no ground truth): the shared-trigger seed's own (seed mean minus the rest of its class, ``qt.group_gap_direction``,
centred per class as that rule reads it), the pixel trigger residual's (each image minus its 10 nearest pixel
look-alikes of other classes outside the seed, ``readout.flag_by_trigger_residual``'s estimate), and the same
residual taken in the model's features instead of the pixels (the features minus the look-alikes' features). The
trigger residual finds a class's poison where its AUROC is near 1 at a bar the seeded classes' clean samples set;
"S" marks a seeded class, "-" one the seed missed (the classes whose poison today's rules leave). The scan stops
once the features are read, so a cell costs its pre-quarantine epochs only (a cell with every class seeded never
reaches that point, and is said so).

    python benchmarks/feature_residual.py --cells gamma:0,posterize:2,dct:0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from heldout import make_cell  # noqa: E402  (benchmarks/heldout.py)

from qtclean import QTConfig, TrainConfig, qt, scan  # noqa: E402
from qtclean.content import cosine_with, mean_direction, nearest_in, pixel_embedding  # noqa: E402
from qtclean.metrics import auroc  # noqa: E402


class _FeaturesRead(Exception):
    """Raised by the hook once it holds the features: the rest of the scan is not needed."""


def pre_quarantine_features(trigger: str, seed: int, n: int) -> dict | None:
    """The K-way model's features, labels, loss seed and truth of a held-out all-to-all cell, as
    ``qt.shared_trigger_seed`` receives them; None where every class was seeded (the hook is never called)."""
    dataset, truth = make_cell(n, trigger, 0.1, all_to_all=True)
    held: dict = {}
    real = qt.shared_trigger_seed

    def hook(features, labels, pre_mask, num_classes, cfg):
        held.update(features=features.float().cpu(), labels=labels.cpu(), seed=pre_mask.cpu(), images=dataset.images,
                    truth=torch.from_numpy(truth))
        raise _FeaturesRead

    qt.shared_trigger_seed = hook
    try:
        scan(dataset, train_config=TrainConfig(device="cpu"), seed=seed)
    except _FeaturesRead:
        return held
    finally:
        qt.shared_trigger_seed = real
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="gamma:0,posterize:2,dct:0", help="TRIGGER:SCAN_SEED,... (all-to-all, 10 %%)")
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    for cell in args.cells.split(","):
        trigger, seed = cell.split(":")
        held = pre_quarantine_features(trigger, int(seed), args.n)
        if held is None:
            print(f"{cell}: every class seeded, nothing to look for")
            continue
        features, labels, seed_mask, truth = held["features"], held["labels"], held["seed"], held["truth"].numpy()
        k = int(labels.max()) + 1
        seeded = qt.seeded_classes(labels, seed_mask, k, QTConfig())
        pixels = pixel_embedding(held["images"])
        pool = torch.nonzero(~seed_mask).flatten()

        def residuals(points: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
            nearest = pool[nearest_in(pixels, queries, pool, labels=labels)]
            return points[queries] - points[nearest].mean(dim=1)

        gap = qt.group_gap_direction(features.double(), labels, seed_mask, seeded).float()
        trigger_dirs = {}
        for name, points in (("pixel residual", pixels), ("feature residual", features)):
            per_class = [mean_direction(residuals(points, torch.nonzero(seed_mask & (labels == c)).flatten()))
                         for c in torch.nonzero(seeded).flatten().tolist()]
            trigger_dirs[name] = (points, mean_direction(torch.stack(per_class)))
        print(f"{cell} (seeded: {torch.nonzero(seeded).flatten().tolist()})")
        print("  class | seed's gap (shared-trigger seed) | pixel residual | feature residual")
        for c in range(k):
            members = torch.nonzero(labels == c).flatten()
            poison = truth[members.numpy()]
            along = ((features[members] - features[members].mean(dim=0)) @ gap).numpy()
            row = [auroc(along, poison)]
            for points, direction in trigger_dirs.values():
                row.append(auroc(cosine_with(residuals(points, members), direction).numpy(), poison))
            print(f"  {c} {'S' if seeded[c] else '-'} | " + " | ".join(f"{a:.3f}" for a in row), flush=True)


if __name__ == "__main__":
    main()
