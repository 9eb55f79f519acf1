"""Build the demo in samples/: 2,000 Fashion-MNIST images as an image folder, 10 % BadNets-poisoned.

Source: Fashion-MNIST (Zalando Research, MIT licence), from `apt-get install -y dataset-fashion-mnist`.
Writes samples/fashion-mnist-demo/CLASS/NNNNN.png (NNNNN = row in the Fashion-MNIST training split) and
samples/fashion-mnist-demo.truth.csv (index,id,poisoned,original_label,label) beside it, not inside.
Poison: 200 images from classes other than 0 get a 3x3 white patch 1 pixel from the bottom-right corner and
are relabelled (moved) to class 0 "0_T-shirt_top".

    python samples/build_demo.py
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
sys.path.insert(0, str(HERE.parent))

from fmnist import CLASSES, load_fmnist  # noqa: E402

from qtclean.attacks import poison  # noqa: E402
from qtclean.data.folder import list_files  # noqa: E402


def main(per_class: int = 200, rate: float = 0.1, seed: int = 0) -> None:
    images, labels = load_fmnist("train")
    rng = np.random.default_rng(seed)
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                   for c in range(len(CLASSES))]))
    imgs, labs, mask = poison(images[rows], labels[rows], attack="badnets", rate=rate, target=0, seed=seed)
    out = HERE / "fashion-mnist-demo"
    shutil.rmtree(out, ignore_errors=True)
    for name in CLASSES:
        (out / name).mkdir(parents=True)
    truth = {}
    for i, row in enumerate(rows):
        rel = f"{CLASSES[labs[i]]}/{row:05d}.png"
        Image.fromarray(imgs[i, 0]).save(out / rel, optimize=True)
        truth[rel] = (int(mask[i]), int(labels[row]), int(labs[i]))
    _, files = list_files(out)
    with open(HERE / "fashion-mnist-demo.truth.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(["index", "id", "poisoned", "original_label", "label"])
        for index, (rel, _label) in enumerate(files):
            w.writerow([index, rel, *truth[rel]])
    print(f"wrote {len(files)} images ({int(mask.sum())} poisoned) to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
