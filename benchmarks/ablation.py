"""One in-memory scan through the library (no image files), printing the per-epoch quarantine counts.

Used for the ablations in docs/benchmarks.md: the same Fashion-MNIST subset and poison as
patch_detection.py, with QTConfig / TrainConfig overrides given as JSON.

    python benchmarks/ablation.py 10000 badnets 0.1 '{"release": "all"}' '{"lr_quarantine": 0.05}'
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from fmnist import CLASSES, subset  # noqa: E402

from qtclean import qt  # noqa: E402
from qtclean.attacks.lab import poison_arrays  # noqa: E402
from qtclean.data import Dataset  # noqa: E402
from qtclean.metrics import auroc, detection_rates  # noqa: E402
from qtclean.scan import TrainConfig, scan  # noqa: E402


def main() -> None:
    n, attack, rate = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    qt_over = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    train_over = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    images, labels = subset(n, seed=1)
    if rate > 0:
        images, labels, truth = poison_arrays(images, labels, len(CLASSES), attack=attack, rate=rate, target=0,
                                              seed=2)
    else:
        truth = np.zeros(len(labels), bool)
    if os.environ.get("ORDER") == "folder":  # the order `qtclean scan` sees for patch_detection.py's folders
        order = np.argsort(labels, kind="stable")
        images, labels, truth = images[order], labels[order], truth[order]
    ds = Dataset(images=images, labels=labels, indices=np.arange(n), ids=[str(i) for i in range(n)],
                 classes=CLASSES, format="folder", root="memory", num_total=n)
    t0 = time.time()
    res = scan(ds, qt_config=qt.QTConfig(**qt_over), train_config=TrainConfig(**train_over), seed=0)
    pre = res.pre_quarantine
    print(f"n={n} attack={attack} rate={rate} qt={qt_over} train={train_over}")
    print(f"pre-quarantine set {int(pre.sum())}, poison share {truth[pre].mean() if pre.any() else 0:.3f}")
    for e in res.epochs:
        if e["phase"] == "quarantine":
            rel = [(r["class"], r["rule"], r["released"]) for r in e["releases"]]
            print(f" q{e['epoch']:2d} loss {e['loss']:.3f} quarantined {e['quarantined']:5d} "
                  f"per class {e['quarantined_per_class']} releases {rel}")
    rates = detection_rates(res.flagged, truth)
    print(f"AUROC {auroc(res.scores, truth):.4f} TPR {rates['tpr']:.4f} FPR {rates['fpr']:.4f} "
          f"flagged {int(res.flagged.sum())} time {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
