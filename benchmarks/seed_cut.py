"""The second pass's seed cut on its own (issue 6, session 22): ``qt.relabelled_flags`` on a held-out cell's
pixels, with given flags instead of a trained quarantine's, on plain pixels and with the flags' shared pattern
projected out (``second_pass_seed_trigger_out``). No training: a few seconds a cell.

The first pass's seed is a random fifth of the flags (the exception for a group that looks relabelled compares the
cut with it). The flags: a random 50, 75, 90 and 100 % of the poison (a quarantine that took part of it, as the
GPU's frame runs did); 800 clean images of the target beside 1,200 poisoned (a quarantine grown into its class);
and clean half-classes (the half along the first principal direction of the pixels, and a random half), which the
cut should leave behind either way.

    python benchmarks/seed_cut.py --triggers frame,stripes
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

from heldout import TRIGGERS, make_cell  # noqa: E402

from qtclean import QTConfig, qt  # noqa: E402
from qtclean.content import label_agreement, pixel_embedding  # noqa: E402

CLEAN_CLASSES = (8, 1, 0, 6)  # bags, trousers, T-shirts, shirts: easy to hard to tell from other classes


def kept(embedding, labels, truth, flags, first_seed, baseline) -> str:
    """'plain -> pattern out' counts of the flags kept, poisoned / clean, and the pattern's gap (one class's
    flags: :func:`qtclean.content.without_shared_residual`)."""
    out, gap = [], None
    for trigger_out in (False, True):
        cfg = QTConfig(second_pass_seed_trigger_out=trigger_out)
        seed, info = qt.relabelled_flags(embedding, labels, flags, first_seed, 10, cfg, baseline)
        out.append(f"{int((seed & truth).sum())} / {int((seed & ~truth).sum())}")
        gap = next(iter(info.values())).get("pattern_gap", gap)
    return " -> ".join(out) + f" | {gap:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triggers", default="frame,stripes")
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    print("| cell | flags (poisoned / clean) | kept, plain pixels -> pattern out (poisoned / clean) | gap |")
    print("|---|---|---|---|")
    for trigger in args.triggers.split(","):
        if trigger not in TRIGGERS:
            sys.exit(f"seed_cut.py: unknown trigger {trigger!r}; choose from {', '.join(TRIGGERS)}")
        dataset, truth_np = make_cell(args.n, trigger, 0.1)
        labels, truth = torch.from_numpy(dataset.labels), torch.from_numpy(truth_np)
        embedding = pixel_embedding(dataset.images)
        baseline = label_agreement(embedding, labels)
        rng = np.random.default_rng(0)
        poison = np.flatnonzero(truth_np)
        groups = []
        for share in (0.5, 0.75, 0.9, 1.0):
            groups.append((f"{share:.0%} of the poison", rng.choice(poison, int(share * poison.size), replace=False)))
        target_clean = np.flatnonzero((dataset.labels == 0) & ~truth_np)
        groups.append(("1,200 poisoned + 800 clean T-shirts", np.concatenate(
            [rng.choice(poison, 1200, replace=False), rng.choice(target_clean, 800, replace=False)])))
        for c in CLEAN_CLASSES:
            members = np.flatnonzero((dataset.labels == c) & ~truth_np)
            along = embedding[members, 0].numpy()
            groups.append((f"class {c}, the half along PC1", members[np.argsort(-along)[:members.size // 2]]))
            groups.append((f"class {c}, a random half", rng.choice(members, members.size // 2, replace=False)))
        for name, chosen in groups:
            flags = torch.zeros(labels.numel(), dtype=torch.bool)
            flags[torch.from_numpy(chosen)] = True
            first_seed = torch.zeros_like(flags)  # what such a quarantine grew from: a fifth of it
            first_seed[torch.from_numpy(rng.choice(chosen, chosen.size // 5, replace=False))] = True
            print(f"| {trigger}: {name} | {int((flags & truth).sum())} / {int((flags & ~truth).sum())} | "
                  f"{kept(embedding, labels, truth, flags, first_seed, baseline)} |", flush=True)


if __name__ == "__main__":
    main()
