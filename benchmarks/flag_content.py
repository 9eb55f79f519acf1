"""The evidence behind step 3's unlike-target rule and score scaling (issue 6, session 13), its score outliers
(session 14) and its own-looking flags (session 16): what the pixels of a class's flags look like, and what the
rules make of a finished run.

For each set (named as in benchmarks/pixel_groups.py: ATTACK:RATE:DRAW[:cifar], held:TRIGGER:RATE or
clean:N:SUBSET_SEED[:cifar]) it prints the pixel signature (``content.group_content``: agreement, diversity) of
the poison of each class, no training involved. With ``@RESULT.npz`` (a cell that benchmarks/detection.py or
heldout.py kept with ``--save-scores``, from any device) it also prints the signature of each class's flags and
the run's AUROC / TPR / FPR. A run from before the two rules is replayed: ``readout.withdraw_unlike_target`` and
``readout.demote_withdrawn_scores`` on its flags and scores (the content-seeded classes taken to be the withdrawn
classes with content flags: a kept class's content seed is not in the result file; a run of session 13's trial
code, which recorded ``withdrawn_score_scale`` but not the unlike-target rule, has that scaling undone first, for
the classes its record says it scaled), then ``readout.flag_score_outliers`` and ``readout.own_looking_by_score`` on
the result, in the scan's order. A run that applied a rule says what it did.

    python benchmarks/flag_content.py badnets:0.1:2 badnets-a2a:0.1:2 held:stripes:0.1
    python benchmarks/flag_content.py held:stripes:0.1@benchmarks/results/heldout17/stripes-0.1-20000-cpu-s0.npz
    python benchmarks/flag_content.py --own-looking-flag-z 3 wanet:0.1:4@benchmarks/results/s17/RUN.npz
"""

from __future__ import annotations

import argparse
import json
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


def signature(pixels: torch.Tensor, labels: torch.Tensor, members: torch.Tensor, c: int) -> str:
    stats = content.group_content(pixels, labels, members, c, len(CLASSES))
    return f"{stats['agreement']:.2f}/{stats['diversity']:.2f}"


def rates(scores: np.ndarray, flagged: np.ndarray, truth: np.ndarray) -> str:
    r = detection_rates(flagged, truth)
    return f"{auroc(scores, truth):.4f} / {100 * r['tpr']:.1f} % / {100 * r['fpr']:.2f} %"


def what_acted(info: dict[int, dict]) -> dict[int, str]:
    """Per class that a rule acted on: "unlike N" (withdrawn beside class N's flags) and/or "scaled"."""
    return {c: " ".join((["unlike " + ",".join(map(str, v["unlike_target"]))] if "unlike_target" in v else [])
                        + (["scaled"] if v.get("scores_scaled") else []))
            for c, v in info.items() if "unlike_target" in v or v.get("scores_scaled")}


