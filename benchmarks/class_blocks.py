"""What the class-bound block rule (``qtclean.content.class_bound_blocks``, issue 6, session 38) sees in the data
alone, before any model: for each attack of the lab, each held-out trigger and the clean control, on the same
20,000-image Fashion-MNIST cells the detection tables use, the blocks it finds at several class shares and what
flagging their carriers would give (TPR, and the clean images among them). The clean control says where natural
images start to share a block that one class holds; the attacks say how far above that their triggers are.

    python benchmarks/class_blocks.py                          # every lab attack (28x28 and CIFAR format), held-out
    python benchmarks/class_blocks.py --attacks none,sig --shares 0.02,0.03,0.05,0.2
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
from detection import make_cell  # noqa: E402

from qtclean.attacks.lab import ATTACK_NAMES  # noqa: E402
from qtclean.content import class_bound_blocks  # noqa: E402


def cells(attacks: list[str], triggers: list[str], n: int):
    """(name, dataset, truth) for each lab attack in both formats (BadNets also at 0.5-20 %) and each held-out
    trigger all-to-one and all-to-all, all at 10 % unless named."""
    for attack in attacks:
        rates = [0.0] if attack == "none" else ([0.005, 0.01, 0.05, 0.1, 0.2] if attack == "badnets" else [0.1])
        for fmt in ("folder", "cifar"):
            for rate in rates:
                dataset, truth = make_cell(n, attack, rate, fmt)
                yield f"{attack} {rate:g} {'28x28' if fmt == 'folder' else 'cifar'}", dataset, truth
    for trigger in triggers:
        for all_to_all in (False, True):
            dataset, truth = heldout.make_cell(n, trigger, 0.1, all_to_all=all_to_all)
            yield f"held-out {trigger} 0.1 {'all-to-all' if all_to_all else 'all-to-one'}", dataset, truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attacks", default=",".join(ATTACK_NAMES), help="lab attacks (default: all, and none)")
    ap.add_argument("--triggers", default=",".join(heldout.TRIGGERS), help="held-out triggers ('' for none)")
    ap.add_argument("--shares", default="0.02,0.03,0.05,0.1,0.2", help="class shares to try")
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    triggers = [t for t in args.triggers.split(",") if t]
    for name, dataset, truth in cells(args.attacks.split(","), triggers, args.n):
        labels = np.asarray(dataset.labels)
        parts = []
        for share in shares:
            start = time.perf_counter()
            carriers, found = class_bound_blocks(dataset.images, labels, share)
            seconds = time.perf_counter() - start
            found_tp, clean = int((carriers & truth).sum()), int((carriers & ~truth).sum())
            tpr = f"{100 * found_tp / truth.sum():.1f} %" if truth.any() else "-"
            parts.append(f"{share:g}: {len(found)} blocks, {int(carriers.sum())} flagged, TPR {tpr}, "
                         f"{clean} clean [{seconds:.1f} s]")
        print(f"{name}: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
