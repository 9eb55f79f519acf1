"""Detection benchmark over the attack lab (issues 4 and 6): Fashion-MNIST subsets, every attack, QT variants.

Each cell poisons a seeded Fashion-MNIST training subset in memory (`qtclean.attacks.lab.poison`, the same
code as `qtclean poison`; target class 0, poison seed 2 unless `--poison-seeds` names other draws), puts it in
class order (the order `qtclean scan` reads an image folder in, so a cell here gives the same scores as the CLI
on the same images and device), runs `qtclean.scan` and scores it against the truth.
Unlike benchmarks/patch_detection.py it skips writing and decoding PNGs, so a sweep spends its time training.

    python benchmarks/detection.py                                   # every attack at 10 %, badnets sweep, clean
    python benchmarks/detection.py --attacks badnets,sig --rates 0.1 --variants default,paper
    python benchmarks/detection.py --variants 'default,g60={"grow_threshold": 0.6}' --device cuda
    python benchmarks/detection.py --methods qt,loss,ss,ac          # QT next to the baseline detectors
    python benchmarks/detection.py --attacks iab --poison-seeds 2,3,4   # several draws of one attack

A variant of QT is `default` (QTConfig()), `paper` (QTConfig.paper()) or NAME=JSON (QTConfig overrides on the
default); the baselines (`--methods loss,ss,ac`, qtclean.baselines) run with their defaults. Results are kept
per cell and variant in --results (a finished cell is not re-run unless its settings changed; --rerun forces),
so an interrupted sweep resumes (--save-scores keeps each cell's per-sample scores too, --save-logits its final
model's logits for benchmarks/readout.py). The table is printed as
Markdown at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from fmnist import CLASSES, as_rgb32, subset  # noqa: E402

from qtclean import Dataset, QTConfig, TrainConfig, scan  # noqa: E402
from qtclean.baselines import BaselineConfig  # noqa: E402
from qtclean.engine import PRECISIONS  # noqa: E402
from qtclean.attacks.lab import poison  # noqa: E402
from qtclean.metrics import auroc, detection_rates  # noqa: E402

DEFAULT_CELLS = ([(a, 0.1) for a in ["badnets", "checker", "trojan", "blend-noise", "blend-image", "sig",
                                     "badnets-a2a", "badnets-cl", "wanet", "adaptive-blend", "adaptive-patch",
                                     "iab", "issba"]]
                 + [("badnets", r) for r in (0.2, 0.05, 0.01, 0.005)] + [("none", 0.0)])


def parse_variants(text: str) -> dict[str, QTConfig]:
    out = {}
    for item in filter(None, (s.strip() for s in _split_top_level(text))):
        if item == "default":
            out[item] = QTConfig()
        elif item == "paper":
            out[item] = QTConfig.paper()
        else:
            name, _, overrides = item.partition("=")
            out[name] = QTConfig(**json.loads(overrides))
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside braces (variant JSON contains commas)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


POISON_SEED = 2  # the draw every table in docs/benchmarks.md uses unless it names another


def draw_tag(poison_seed: int) -> str:
    """Result-file suffix of a poisoning draw ("" for the default draw, so earlier results keep their names)."""
    return "" if poison_seed == POISON_SEED else f"-p{poison_seed}"


def make_cell(n: int, attack: str, rate: float, fmt: str = "folder",
              poison_seed: int = POISON_SEED) -> tuple[Dataset, np.ndarray]:
    """The poisoned subset as `qtclean scan` would read it: ``folder`` = 1x28x28 in class order (ImageFolder);
    ``cifar`` = padded to 3x32x32 RGB before poisoning (triggers scale with the image) in file order.
    ``poison_seed`` draws the poisoned samples, cover samples and (iab, issba) the trigger network's training."""
    dataset, truth, _trigger = make_cell_with_trigger(n, attack, rate, fmt, poison_seed)
    return dataset, truth


@functools.lru_cache(maxsize=1)  # the methods of one cell share it (a learned trigger trains for a minute)
def make_cell_with_trigger(n: int, attack: str, rate: float, fmt: str = "folder", poison_seed: int = POISON_SEED):
    """:func:`make_cell`, plus the trained trigger network of a learned attack (iab, issba; else None)."""
    images, labels = subset(n, seed=1)
    if fmt == "cifar":
        images = as_rgb32(images)
    poisoned = poison(images, labels, len(CLASSES), attack=attack, rate=rate, target=0, seed=poison_seed)
    images, labels, truth, trigger = poisoned.images, poisoned.labels, poisoned.poisoned, poisoned.trigger
    if fmt == "cifar":
        ids = [f"data_batch_{1 + i * 5 // n}:{i - (i * 5 // n) * (n // 5)}" for i in range(n)]
        return Dataset(images=np.ascontiguousarray(images), labels=labels.astype(np.int64), indices=np.arange(n),
                       ids=ids, classes=list(CLASSES), format="cifar", root="<memory>", num_total=n), truth, trigger
    order = np.argsort(labels, kind="stable")
    images, labels, truth = np.ascontiguousarray(images[order]), labels[order], truth[order]
    ids = [f"{CLASSES[y]}/{i:05d}.png" for i, y in zip(order, labels)]
    dataset = Dataset(images=images, labels=labels.astype(np.int64), indices=np.arange(n), ids=ids,
                      classes=list(CLASSES), format="folder", root="<memory>", num_total=n)
    return dataset, truth, trigger