def replay(pixels: torch.Tensor, labels: torch.Tensor, truth: np.ndarray, saved, result: Path,
           baseline: float, cfg: qt.QTConfig) -> list[str]:
    """Signatures of a run's flags, and its figures without and with step 3's rules that came after it: the two
    rules of session 13 (replayed on a run from before them; read from a run that applied them), the score
    outliers of session 14 and the own-looking flags of session 16 (likewise). ``baseline``: the set's pixel label
    agreement; ``cfg``: the settings the replayed rules run with."""
    record = json.loads(result.with_suffix(".json").read_text())
    flagged, scores = torch.from_numpy(saved["flagged"]), torch.from_numpy(saved["scores"])
    withdrawn = {int(c): v for c, v in record["withdrawn"].items()}
    out = []
    for c in range(len(CLASSES)):
        members = torch.nonzero(flagged & (labels == c)).flatten()
        if members.numel() >= 20:
            out.append(f"flags {c}: {members.numel()} ({int(truth[members.numpy()].sum())} poisoned) "
                       f"{signature(pixels, labels, members, c)}")
    if "withdraw_unlike_target" in record["config"]:  # the run applied the rules: say what they did
        out.append(f"with the rules {rates(saved['scores'], saved['flagged'], truth)} {what_acted(withdrawn)}")
    else:
        scale = record["config"].get("withdrawn_score_scale", 1.0)  # session 13's trial code: undo its scaling
        scaled = [c for c, v in withdrawn.items() if v.get("scores_scaled", True)]  # as recorded, else every class
        raw = torch.where(torch.from_numpy(np.isin(saved["labels"], scaled)) & ~flagged, scores / scale, scores)
        info = {c: dict(v) for c, v in withdrawn.items()}
        after = readout.withdraw_unlike_target(pixels, labels, flagged, info, len(CLASSES), cfg, baseline)
        content_seeded = torch.zeros(len(CLASSES), dtype=torch.bool)
        content_seeded[[c for c, w in withdrawn.items() if w.get("content_flagged")]] = True
        demoted = readout.demote_withdrawn_scores(raw, after, labels, info, content_seeded, cfg.withdrawn_score_scale)
        out.append(f"without the rules {rates(raw.numpy(), flagged.numpy(), truth)}; "
                   f"replayed {rates(demoted.numpy(), after.numpy(), truth)} {what_acted(info)}")
        flagged, scores = after, demoted
        withdrawn = info
    withdrawn_classes = torch.zeros(len(CLASSES), dtype=torch.bool)
    withdrawn_classes[[c for c, v in withdrawn.items() if v.get("withdrawn", True)]] = True
    if "score_outlier_quantile" in record["config"]:
        out.append(f"score outliers (in the run): {record.get('score_outliers', {})}")
    else:
        completed, info = readout.flag_score_outliers(scores, flagged, labels, len(CLASSES), pixels, cfg, baseline)
        added = torch.nonzero(completed & ~flagged).flatten().numpy()
        out.append(f"score outliers replayed: +{int(truth[added].sum())} poisoned, +{int((~truth[added]).sum())} "
                   f"clean: {rates(scores.numpy(), completed.numpy(), truth)} {info}")
        flagged = completed
    if "own_looking_flag_z" in record["config"]:
        return out + [f"own-looking flags (in the run): {record.get('own_looking_flags', {})}"]
    decided, info = readout.own_looking_by_score(scores, flagged, labels, len(CLASSES), pixels, cfg, baseline,
                                                 withdrawn_classes)
    gone = torch.nonzero(flagged & ~decided).flatten().numpy()
    added = torch.nonzero(decided & ~flagged).flatten().numpy()
    return out + [f"own-looking flags replayed: -{int(truth[gone].sum())} poisoned, -{int((~truth[gone]).sum())} "
                  f"clean, +{int(truth[added].sum())} poisoned, +{int((~truth[added]).sum())} clean: "
                  f"{rates(scores.numpy(), decided.numpy(), truth)} {info}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", help="SET or SET@RESULT.npz")
    ap.add_argument("--own-looking-flag-z", type=float, default=qt.QTConfig().own_looking_flag_z,
                    help="the factor the own-looking flags are replayed with (default: the scan's)")
    args = ap.parse_args()
    for spec, pixels, labels, truth, saved in sets_and_runs(args.sets):
        labels_t = torch.from_numpy(labels).long()
        agreement = content.label_agreement(pixels, labels_t)
        rows = [f"pixel agreement {agreement:.2f}"]
        for c in range(len(CLASSES)):
            members = torch.nonzero(labels_t == c).flatten()[torch.from_numpy(truth[labels == c])]
            if members.numel():
                rows.append(f"poison {c}: {members.numel()} {signature(pixels, labels_t, members, c)}")
        if saved is not None:
            rows += replay(pixels, labels_t, truth, saved, Path(spec.partition("@")[2]), agreement,
                           qt.QTConfig(own_looking_flag_z=args.own_looking_flag_z))
        print(f"{spec}\n  " + "\n  ".join(rows), flush=True)


if __name__ == "__main__":
    main()
