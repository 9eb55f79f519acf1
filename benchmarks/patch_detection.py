"""Patch-trigger detection benchmark (issue 3): Fashion-MNIST subsets, poisoned, scanned through the CLI.

For each cell (attack x poison rate x subset size, plus the unpoisoned subsets) it writes the poisoned set as an
image folder, runs `python -m qtclean scan` on it, and scores scores.csv / flagged.csv against the truth.
Collapse check: the largest share of any class that run.json reports quarantined at any quarantine epoch,
compared with that class's poisoned share.

    python benchmarks/patch_detection.py                       # every cell
    python benchmarks/patch_detection.py --sizes 10000 --attacks badnets --rates 0.1

Results are kept per cell in benchmarks/results/patch/ (a finished cell is not re-run; --rerun to force).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from fmnist import CLASSES, subset  # noqa: E402

from qtclean.attacks import poison  # noqa: E402
from qtclean.metrics import auroc, detection_rates  # noqa: E402


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> list[str]:
    """Write images as root/CLASS/NNNNN.png; returns ids in ImageFolder order (matches write order here)."""
    ids = []
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(len(labels)):
        rel = f"{CLASSES[labels[i]]}/{i:05d}.png"
        Image.fromarray(images[i, 0]).save(root / rel, compress_level=1)
        ids.append(rel)
    return ids


def run_cell(n: int, attack: str, rate: float, extra_args: list[str]) -> dict:
    images, labels = subset(n, seed=1)
    if rate > 0:
        images, labels, truth = poison(images, labels, attack=attack, rate=rate, target=0, seed=2)
    else:
        truth = np.zeros(len(labels), bool)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        ids = write_folder(data, images, labels)
        truth_by_id = dict(zip(ids, truth))
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "qtclean", "scan", str(data), "--out", str(run), *extra_args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"scan failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(run / "scores.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        info = json.loads((run / "run.json").read_text())
    score = np.array([float(r["score"]) for r in rows])
    flagged = np.array([r["flagged"] == "1" for r in rows])
    t = np.array([truth_by_id[r["id"]] for r in rows])
    lab = np.array([int(r["label"]) for r in rows])
    counts = np.bincount(lab, minlength=len(CLASSES))
    poison_share = np.bincount(lab[t], minlength=len(CLASSES)) / counts
    q_epochs = [e for e in info["epochs"] if e["phase"] == "quarantine"]
    max_share = max(max(np.array(e["quarantined_per_class"]) / counts) for e in q_epochs)
    final_share = np.array(q_epochs[-1]["quarantined_per_class"]) / counts
    rates = detection_rates(flagged, t)
    return {
        "n": n, "attack": attack if rate > 0 else "none", "rate": rate,
        "auroc": auroc(score, t), **rates, "flagged": int(flagged.sum()), "flagged_share": float(flagged.mean()),
        "max_class_share_quarantined": float(max_share),
        "final_class_share_quarantined": [round(float(x), 4) for x in final_share],
        "poison_share_per_class": [round(float(x), 4) for x in poison_share],
        "wall_seconds": round(wall, 1), "scan_seconds": info["total_seconds"],
        "img_per_s_epoch": round(float(np.median([e["img_per_s"] for e in info["epochs"]])), 1),
        "releases": sum(len(e["releases"]) for e in q_epochs),
        "command": " ".join(["qtclean", "scan", "DATA", "--out", "RUN", *extra_args]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,20000")
    ap.add_argument("--attacks", default="badnets,checker")
    ap.add_argument("--rates", default="0.1,0.05")
    ap.add_argument("--no-clean", action="store_true", help="skip the unpoisoned control subsets")
    ap.add_argument("--results", default=str(HERE / "results" / "patch"))
    ap.add_argument("--rerun", action="store_true")
    ap.add_argument("scan_args", nargs=argparse.REMAINDER, help="extra arguments for qtclean scan, after --")
    args = ap.parse_args()
    extra = [a for a in args.scan_args if a != "--"]
    sizes = [int(s) for s in args.sizes.split(",")]
    cells = [(n, a, float(r)) for n in sizes for a in args.attacks.split(",") for r in args.rates.split(",")]
    if not args.no_clean:
        cells += [(n, "none", 0.0) for n in sizes]
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    print(f"{'n':>6} {'attack':>8} {'rate':>5} {'AUROC':>7} {'TPR':>7} {'FPR':>7} {'flagged':>7} "
          f"{'maxQ':>5} {'time':>7} {'img/s':>7}", flush=True)
    for n, attack, rate in cells:
        path = results_dir / f"{attack}-{rate}-{n}.json"
        if path.exists() and not args.rerun:
            r = json.loads(path.read_text())
        else:
            r = run_cell(n, attack, rate, extra)
            path.write_text(json.dumps(r, indent=2))
        print(f"{n:>6} {r['attack']:>8} {rate:>5.2f} {r['auroc']:>7.4f} {r['tpr']:>7.4f} {r['fpr']:>7.4f} "
              f"{r['flagged']:>7} {r['max_class_share_quarantined']:>5.2f} {r['wall_seconds']:>6.1f}s "
              f"{r['img_per_s_epoch']:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
