"""Step-3 ideas tried on finished runs (issue 6, session 14): what each would have done to a run kept with
``--save-scores`` (benchmarks/detection.py or heldout.py, any device). No training. Three were dropped; the bars
of the fourth (score outliers) are how ``readout.flag_score_outliers``'s default was chosen.

- trim: drop from a class's flags those whose pixel neighbours outside the flags mostly carry the class's label
  (own-label share > 0.5), or, second form, whose neighbours among every other sample do (> 0.7): would it remove
  clean samples a quarantine grew into, and what poison does it cost?
- complete: add to a class whose flags have the all-to-one signature (``qt.content_accepted``) its unflagged
  members that look relabelled (``content.relabelled_members``, lenient source share 0.5).
- rank: AUROC of the run's scores, of every flag ranked above every unflagged sample, and of scores ranked per
  class (robust z: median and MAD of the class's unflagged scores).
- outliers: the unflagged samples of the classes with flags whose ``readout.robust_class_z`` passes a bar, a fixed z
  or a quantile of the same z over the classes without flags, with and without the pixel test of
  ``readout.flag_score_outliers`` (on a run that applied it, the run's own additions count as unflagged again only if
  its record says how many; the figures are meant for runs from before it).

    python benchmarks/step3_trials.py iab:0.1:2@RESULTS/default-iab-0.1-20000-cuda-s0.npz \\
        held:pixels:0.1@RESULTS/pixels-0.1-20000-cuda-s0.npz

Sets are named as in benchmarks/pixel_groups.py. The learned triggers (IAB, ISSBA) are rebuilt on this machine's
CPU, so their poisoned pixels are close to, not the same as, a GPU run's.
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

from fmnist import CLASSES  # noqa: E402
from pixel_groups import sets_and_runs  # noqa: E402

from qtclean import content, qt, readout  # noqa: E402
from qtclean.metrics import auroc, detection_rates  # noqa: E402

TRIM_OWN_SHARE = 0.5  # of the neighbours outside the flags
TRIM_ALL_OWN_SHARE = 0.7  # of the neighbours among every other sample
COMPLETE_SOURCE_SHARE = 0.5


def rates(flagged: np.ndarray, truth: np.ndarray) -> str:
    r = detection_rates(flagged, truth)
    return f"TPR {100 * r['tpr']:.1f} % FPR {100 * r['fpr']:.2f} %"


def per_class_z(scores: np.ndarray, labels: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    out = np.empty_like(scores, dtype=np.float64)
    for c in np.unique(labels):
        rest = scores[(labels == c) & ~flagged]
        median = np.median(rest) if rest.size else 0.0
        mad = (np.median(np.abs(rest - median)) if rest.size else 0.0) + 1e-6
        out[labels == c] = (scores[labels == c] - median) / mad
    return out


def trials(pixels: torch.Tensor, labels: torch.Tensor, truth: np.ndarray, saved) -> list[str]:
    flagged, scores = saved["flagged"], saved["scores"].astype(np.float64)
    flagged_t = torch.from_numpy(flagged)
    rows = [f"run: AUROC {auroc(scores, truth):.4f} {rates(flagged, truth)}"]
    completed = flagged.copy()
    for c in torch.unique(labels[flagged_t]).tolist():
        members = torch.nonzero(flagged_t & (labels == c)).flatten()
        if members.numel() < 20:
            continue
        own = content.own_label_share_outside(pixels, labels, members, flagged_t).numpy()
        dropped, poisoned = members.numpy()[own > TRIM_OWN_SHARE], truth[members.numpy()]
        own_all = content.own_label_share(pixels, labels, members).numpy()  # every other sample a neighbour
        dropped_all = members.numpy()[own_all > TRIM_ALL_OWN_SHARE]
        accepted = qt.content_accepted(content.group_content(pixels, labels, members, c, len(CLASSES)), qt.QTConfig())
        rows.append(f"class {c}: {members.numel()} flags ({int(poisoned.sum())} poisoned, all-to-one signature "
                    f"{'yes' if accepted else 'no'}); trim drops {int(truth[dropped].sum())} poisoned, "
                    f"{int((~truth[dropped]).sum())} clean; against every sample {int(truth[dropped_all].sum())} "
                    f"poisoned, {int((~truth[dropped_all]).sum())} clean")
        if accepted:
            found = content.relabelled_members(pixels, labels, torch.nonzero(labels == c).flatten(),
                                               source_share=COMPLETE_SOURCE_SHARE).numpy()
            added = found[~flagged[found]]
            completed[added] = True
            rows.append(f"  complete adds {int(truth[added].sum())} poisoned, {int((~truth[added]).sum())} clean")
    rows.append(f"complete: {rates(completed, truth)}")
    flags_first = np.where(flagged, 1e6 + scores, scores)
    z = np.where(flagged, 1e6 + scores, per_class_z(scores, saved["labels"], flagged))
    rows.append(f"rank: AUROC flags first {auroc(flags_first, truth):.4f}, per-class z {auroc(z, truth):.4f}")
    return rows + outlier_bars(pixels, labels, truth, torch.from_numpy(scores), flagged_t)


OUTLIER_BARS = [("z", 8.0), ("z", 5.0), ("z", 3.5), ("z", 3.0), ("q", 0.99), ("q", 0.995), ("q", 0.998)]


def outlier_bars(pixels: torch.Tensor, labels: torch.Tensor, truth: np.ndarray, scores: torch.Tensor,
                 flagged: torch.Tensor) -> list[str]:
    """Per bar: the poisoned / clean samples added, without and with the pixel test, and the run's TPR / FPR with
    the pixel test."""
    k = len(CLASSES)
    in_flagged_class = torch.zeros(k, dtype=torch.bool)
    in_flagged_class[torch.unique(labels[flagged])] = True
    reference = ~in_flagged_class[labels]
    if not bool(flagged.any()) or int(reference.sum()) < readout.SCORE_OUTLIER_MIN_REFERENCE:
        return ["outliers: no flags, or too few samples in classes without flags"]
    z = readout.robust_class_z(scores, labels, flagged, k)
    rows = []
    for kind, value in OUTLIER_BARS:
        bar = value if kind == "z" else float(torch.quantile(z[reference], value))
        candidates = torch.nonzero(in_flagged_class[labels] & ~flagged & (z > bar)).flatten()
        own = content.own_label_share_outside(pixels, labels, candidates, flagged)
        passed = candidates[own <= readout.SCORE_OUTLIER_MAX_OWN_SHARE]
        completed = flagged.clone().numpy()
        completed[passed.numpy()] = True

        def count(idx: torch.Tensor) -> str:
            return f"{int(truth[idx.numpy()].sum())}/{int((~truth[idx.numpy()]).sum())}"

        rows.append(f"outliers {kind} {value}: bar {bar:.2f}, adds {count(candidates)} (poisoned/clean), with the "
                    f"pixel test {count(passed)}: {rates(completed, truth)}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="SET@RESULT.npz")
    args = ap.parse_args()
    for spec in args.runs:
        if "@" not in spec:
            sys.exit(f"step3_trials.py: {spec}: name a saved run as SET@RESULT.npz")
    for spec, pixels, labels, truth, saved in sets_and_runs(args.runs):
        rows = trials(pixels, torch.from_numpy(labels).long(), truth, saved)
        print(f"{spec}\n  " + "\n  ".join(rows), flush=True)


if __name__ == "__main__":
    main()
