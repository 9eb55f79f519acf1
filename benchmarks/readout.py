"""Read a saved quarantine model out again with other step-3 settings (issue 6): the scan's own read-out
(``qtclean.scan.read_out``: scores, flags, withdrawals, score rules) on the final logits that
``benchmarks/detection.py --save-logits`` (or heldout.py's) kept, for each variant, next to the run's own figures.

Step 3 reads only the final model's logits, the pre-quarantine set, the epoch statistics and the pixels, so a
variant of it needs no training (a run with ``readout_epochs`` N kept its last N epochs' average and the final
model's logits both, so it replays variants that read either): the cell's images are rebuilt from its result file
(attack, rate, draw, format), and the run's own settings are read out first as a check that the replay gives the
run's flags to the sample. Each line ends with the read-out's time in seconds (the pixel embedding, shared by
the variants, left out). The logits are recomputed on the CPU in fp32 after the scan, so a CPU run replays
exactly; a GPU run (bf16) may differ by a few samples near a boundary, and the check says so. Replay with the
threads the scan had (the CPU runs: 2): ISSBA's cell is made by a network whose last bits, and so a few images,
depend on them.

    python benchmarks/readout.py benchmarks/results/s27/avg3-iab-0.1-20000-cpu-s1.logits.npz \
        --variants 'final={"readout_epochs": 1},default'
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import heldout  # noqa: E402
from detection import make_cell, parse_variants  # noqa: E402

from qtclean import QTConfig  # noqa: E402
from qtclean.content import label_agreement, pixel_embedding  # noqa: E402
from qtclean.metrics import auroc, detection_rates  # noqa: E402
from qtclean.scan import read_out  # noqa: E402


def area(values: np.ndarray, truth: np.ndarray, digits: int = 4) -> str:
    """The AUROC of ``values`` against ``truth``, or "-" where the truth has one side only (the clean control)."""
    return f"{auroc(values, truth):.{digits}f}" if truth.any() and not truth.all() else "-"


def figures(scores: np.ndarray, flagged: np.ndarray, truth: np.ndarray) -> str:
    r = detection_rates(flagged, truth)
    return f"{area(scores, truth)} / {100 * r['tpr']:.1f} % / {100 * r['fpr']:.2f} % ({int(flagged.sum())} flagged)"


@dataclass
class SavedRun:
    """A saved run as step 3 sees it: its record (the result JSON), the rebuilt cell and its truth, the labels,
    pre-quarantine set and epoch statistics the run saved, and its pixel content (built once, on first use)."""

    record: dict
    dataset: object
    truth: np.ndarray
    labels: torch.Tensor
    pre_mask: torch.Tensor
    epochs: list[dict]
    saved: dict
    pixel_content: Callable[[], tuple[torch.Tensor, float]]

    def logits_for(self, cfg: QTConfig) -> torch.Tensor | None:
        """What a variant's step 3 reads: the final model, or the run's own read-out where the variant averages as
        many epochs as the run did; None where this run cannot replay it (it kept no other average)."""
        final = self.saved["final_logits"] if "final_logits" in self.saved else self.saved["logits"]
        if cfg.readout_epochs == 1:  # (only a run that averaged has both)
            return torch.from_numpy(final)
        if cfg.readout_epochs == self.record["config"].get("readout_epochs", 1):
            return torch.from_numpy(self.saved["logits"])
        return None

    def read_out(self, cfg: QTConfig, extra: dict | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The scores and flags step 3 gives with ``cfg`` (what it did goes into ``extra``); None as logits_for."""
        logits = self.logits_for(cfg)
        if logits is None:
            return None
        return read_out(logits, self.labels, self.pre_mask, self.epochs, cfg, self.pixel_content,
                        {} if extra is None else extra, self.dataset.images)


def load_run(logits_file: Path) -> SavedRun:
    """The run behind ``logits_file`` (detection.py's or heldout.py's --save-logits), its cell rebuilt from the
    record and checked against the saved truth."""
    record = json.loads(Path(str(logits_file).replace(".logits.npz", ".json")).read_text())
    saved = dict(np.load(logits_file))
    if "attack" in record:  # benchmarks/detection.py's cell
        dataset, truth = make_cell(record["n"], record["attack"], record["rate"], record["format"],
                                   record["poison_seed"])
    else:  # benchmarks/heldout.py's
        dataset, truth = heldout.make_cell(record["n"], record["base_trigger"], record["rate"],
                                           all_to_all=record["all_to_all"])
    assert np.array_equal(truth, saved["truth"]), f"{logits_file}: the rebuilt cell is not the one saved"
    labels = torch.from_numpy(saved["labels"]).long()

    @functools.cache
    def pixel_content() -> tuple[torch.Tensor, float]:
        embedding = pixel_embedding(dataset.images)
        return embedding, label_agreement(embedding, labels)

    return SavedRun(record, dataset, truth, labels, torch.from_numpy(saved["pre_quarantine"]),
                    json.loads(str(saved["epochs"])), saved, pixel_content)


def class_bound_text(info: dict | None) -> str:
    """What the class-bound block rule (``readout.flag_class_bound_blocks``) did, per class: the carriers of the
    blocks one class holds, and how many of them it flagged."""
    if not info or not info.get("per_class"):
        return ""
    return "; class-bound blocks: " + ", ".join(f"class {c} {v['carriers']} carry, +{v['added']}"
                                                for c, v in info["per_class"].items())


