"""The evidence behind the content seed's pixel candidate (issue 6): each class's relabelled-looking members.

For every class of each set, ``content.relabelled_members`` (the group ``qt.content_candidates`` offers the content
seed, kind "pixels"; no training involved) and its pixel-neighbour statistics: size (poisoned / the class's
poisoned), agreement and diversity, and PASS where the default content seed would accept it (agreement <=
content_max_agreement, diversity >= content_min_diversity, a share of its class inside the bounds). A set is
ATTACK:RATE:DRAW[:cifar] (a benchmarks/detection.py cell, 20,000 images, as 3x32x32 with ``cifar``),
held:TRIGGER:RATE (a benchmarks/heldout.py cell) or clean:N:SUBSET_SEED[:cifar] (a clean subset).
``--source-share`` sets the group's source test (``relabelled_members``; 0.7 = the content seed's, 0.5 = the
content fallback's default, ``readout.widen_content_seed``).

    python benchmarks/pixel_groups.py clean:20000:2 clean:2000:1 clean:60000:0 clean:20000:1:cifar \\
        wanet:0.1:4 issba:0.1:2 badnets:0.01:2
    python benchmarks/pixel_groups.py --source-share 0.5 adaptive-blend:0.1:2 wanet:0.1:4 held:gamma:0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import heldout  # noqa: E402
from detection import make_cell  # noqa: E402
from fmnist import CLASSES, as_rgb32, subset  # noqa: E402

from qtclean import content, qt  # noqa: E402


def load(spec: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and poisoned mask of one set named as in the module docstring."""
    kind, *rest = spec.split(":")
    if kind == "clean":
        images, labels = subset(int(rest[0]), seed=int(rest[1]))
        if rest[2:] == ["cifar"]:
            images = as_rgb32(images)
        return images, labels, np.zeros(len(labels), dtype=bool)
    if kind == "held":
        dataset, truth = heldout.make_cell(20000, rest[0], float(rest[1]))
    else:
        fmt = "cifar" if rest[2:] == ["cifar"] else "folder"
        dataset, truth = make_cell(20000, kind, float(rest[0]), fmt=fmt, poison_seed=int(rest[1]))
    return dataset.images, dataset.labels, truth


def sets_and_runs(specs: list[str]):
    """Yield (spec, pixel embedding, labels, poisoned mask, saved run) for each ``SET[@RESULT.npz]``, the saved run
    (benchmarks/detection.py or heldout.py ``--save-scores``) as loaded by numpy, or None. A set named by several
    runs in a row (scan seeds) is built once: the learned triggers train a network to build it."""
    loaded: dict = {}
    for spec in specs:
        name, _, result = spec.partition("@")
        if name not in loaded:
            images, labels, truth = load(name)
            loaded = {name: (content.pixel_embedding(images), labels, truth)}
        pixels, labels, truth = loaded[name]
        saved = np.load(result) if result else None
        if saved is not None and (not np.array_equal(saved["labels"], labels)
                                  or not np.array_equal(saved["truth"], truth)):
            sys.exit(f"{Path(sys.argv[0]).name}: {result} is not a run of {name}")
        yield spec, pixels, labels, truth, saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+")
    ap.add_argument("--source-share", type=float, default=0.7, help="the group's source test (default 0.7)")
    args = ap.parse_args()
    cfg = qt.QTConfig()
    num_classes = len(CLASSES)
    for spec in args.sets:
        images, labels, truth = load(spec)
        pixels = content.pixel_embedding(images)
        labels, truth = torch.from_numpy(labels).long(), torch.from_numpy(truth)
        rows = []
        for c in range(num_classes):
            members = torch.nonzero(labels == c).flatten()
            group = content.relabelled_members(pixels, labels, members, source_share=args.source_share)
            if group.numel() == 0:
                continue
            stats = content.group_content(pixels, labels, group, c, num_classes)
            share = group.numel() / members.numel()
            accepted = qt.content_accepted(stats, cfg) and qt.content_size_allowed(share)
            rows.append(f"{c}: {group.numel()} ({int(truth[group].sum())}/{int(truth[members].sum())}) "
                        f"{share:.0%} {stats['agreement']:.2f}/{stats['diversity']:.3f}{' PASS' if accepted else ''}")
        print(f"{spec}  " + " | ".join(rows), flush=True)


if __name__ == "__main__":
    main()
