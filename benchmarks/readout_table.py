"""The per-cell table of a read-out variant: ``benchmarks/readout.py``'s output (saved logs) turned into one row per
cell and one column per scan seed, AUROC / TPR % / FPR % (the clean control: the number flagged), **bold** where a
run misses issue 6's goal (AUROC >= 0.99, TPR >= 95 %, FPR <= 1 %; the clean control at most 1 % flagged), and a
count of the runs that meet it, by group. A run scanned with the peak growth (``peak-*``, session 29) stands for
its cell and seed over the same cell's plain scan, as in the tables of docs/benchmarks.md.

    python benchmarks/readout.py $(cat benchmarks/run_lists/one-target.txt) --variants 'NAME={...}' > one.log
    python benchmarks/readout_table.py one.log a2a.log --variant NAME
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rescore import meets_goal  # noqa: E402

from qtclean.attacks.lab import TRIGGERS as LAB  # noqa: E402

LINE = re.compile(r"\s+(\S.*?): (\S+) / ([\d.]+|nan) % / ([\d.]+) % \((\d+) flagged\)")
RUN = re.compile(r"^(?:(default|peak)-)?(.+?)-(\d[\d.]*)-(\d+)-(?:(cifar)-)?cpu-s(\d+)\.logits\.npz$")


def parse(path: Path, variant: str) -> dict[tuple, tuple]:
    """(group, cell, seed) -> (auroc or None, tpr, fpr, flagged, n, from the peak scan) for ``variant``'s lines."""
    out: dict[tuple, tuple] = {}
    run = None
    for line in path.read_text().splitlines():
        match = RUN.match(line.strip())
        if match:
            run = match
            continue
        found = LINE.match(line)
        if run is None or not found or found.group(1) != variant:
            continue
        prefix, name, rate, n, cifar, seed = run.groups()
        group = ("lab" if name in LAB or name == "none" else "held-out") + (", CIFAR format" if cifar else "")
        if name.endswith("-a2a") and name not in LAB:
            group, name = "held-out, all-to-all", name[:-4]
        area = None if found.group(2) == "-" else float(found.group(2))
        tpr = 0.0 if found.group(3) == "nan" else float(found.group(3))  # the clean control has no poison
        row = (area, tpr, float(found.group(4)), int(found.group(5)), int(n), prefix == "peak")
        key = (group, f"{name} {float(rate) * 100:g} %" if name != "none" else "none (clean)", int(seed))
        if key not in out or row[5]:
            out[key] = row
    return out


def meets(row: tuple) -> bool:
    area, tpr, fpr, flagged, n, _ = row
    if area is None:
        return flagged <= 0.01 * n
    return meets_goal(area, {"tpr": tpr / 100, "fpr": fpr / 100})  # the logs give percentages


def cell_text(row: tuple) -> str:
    area, tpr, fpr, flagged, _, peak = row
    text = f"{flagged} flagged" if area is None else f"{area:.4f} / {tpr:.1f} / {fpr:.2f}"
    return (text if meets(row) else f"**{text}**") + (" +" if peak else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", type=Path, help="benchmarks/readout.py output files")
    ap.add_argument("--variant", required=True, help="the variant's name in the logs, e.g. '(the run)' or NAME")
    args = ap.parse_args()
    runs: dict[tuple, tuple] = {}
    for log in args.logs:
        runs.update(parse(log, args.variant))
    for group in sorted({g for g, _, _ in runs}):
        keys = [k for k in runs if k[0] == group]
        seeds = sorted({s for _, _, s in keys})
        print(f"\n{group}: {sum(meets(runs[k]) for k in keys)} of {len(keys)} runs meet the goal\n")
        print("| cell | " + " | ".join(f"scan seed {s}" for s in seeds) + " |")
        print("|---|" + "---|" * len(seeds))
        for cell in sorted({c for g, c, _ in keys}):
            print(f"| {cell} | " + " | ".join(cell_text(runs[(group, cell, s)]) if (group, cell, s) in runs else "-"
                                               for s in seeds) + " |")


if __name__ == "__main__":
    main()