def value_residual_text(info: dict | None) -> str:
    """What the value-residual rule (``readout.flag_value_residual``) saw: the widest gap, and what it added."""
    if not info:
        return ""
    added = sum(info.get("added_per_class", {}).values())
    return f"; value gap {info['widest_gap']:.3f}" + (f", +{added} above {info['bar']:.3f}" if added else "")


def value_move_text(info: dict | None) -> str:
    """What the value-move withdrawal (``readout.withdraw_against_value_move``) saw: the flags' median cosine, and
    the flags it withdrew."""
    if not info:
        return ""
    withdrawn = sum(info.get("withdrawn_per_class", {}).values())
    return f"; value move {info['median_cosine']:.3f}" + (f", -{withdrawn}" if withdrawn else "")


def common_blocks_text(info: dict | None) -> str:
    """What the common-block rule (``readout.flag_common_blocks``) saw: the carriers not yet flagged, how many look
    relabelled, and what it added."""
    if not info or "carriers" not in info:
        return ""
    added = sum(info.get("added_per_class", {}).values())
    return (f"; common blocks {info['positions']}: {info['carriers']} carriers, "
            f"{info.get('look_relabelled', '-')} look relabelled" + (f", +{added}" if added else ""))


def palette_holes_text(info: dict | None) -> str:
    """What the palette rule (``readout.flag_palette_holes``) saw: its core of flags, the holes, and what it
    added."""
    if not info:
        return ""
    added = sum(info.get("added_per_class", {}).values())
    return (f"; palette core {info['core']}" + (f", {info['holes']} holes" if "holes" in info else "")
            + (f", +{added}" if added else ""))


def out_of_frame_text(info: dict | None) -> str:
    """What the framing rule (``readout.flag_out_of_frame``) saw: where the images out of frame start, and how many
    flags it added."""
    if not info:
        return ""
    return ("; out of frame: " + ", ".join(f"{f['images']} from {f['axis']} {f['from']:+d}" for f in info["offsets"])
            + f", +{sum(info['added_per_class'].values())}")


def shared_blocks_text(info: dict | None) -> str:
    """What the exact-trigger rule (``readout.flag_shared_blocks``) did, per class: its flags that carry a shared
    block of pixels, and the flags it withdrew and added."""
    if not info or not info.get("per_class"):
        return ""
    return "; shared blocks: " + ", ".join(f"class {c} {v['carrying']} of {v['flags']} carry, -{v['withdrawn']} "
                                           f"+{v['added']}" for c, v in info["per_class"].items())


def read_again(logits_file: Path, variants: dict[str, QTConfig],
               around: Callable[[str], AbstractContextManager] | None = None) -> list[str]:
    """One line per variant: its AUROC / TPR / FPR and what its rules did, after the run's own line. ``around``
    (a variant's name -> a context manager) wraps a variant's read-out, for a change that is no setting
    (benchmarks/residual_gate.py: a module constant)."""
    run = load_run(logits_file)
    record, truth = run.record, run.truth
    averaged = record["config"].get("readout_epochs", 1)
    scores_file = Path(str(logits_file).replace(".logits.npz", ".npz"))  # --save-scores: the run's own flags
    run_flags = np.load(scores_file)["flagged"] if scores_file.exists() else None
    rows = []
    # a setting the run's record lacks came after it: the run ran without it, as the paper's value does
    run_config = QTConfig(**{**QTConfig.paper().to_dict(), **record["config"]})
    run.pixel_content()  # built once, before the clock: each variant's time is its read-out alone
    for name, cfg in {"(the run)": run_config, **variants}.items():
        extra: dict = {}
        start = time.perf_counter()
        with around(name) if around is not None else nullcontext():
            out = run.read_out(cfg, extra)
        seconds = time.perf_counter() - start
        if out is None:
            rows.append(f"{name:>12}: needs a run that read out the average of {cfg.readout_epochs} epochs "
                        f"(this one: {averaged})")
            continue
        scores, flagged = out[0].numpy(), out[1].numpy()
        withdrawn = [c for c, v in extra["quarantine_ambiguity"].items() if v["withdrawn"]]
        kept = [c for c, v in extra["quarantine_ambiguity"].items() if v.get("flags_look_relabelled")]
        elsewhere = extra.get("flagged_in_another_quarantine_class")
        check = ""
        if name == "(the run)" and run_flags is not None:
            check = " = the run's flags" if np.array_equal(run_flags, flagged) else " DIFFERS from the run's flags"
        rows.append(f"{name:>12}: {figures(scores, flagged, truth)}{check} [{seconds:.2f} s]"
                    + (f"; withdrawn {', '.join(withdrawn)}" if withdrawn else "")
                    + (f"; kept as relabelled {', '.join(map(str, kept))}" if kept else "")
                    + (f"; in another quarantine class {sum(elsewhere)}" if elsewhere else "")
                    + class_bound_text(extra.get("class_bound_blocks"))
                    + shared_blocks_text(extra.get("shared_blocks"))
                    + common_blocks_text(extra.get("common_blocks"))
                    + value_residual_text(extra.get("value_residual"))
                    + value_move_text(extra.get("value_move"))
                    + palette_holes_text(extra.get("palette_holes"))
                    + out_of_frame_text(extra.get("out_of_frame")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logits", nargs="+", type=Path, help="RESULT.logits.npz files (detection.py --save-logits)")
    ap.add_argument("--variants", default="default", help="as detection.py's: default, paper or NAME=JSON")
    args = ap.parse_args()
    variants = parse_variants(args.variants)
    for path in args.logits:
        print(f"{path.name}\n  " + "\n  ".join(read_again(path, variants)), flush=True)


if __name__ == "__main__":
    main()
