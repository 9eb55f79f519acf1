"""The evidence behind ``qt.content_seed`` (issue 6): pixel-neighbour statistics of every class's feature clusters.

Reads the files benchmarks/loss_dynamics.py writes with ``--features-after`` (the K-way model's penultimate
features after the pre-quarantine epochs, per cell and scan seed), rebuilds each cell's images, and for every
class splits the features by 2-means as the scan does (``qt.content_candidates``).
For each cluster: its poisoned share, the share of its pixel neighbours that carry its label (agreement) and how
evenly the others spread over the other classes (diversity). Prints, per subset size, the highest diversity any
clean cluster reached and every mostly-poisoned cluster.

    python benchmarks/loss_dynamics.py --out /tmp/dyn --attacks blend-noise,sig,none,wanet --epochs 4 \\
        --features-after 4 --seeds 0,1,2
    python benchmarks/content_clusters.py /tmp/dyn/*.npz
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from detection import make_cell  # noqa: E402

from qtclean import content, qt  # noqa: E402


def cell_of(path: Path) -> tuple[int, str, float]:
    """ATTACK-RATE-N[-sSEED].npz (loss_dynamics.py's names) -> (n, attack, rate), make_cell's arguments."""
    stem = path.stem.rsplit("-", 1)[0] if path.stem.rsplit("-", 1)[-1].startswith("s") else path.stem
    attack, rate, n = stem.rsplit("-", 2)
    return int(n), attack, float(rate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    cfg = qt.QTConfig()
    rows: dict[int, list[dict]] = defaultdict(list)
    embeddings: dict[tuple, torch.Tensor] = {}
    for path in sorted(args.files):
        saved = np.load(path)
        if "features" not in saved:
            sys.exit(f"{path}: no features; write it with loss_dynamics.py --features-after EPOCHS")
        cell = cell_of(path)
        if cell not in embeddings:
            embeddings.clear()  # one cell's images at a time
            embeddings[cell] = content.pixel_embedding(make_cell(*cell)[0].images)
        pixels = embeddings[cell]
        labels = torch.from_numpy(saved["labels"])
        truth = torch.from_numpy(saved["truth"]).bool()
        features = torch.from_numpy(saved["features"].astype(np.float32))
        num_classes = int(labels.max()) + 1
        for c, members, _kind in qt.content_candidates(features, labels, num_classes):
            stats = content.group_content(pixels, labels, members, c, num_classes)
            rows[cell[0]].append({"run": path.name, "class": c, "size": members.numel(),
                                  "poisoned": float(truth[members].float().mean()), **stats})
    for n, found in sorted(rows.items()):
        clean = [r for r in found if r["poisoned"] < 0.1]
        poison = [r for r in found if r["poisoned"] > 0.9]
        low = [r for r in clean if r["agreement"] <= cfg.content_max_agreement]
        top = max(clean, key=lambda r: r["diversity"])
        print(f"n={n}: {len({r['run'] for r in found})} runs, {len(clean)} clean clusters: highest diversity "
              f"{top['diversity']:.3f} (agreement {top['agreement']:.3f}); {len(low)} with agreement <= "
              f"{cfg.content_max_agreement}: highest diversity {max((r['diversity'] for r in low), default=0):.3f}; "
              f"clean clusters the default seeds: {sum(qt.content_accepted(r, cfg) for r in clean)}")
        for r in poison:
            print(f"  poisoned cluster {r['run']} class {r['class']}: {r['size']} samples, {r['poisoned']:.1%} "
                  f"poisoned, agreement {r['agreement']:.3f}, diversity {r['diversity']:.3f}")


if __name__ == "__main__":
    main()
