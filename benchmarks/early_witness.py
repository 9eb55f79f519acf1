"""The early model's word on a saved run (issue 6, session 36; measured, nothing adopted).

QT seeds its quarantine with what the K-way model fits fastest. The other end of the same early model is the
classic label-noise witness: a relabelled image whose trigger the network has not learned yet is labelled as its
source class, at a high loss. For each saved run (detection.py's or heldout.py's --save-logits) this trains the
scan's K-way model again (benchmarks/loss_dynamics.py: the run's scan seed, --epochs, default the scan's 4) and
prints

- the whole set: AUROC of each epoch's log-loss (poison over clean) and of their mean; the share of the poisoned
  and of the clean images the early model labels otherwise than their label;
- the same within each class (`qt.relative_log_loss`, the pre-quarantine rule's measure: each epoch's log-loss less
  its class's median, averaged; the rule takes its low end): AUROC, and the share of the poison over the clean
  images' 99 % quantile of it (set with the truth: no bar a scan could set does better at 1 % FPR);
- label noise: the images that the early model, in every epoch, labels as their pixel neighbours' most common
  other class and whose neighbours carry their own label at most 30 % of the time: poisoned / clean;
- in each class the run's read-out (today's defaults, benchmarks/readout.py) flags and where it leaves poison
  unflagged: AUROC of the mean early log-loss between its unflagged poisoned and clean members, over all of them
  and over those that look like other classes (step 3's pixel test).

    python benchmarks/early_witness.py benchmarks/results/s32held1/gamma-0.1-20000-cpu-s1.logits.npz
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

from loss_dynamics import train_k_way  # noqa: E402
from readout import area, figures, load_run  # noqa: E402

from qtclean import QTConfig, qt, readout  # noqa: E402
from qtclean.content import neighbour_labels  # noqa: E402
from qtclean.engine import resolve_device  # noqa: E402

LABEL_NOISE_MAX_OWN_SHARE = 0.3  # as step 3's trigger-free rule: neighbours that carry the label this rarely


def witness(path: Path, epochs: int, device: torch.device) -> list[str]:
    run = load_run(path)
    truth, labels = run.truth, run.labels.numpy()
    n, k = len(labels), int(labels.max()) + 1
    scores, flagged = (x.numpy() for x in run.read_out(QTConfig()))
    predictions: list[np.ndarray] = []
    _, _, log_losses, _ = train_k_way(run.dataset, device, epochs, seed=run.record["seed"],
                                      on_epoch=lambda _epoch, logits: predictions.append(
                                          logits.argmax(1).cpu().numpy()))
    losses = log_losses.cpu().numpy()
    mean_loss = losses.mean(0)
    relabelled_early = np.stack([p != labels for p in predictions])

    def otherwise(group: np.ndarray) -> str:
        return str(relabelled_early[:, group].mean(1).round(2).tolist()) if group.any() else "-"

    rows = [f"read out today: {figures(scores, flagged, truth)}",
            "log-loss AUROC by epoch " + " ".join(area(x, truth, 3) for x in losses)
            + f", mean {area(mean_loss, truth, 3)}"
            f"; labelled otherwise: poison {otherwise(truth)}, clean {otherwise(~truth)}"]

    if truth.any() and not truth.all():
        within = qt.relative_log_loss(log_losses, run.labels, k).cpu().numpy()
        rows.append(f"within class: AUROC {area(within, truth, 3)}, poison over the clean 99 % quantile "
                    f"{(within[truth] > np.quantile(within[~truth], 0.99)).mean():.3f}")

    embedding = run.pixel_content()[0]
    neighbours = neighbour_labels(embedding, run.labels, torch.arange(n), torch.zeros(n, dtype=torch.bool)).numpy()
    counts = np.stack([(neighbours == c).sum(1) for c in range(k)], 1)
    own_share = counts[np.arange(n), labels] / neighbours.shape[1]
    counts[np.arange(n), labels] = -1
    pixel_class = counts.argmax(1)
    noise = np.all([p == pixel_class for p in predictions], axis=0) & (pixel_class != labels)
    noise &= own_share <= LABEL_NOISE_MAX_OWN_SHARE
    rows.append(f"label noise (early label = pixel class in every epoch): poison {int((noise & truth).sum())} of "
                f"{int(truth.sum())}, clean {int((noise & ~truth).sum())}")

    for c in np.flatnonzero(np.bincount(labels[flagged], minlength=k)):
        unflagged = np.flatnonzero(~flagged & (labels == c))
        poisoned = truth[unflagged]
        if not poisoned.any():
            continue
        looks_other = readout._looks_relabelled(embedding, run.labels, torch.from_numpy(unflagged),
                                                torch.from_numpy(flagged)).numpy()
        rows.append(f"class {c}: unflagged poison {int(poisoned.sum())}, clean {int((~poisoned).sum())}; mean early "
                    f"log-loss AUROC {area(mean_loss[unflagged], poisoned, 3)}, among the "
                    f"{int(looks_other.sum())} that look like other classes "
                    f"{area(mean_loss[unflagged][looks_other], poisoned[looks_other], 3)}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logits", nargs="+", type=Path, help="RESULT.logits.npz files (detection.py --save-logits)")
    ap.add_argument("--epochs", type=int, default=QTConfig().epochs_pre, help="K-way epochs (the scan's: 4)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    for path in args.logits:
        print(f"{path.name}\n  " + "\n  ".join(witness(path, args.epochs, device)), flush=True)


if __name__ == "__main__":
    main()
