"""What led to the value-residual rule (issue 6, session 38; ``readout.flag_value_residual``, now a default).
The trigger residual of step 3 compares pixels at their positions, which a filter (gamma, posterize, a frequency
pattern) moves differently in every image; what a filter keeps from image to image is how it moves the values.
So each image is its histogram of non-background values (256 bins, square root, unit sum before it), less the
mean of its class's unflagged images; the flags' mean of that residual is the filter's direction; and each
unflagged image is ranked by its residual's cosine with it. Prints, per saved run read out with today's defaults
less that rule, how well that ranks the unflagged poison (AUROC) and what flagging the unflagged images at or
above a quantile of the flags' own cosines would give (TPR / FPR, %): no such bar holds; the rule's gap does.

    python benchmarks/value_residual.py $(cat benchmarks/run_lists/all-to-all.txt)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from readout import load_run  # noqa: E402

from qtclean import QTConfig  # noqa: E402
from qtclean.content import value_counts, value_histograms  # noqa: E402
from qtclean.metrics import auroc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logits", nargs="+", help="saved runs (detection.py's or heldout.py's --save-logits)")
    ap.add_argument("--quantiles", default="0.1,0.25,0.5", help="bars: quantiles of the flags' cosines")
    args = ap.parse_args()
    for path in args.logits:
        run = load_run(Path(path))
        flagged = run.read_out(QTConfig(value_residual_gap=0.0))[1].numpy()  # the flags the rule starts from
        truth, labels = run.truth, run.labels.numpy()
        name = Path(path).name
        if not flagged.any():
            print(f"{name}: no flag, no direction")
            continue
        hist = value_histograms(value_counts(run.dataset.images))
        means = np.stack([hist[(labels == c) & ~flagged].mean(0) if ((labels == c) & ~flagged).any()
                          else np.zeros(256) for c in range(int(labels.max()) + 1)])
        residual = hist - means[labels]
        direction = residual[flagged].mean(0)
        cosine = residual @ direction / np.maximum(np.linalg.norm(residual, axis=1) * np.linalg.norm(direction),
                                                   1e-12)
        rest = ~flagged
        parts = [f"now {100 * (flagged & truth).sum() / truth.sum():.1f} / "
                 f"{100 * (flagged & ~truth).sum() / (~truth).sum():.2f}"]
        for q in (float(x) for x in args.quantiles.split(",")):
            more = flagged | (rest & (cosine >= np.quantile(cosine[flagged], q)))
            parts.append(f"q{q:g}: {100 * (more & truth).sum() / truth.sum():.1f} / "
                         f"{100 * (more & ~truth).sum() / (~truth).sum():.2f}")
        ranked = auroc(cosine[rest], truth[rest]) if truth[rest].any() and not truth[rest].all() else float("nan")
        print(f"{name}: {int(flagged.sum())} flags; unflagged poison ranked at AUROC {ranked:.4f}; "
              + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
