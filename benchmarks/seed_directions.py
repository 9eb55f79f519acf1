"""Where a small loss seed points (issue 6): the evidence behind ``qt.expand_seed``.

For each attack cell (Fashion-MNIST subset, poisoned as benchmarks/detection.py does) it runs the scan's
pre-quarantine phase (default model and settings), takes the relative-loss seed, and for every class holding any
of it reports what ``qt.expand_seed`` sees: the seed (poisoned in it), the group on the seed's side of Otsu's split
along the seed's feature direction, the group's share of the class, the bimodality coefficient of the projection,
the poisoned samples in the group, and whether the default threshold accepts it. Every seeded class is shown, also
those whose seed is large enough (``min_seed_share``) that the scan does not expand them.

    python benchmarks/seed_directions.py --attacks issba,wanet,badnets@0.005,none --poison-seed 2
    python benchmarks/seed_directions.py --attacks issba,wanet --poison-seed 3
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from detection import POISON_SEED, make_cell  # noqa: E402
from loss_dynamics import parse_cell, train_k_way  # noqa: E402

from qtclean import qt  # noqa: E402
from qtclean.engine import predict, resolve_device  # noqa: E402
from qtclean.scan import TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--attacks", default="issba,wanet,badnets@0.005,none")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--poison-seed", type=int, default=POISON_SEED)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    tcfg, cfg = TrainConfig(), qt.QTConfig()
    print("| cell | class | seed (poisoned) | group | share | bimodality | group poisoned | accepted |", flush=True)
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.attacks.split(","):
        attack, rate = parse_cell(spec, args.rate)
        t0 = time.perf_counter()
        dataset, truth = make_cell(args.n, attack, rate, poison_seed=args.poison_seed)
        epochs = qt.pre_quarantine_epochs(cfg, dataset.num_samples, tcfg.batch_size)
        model, data, log_losses, _ = train_k_way(dataset, device, epochs)
        labels, k = data.labels, dataset.num_classes
        seed = qt.select_pre_quarantine_relative(log_losses, labels, k, cfg.pre_fraction, cfg.pre_threshold)
        features = predict(model, data, embed=True)
        every_seeded = torch.bincount(labels[seed], minlength=k) > 0
        _, info = qt.expand_seed(features, labels, seed, every_seeded, cfg)  # the default threshold's verdict
        groups, _ = qt.expand_seed(features, labels, seed, every_seeded, replace(cfg, expand_min_bimodality=1e-9))
        poisoned = torch.as_tensor(truth, dtype=torch.bool, device=device)
        too_small = ~qt.seeded_classes(labels, seed, k, cfg)
        cell = f"{attack} {rate:g}" + ("" if args.poison_seed == POISON_SEED else f" (draw {args.poison_seed})")
        for c, e in info.items():
            in_class = labels == c
            note = "" if bool(too_small[c]) else " (seed large enough: not expanded)"
            print(f"| {cell} | {c} | {e['seed']} ({int((seed & in_class & poisoned).sum())}) | {e['group']} | "
                  f"{e['share']:.3f} | {e['bimodality']:.3f} | {int((groups & in_class & poisoned).sum())} | "
                  f"{'yes' if e['accepted'] else 'no'}{note} |", flush=True)
        print(f"<!-- {cell}: {time.perf_counter() - t0:.0f} s -->", file=sys.stderr)


if __name__ == "__main__":
    main()
