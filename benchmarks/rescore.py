"""The flag-ranked scores (``readout.flag_ranked_scores``, issue 6) on saved runs: each run's AUROC with the scores it
saved and with those scores ranked by its flags, and whether the run meets issue 6's goal either way.

The rule is the last step of the read-out and changes no flag, so it applies exactly to any saved result file of
benchmarks/detection.py or heldout.py (``--save-scores``: scores, flags, labels, truth) that was scanned with
``--model-scores`` or before the rule existed (session 28); a file scanned with the rule already is skipped.

    python benchmarks/rescore.py benchmarks/results/*/*.npz         # every saved run; *.logits.npz are skipped
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qtclean import readout  # noqa: E402
from qtclean.metrics import auroc, detection_rates  # noqa: E402


def meets_goal(area: float, rates: dict) -> bool:
    """Issue 6's goal for one run: AUROC >= 0.99, TPR >= 95 %, FPR <= 1 %."""
    return area >= 0.99 and rates["tpr"] >= 0.95 and rates["fpr"] <= 0.01


def scanned_with_rule(result_file: Path) -> bool:
    record = result_file.with_suffix(".json")
    if not record.is_file():
        return False
    return bool(json.loads(record.read_text()).get("config", {}).get("flag_ranked_scores", False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--all", action="store_true", help="print every run, not only those whose AUROC moved")
    args = parser.parse_args()
    runs, met_before, met_after = 0, 0, 0
    print("| run | AUROC, saved scores | AUROC, flag-ranked | TPR | FPR | goal |")
    print("|---|---|---|---|---|---|")
    for path in sorted(args.files):
        if path.name.endswith(".logits.npz") or scanned_with_rule(path):
            continue
        saved = np.load(path)
        if "scores" not in saved.files or not saved["truth"].any() or saved["truth"].all():
            continue
        scores, flagged, labels, truth = (saved[k] for k in ("scores", "flagged", "labels", "truth"))
        ranked = readout.flag_ranked_scores(torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(flagged),
                                            torch.from_numpy(labels.astype(np.int64)), int(labels.max()) + 1)[0].numpy()
        rates = detection_rates(flagged, truth)
        before, after = auroc(scores, truth), auroc(ranked, truth)
        goal_before, goal_after = meets_goal(before, rates), meets_goal(after, rates)
        runs, met_before, met_after = runs + 1, met_before + goal_before, met_after + goal_after
        if args.all or abs(after - before) >= 0.0005 or goal_before != goal_after:
            goal = {(True, True): "yes", (False, False): "no", (False, True): "**gained**", (True, False): "**lost**"}
            run = str(path.with_suffix("")).removeprefix("benchmarks/results/")
            print(f"| {run} | {before:.4f} | {after:.4f} | {100 * rates['tpr']:.1f} % | {100 * rates['fpr']:.2f} % | "
                  f"{goal[goal_before, goal_after]} |")
    print(f"\n{runs} runs: {met_before} meet the goal with the saved scores, {met_after} with flag-ranked scores")


if __name__ == "__main__":
    main()