SAVE_SCORES_HELP = "also keep each cell's per-sample scores, flags, labels and truth (.npz beside its result)"


def save_scores(path: Path, result, labels: np.ndarray, truth: np.ndarray) -> None:
    """A cell's per-sample scores, flags, labels and truth as .npz beside its result, to look into it offline
    (e.g. what another threshold or score rule would give) without training again."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, scores=result.scores, flagged=result.flagged, labels=labels, truth=truth)
    tmp.replace(path)


SAVE_LOGITS_HELP = ("also keep each qt cell's final quarantine-model logits, pre-quarantine set and epochs "
                    "(.logits.npz beside its result), to read the model out again with other step-3 settings "
                    "(benchmarks/readout.py)")


def save_logits(path: Path, result, dataset: Dataset, truth: np.ndarray) -> None:
    """The final model's logits (N, 2K) on the whole set (recomputed on the CPU in fp32; where the scan read an
    average of its last epochs, ``readout_epochs``, that average as it read it, and the final model's beside it as
    ``final_logits``), the pre-quarantine set and the per-epoch statistics: everything ``qtclean.scan.read_out``
    needs besides the images, which the cell rebuilds."""
    from qtclean.engine import predict, put_on_device

    data = put_on_device(dataset.images, dataset.labels, torch.device("cpu"))
    with torch.no_grad():
        final = predict(result.model, data).numpy()
    # an averaging run keeps the final model's logits too: one scan replays both read-outs
    kept = {"logits": result.readout_logits, "final_logits": final} if "readout_epochs" in result.extra \
        else {"logits": final}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **kept, pre_quarantine=result.pre_quarantine, labels=dataset.labels,
                        truth=truth, epochs=json.dumps(result.epochs))
    tmp.replace(path)


def run_cell(n: int, attack: str, rate: float, method: str, cfg: QTConfig, device: str, seed: int,
             fmt: str = "folder", poison_seed: int = POISON_SEED, cuda_graphs: bool = True,
             precision: str = "bf16", scores_path: Path | None = None, logits_path: Path | None = None) -> dict:
    dataset, truth = make_cell(n, attack, rate, fmt, poison_seed)
    t0 = time.perf_counter()
    train_config = TrainConfig(device=device, cuda_graphs=cuda_graphs, precision=precision)
    result = scan(dataset, qt_config=cfg, train_config=train_config, seed=seed, method=method,
                  baseline_config=BaselineConfig())
    seconds = time.perf_counter() - t0
    labels = dataset.labels
    if scores_path is not None:
        save_scores(scores_path, result, labels, truth)
    if logits_path is not None and method == "qt":
        save_logits(logits_path, result, dataset, truth)
    counts = np.bincount(labels, minlength=len(CLASSES))
    q_epochs = [e for e in result.epochs if e["phase"] == "quarantine"]
    max_share = max((max(np.array(e["quarantined_per_class"]) / counts) for e in q_epochs), default=float("nan"))
    pre = result.pre_quarantine
    rates = detection_rates(result.flagged, truth)
    return {
        "n": n, "attack": attack, "rate": rate, "seed": seed, "poison_seed": poison_seed, "device": result.device,
        "format": fmt,
        "auroc": auroc(result.scores, truth), **rates,
        "flagged": int(result.flagged.sum()), "flagged_share": float(result.flagged.mean()),
        "pre_quarantine": int(pre.sum()), "pre_quarantine_poison": int((pre & truth).sum()),
        "max_class_share_quarantined": float(max_share),
        "quarantine_epochs": len(q_epochs), "stop_reason": result.stop_reason,
        "second_pass_epochs": sum(e["phase"] == "second pass" for e in result.epochs),
        "releases": sum(len(e["releases"]) for e in q_epochs),
        "withdrawn": {c: v for c, v in result.extra.get("quarantine_ambiguity", {}).items() if v["withdrawn"]},
        "kept_relabelled": {c: v for c, v in result.extra.get("quarantine_ambiguity", {}).items()
                            if v.get("flags_look_relabelled")},
        "score_outliers": result.extra.get("score_outliers", {}),
        "own_looking_flags": result.extra.get("own_looking_flags", {}),
        "confident_lookalikes": result.extra.get("confident_lookalikes", {}),
        "flagged_in_another_quarantine_class": result.extra.get("flagged_in_another_quarantine_class", []),
        "second_pass": result.extra.get("second_pass", {}),
        "seconds": round(seconds, 2), "method": method, "cuda_graphs": cuda_graphs, "precision": precision,
        "config": cfg.to_dict() if method == "qt" else BaselineConfig().to_dict(),
    }


def q_epochs_text(r: dict) -> str:
    """Quarantine epochs, "20+10" when a second pass ran."""
    second = r.get("second_pass_epochs", 0)
    return f"{r['quarantine_epochs']}+{second}" if second else str(r["quarantine_epochs"])


def fmt(x: float, digits: int = 4) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def precision_tag(precision: str, device: str) -> str:
    """The part of a result file's name that says it ran in fp32 on a GPU (bf16 is the default; a CPU is fp32)."""
    return "-fp32" if precision == "fp32" and device != "cpu" else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="subset size (default 20000)")
    ap.add_argument("--attacks", help="comma list (default: every lab attack at --rates, plus the badnets rate "
                                      "sweep and the clean control)")
    ap.add_argument("--rates", default="0.1")
    ap.add_argument("--variants", default="default", help="QT variants (see above)")
    ap.add_argument("--methods", default="qt", help="comma list of qt, loss, ss, ac")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="the scan's seed")
    ap.add_argument("--poison-seeds", default=str(POISON_SEED),
                    help=f"comma list of poisoning draws per cell (default {POISON_SEED})")
    ap.add_argument("--format", choices=["folder", "cifar"], default="folder",
                    help="cifar: the subset as a 3x32x32 RGB CIFAR-format set (padded, gray in every channel)")
    ap.add_argument("--results", default=str(HERE / "results" / "detection"))
    ap.add_argument("--rerun", action="store_true")
    ap.add_argument("--save-scores", action="store_true", help=SAVE_SCORES_HELP)
    ap.add_argument("--save-logits", action="store_true", help=SAVE_LOGITS_HELP)
    ap.add_argument("--no-cuda-graphs", action="store_true", help="eager training steps on CUDA (engine A/B)")
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16", help="CUDA precision (CPU: fp32)")
    args = ap.parse_args()
    if args.attacks:
        rates = [float(r) for r in args.rates.split(",")]
        cells = [(a, 0.0 if a == "none" else r) for a in args.attacks.split(",") for r in rates]
        cells = list(dict.fromkeys(cells))
    else:
        cells = DEFAULT_CELLS
    runs = []
    for method in args.methods.split(","):
        if method == "qt":
            runs += [(name, "qt", cfg) for name, cfg in parse_variants(args.variants).items()]
        else:
            runs.append((method, method, QTConfig()))
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    cells = [(a, r, p) for a, r in cells for p in (int(x) for x in args.poison_seeds.split(","))]
    for attack, rate, poison_seed in cells:
        for name, method, cfg in runs:
            fmt_tag = (("" if args.format == "folder" else "-cifar") + ("-eager" if args.no_cuda_graphs else "")
                       + precision_tag(args.precision, args.device))
            path = results_dir / (f"{name}-{attack}-{rate}-{args.n}{fmt_tag}-{args.device.replace(':', '')}"
                                  f"-s{args.seed}{draw_tag(poison_seed)}.json")
            expected = cfg.to_dict() if method == "qt" else BaselineConfig().to_dict()
            r = json.loads(path.read_text()) if path.exists() and not args.rerun else None
            if r is None or r.get("config") != expected:  # not run yet, or run with other settings: run it
                r = run_cell(args.n, attack, rate, method, cfg, args.device, args.seed, args.format, poison_seed,
                             cuda_graphs=not args.no_cuda_graphs, precision=args.precision,
                             scores_path=path.with_suffix(".npz") if args.save_scores else None,
                             logits_path=path.with_suffix(".logits.npz") if args.save_logits else None)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(r, indent=2))
                tmp.replace(path)
            r["variant"] = name
            r.setdefault("poison_seed", POISON_SEED)
            rows.append(r)
            print(f"{name:>10} {attack:>12} {rate:>6.3f} p{poison_seed} AUROC {fmt(r['auroc'])} "
                  f"TPR {fmt(r['tpr'], 3)} FPR {fmt(r['fpr'])} flagged {r['flagged']:>5} pre {r['pre_quarantine']:>5} "
                  f"({r['pre_quarantine_poison']} poison) maxQ {fmt(r['max_class_share_quarantined'], 2)} "
                  f"q-epochs {q_epochs_text(r):>5} {r['seconds']:>6.1f}s", flush=True)
    print("\n| method | attack | rate | draw | AUROC | TPR | FPR | flagged | maxQ | q-epochs | time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['attack']} | {r['rate']:g} | {r['poison_seed']} | {fmt(r['auroc'])} | "
              f"{fmt(100 * r['tpr'], 1)} % | "
              f"{fmt(100 * r['fpr'], 2)} % | {r['flagged']} | {fmt(r['max_class_share_quarantined'], 2)} | "
              f"{q_epochs_text(r)} | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
