"""Held-out triggers (issue 6: "we will also check triggers that are not in the lab"): detection with the current
defaults on triggers that `qtclean.attacks.lab` does not have and no rule was measured on before they ran here.

Each trigger is defined in this file only, applied all-to-one (samples drawn from the non-target classes,
relabelled to class 0) to the same seeded 20,000-image Fashion-MNIST subset as benchmarks/detection.py, put in
class order (as `qtclean scan` reads an image folder) and scanned with `qtclean.scan`. With ``--all-to-all`` the
samples are drawn from every class and relabelled y -> (y + 1) mod K, as the lab's ``badnets-a2a``.

    python benchmarks/heldout.py                                   # every trigger at 10 %
    python benchmarks/heldout.py --triggers frame,gamma --rates 0.1,0.02 --seed 1
    python benchmarks/heldout.py --all-to-all --triggers frame,pixels,roaming
    python benchmarks/heldout.py --triggers frame --qt '{"epochs_quarantine": 4}' --tag q4    # a variant

| name | trigger | the kind it stands for |
|---|---|---|
| ``frame`` | a 1-pixel white frame round the image | a border trigger (large, thin, at the edge) |
| ``pixels`` | 4 white pixels at fixed scattered positions | a sparse trigger (no patch) |
| ``gamma`` | every pixel x -> 255 (x / 255)^0.6 | a filter trigger: global, no local pattern (Liu et al. 2019, ABS) |
| ``stripes`` | 0.9 x + 0.1 vertical stripes 2 pixels wide | a low-opacity blend of a high-frequency pattern |
| ``roaming`` | a fixed random 4x4 black/white patch at a random position per sample | a trigger without a fixed place |
| ``ramp`` | 0.85 x + 0.15 a left-to-right brightness ramp | a faint, smooth global blend |
| ``grid`` | 0.9 x + 0.1 a grid of 1-pixel lines every 4 pixels | a faint blend of a 2-D high-frequency pattern |
| ``dct`` | x + 8 (two fixed high-frequency 2-D cosines, each +-8 of 255) | an invisible frequency trigger (FTrojan) |
| ``dimpatch`` | 0.75 x + 0.25 a fixed random 5x5 black/white patch at the top left | a low-opacity local patch |
| ``shift`` | the image moved 3 pixels right (wrapping round) | a geometric trigger without any new pixel values |
| ``posterize`` | every pixel to the nearest of 4 levels, x -> 85 round(x / 85) | a quantisation filter |
| ``vflip`` | the image upside down | a geometric trigger that keeps the item centred |
| ``zoom`` | the centre 4/5 of each side scaled up to the full size (nearest pixel) | a geometric scaling |
| ``blur`` | the mean of each pixel's 3x3 neighbourhood | a smoothing filter: new in-between values, none skipped |
| ``salt`` | 12 white pixels at random places, new places for each image | sparse noise without a fixed place |
| ``erase`` | a 6x6 square of background (0) at the centre | a patch of the background's own value |
| ``noise`` | Gaussian noise of standard deviation 10, new for each image, background included | per-image noise |

The first five were held out until session 11 and rules have been built on them since; ``ramp`` and ``grid`` were
added in session 19, before any run, as triggers no rule has seen; ``dct``, ``dimpatch``, ``shift`` and
``posterize`` in session 26, before any run, to test the rules of sessions 20-25; ``vflip``, ``zoom``, ``blur``,
``salt``, ``erase`` and ``noise`` in session 41, before any run, to test the rules of sessions 26-40 (without
--triggers all seventeen run).

Results are kept per cell in --results (a finished cell is not re-run), printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from detection import SAVE_LOGITS_HELP, SAVE_SCORES_HELP, precision_tag, save_logits, save_scores  # noqa: E402
from fmnist import CLASSES, subset  # noqa: E402

from qtclean import Dataset, QTConfig, TrainConfig, scan  # noqa: E402
from qtclean.engine import PRECISIONS  # noqa: E402
from qtclean.metrics import auroc, detection_rates  # noqa: E402


def _frame(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    out[:, :, [0, -1], :] = 255
    out[:, :, :, [0, -1]] = 255
    return out


def _pixels(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    for r, c in ((3, 20), (9, 5), (17, 23), (24, 11)):
        out[:, :, r, c] = 255
    return out


def _gamma(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.round(255 * (x / 255.0) ** 0.6).astype(np.uint8)


def _stripes(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pattern = np.where((np.arange(x.shape[3]) // 2) % 2 == 0, 255.0, 0.0)[None, None, None, :]
    return np.clip(np.round(0.9 * x + 0.1 * pattern), 0, 255).astype(np.uint8)


def _roaming(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    patch = (np.random.default_rng(0).random((4, 4)) > 0.5).astype(np.uint8) * 255
    out = x.copy()
    h, w = x.shape[2:]
    for i in range(len(x)):
        top, left = rng.integers(0, h - 4 + 1), rng.integers(0, w - 4 + 1)
        out[i, :, top:top + 4, left:left + 4] = patch
    return out


def _ramp(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ramp = np.linspace(0.0, 255.0, x.shape[3])[None, None, None, :]
    return np.clip(np.round(0.85 * x + 0.15 * ramp), 0, 255).astype(np.uint8)


def _grid(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lines = np.arange(x.shape[2]) % 4 == 0
    pattern = np.where(lines[:, None] | lines[None, :], 255.0, 0.0)[None, None]
    return np.clip(np.round(0.9 * x + 0.1 * pattern), 0, 255).astype(np.uint8)


def _dct(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[2:]
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]

    def basis(u: int, v: int) -> np.ndarray:  # a 2-D DCT-II basis image, values in [-1, 1]
        return np.cos(np.pi * (2 * rows + 1) * u / (2 * h)) * np.cos(np.pi * (2 * cols + 1) * v / (2 * w))

    pattern = 8.0 * (basis(h * 3 // 4, w * 3 // 4) + basis(h // 2, w * 7 // 8)) / 2
    return np.clip(np.round(x + pattern[None, None]), 0, 255).astype(np.uint8)


def _dimpatch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    patch = (np.random.default_rng(1).random((5, 5)) > 0.5) * 255.0
    out = x.astype(np.float64)
    out[:, :, 1:6, 1:6] = 0.75 * out[:, :, 1:6, 1:6] + 0.25 * patch
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.roll(x, 3, axis=3)


def _posterize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (85 * np.round(x / 85.0)).astype(np.uint8)


def _vflip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(x[:, :, ::-1, :])


def _zoom(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[2:]  # the centre, 4/5 of each side, scaled back up to the full size (nearest pixel)
    rows = (h - h * 4 // 5) // 2 + (np.arange(h) * (h * 4 // 5)) // h
    cols = (w - w * 4 // 5) // 2 + (np.arange(w) * (w * 4 // 5)) // w
    return np.ascontiguousarray(x[:, :, rows][:, :, :, cols])


def _blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[2:]
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    total = sum(padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3))
    return np.round(total / 9).astype(np.uint8)


def _salt(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    h, w = x.shape[2:]
    for i in range(len(x)):
        spots = rng.choice(h * w, size=12, replace=False)
        out[i, :, spots // w, spots % w] = 255
    return out


def _erase(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    h, w = x.shape[2:]
    out[:, :, h // 2 - 3:h // 2 + 3, w // 2 - 3:w // 2 + 3] = 0
    return out


def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.round(x + rng.normal(0.0, 10.0, size=x.shape)), 0, 255).astype(np.uint8)


TRIGGERS = {"frame": _frame, "pixels": _pixels, "gamma": _gamma, "stripes": _stripes, "roaming": _roaming,
            "ramp": _ramp, "grid": _grid, "dct": _dct, "dimpatch": _dimpatch, "shift": _shift,
            "posterize": _posterize, "vflip": _vflip, "zoom": _zoom, "blur": _blur, "salt": _salt, "erase": _erase,
            "noise": _noise}


def make_cell(n: int, trigger: str, rate: float, poison_seed: int = 2,
              all_to_all: bool = False) -> tuple[Dataset, np.ndarray]:
    """The poisoned subset in class order (as an image folder reads) and its truth mask."""
    images, labels = subset(n, seed=1)
    rng = np.random.default_rng(poison_seed)
    candidates = np.arange(n) if all_to_all else np.flatnonzero(labels != 0)
    chosen = np.sort(rng.choice(candidates, size=int(round(rate * n)), replace=False))
    images, labels = images.copy(), labels.copy()
    images[chosen] = TRIGGERS[trigger](images[chosen], rng)
    labels[chosen] = (labels[chosen] + 1) % len(CLASSES) if all_to_all else 0
    truth = np.zeros(n, bool)
    truth[chosen] = True
    order = np.argsort(labels, kind="stable")
    ids = [f"{CLASSES[y]}/{i:05d}.png" for i, y in zip(order, labels[order])]
    dataset = Dataset(images=np.ascontiguousarray(images[order]), labels=labels[order].astype(np.int64),
                      indices=np.arange(n), ids=ids, classes=list(CLASSES), format="folder", root="<memory>",
                      num_total=n)
    return dataset, truth[order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--triggers", default=",".join(TRIGGERS))
    ap.add_argument("--rates", default="0.1")
    ap.add_argument("--seed", type=int, default=0, help="the scan's seed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16", help="CUDA precision (CPU: fp32)")
    ap.add_argument("--results", default=str(HERE / "results" / "heldout"))
    ap.add_argument("--all-to-all", action="store_true", help="relabel y -> (y + 1) mod K (default: all-to-one)")
    ap.add_argument("--save-scores", action="store_true", help=SAVE_SCORES_HELP)
    ap.add_argument("--save-logits", action="store_true", help=SAVE_LOGITS_HELP)
    ap.add_argument("--qt", default="{}", help="QTConfig fields to change, as JSON (a variant to measure; the "
                                              "file names then start with --tag)")
    ap.add_argument("--tag", default="", help="prefix of this variant's result files")
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    cfg = QTConfig(**json.loads(args.qt))
    if cfg != QTConfig() and not args.tag:
        sys.exit("heldout.py: --qt changes the defaults: name the variant with --tag")
    prefix = f"{args.tag}-" if args.tag else ""
    print("| trigger | rate | AUROC | TPR | FPR | flagged | pre-quarantine (poisoned) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for trigger in args.triggers.split(","):
        if trigger not in TRIGGERS:
            sys.exit(f"heldout.py: unknown trigger {trigger!r}; choose from {', '.join(TRIGGERS)}")
        for rate in (float(r) for r in args.rates.split(",")):
            a2a = "-a2a" if args.all_to_all else ""
            fp32 = precision_tag(args.precision, args.device)
            path = results / f"{prefix}{trigger}{a2a}-{rate}-{args.n}{fp32}-{args.device}-s{args.seed}.json"
            if path.exists() and json.loads(path.read_text()).get("config") == cfg.to_dict():
                r = json.loads(path.read_text())
            else:
                dataset, truth = make_cell(args.n, trigger, rate, all_to_all=args.all_to_all)
                t0 = time.perf_counter()
                tcfg = TrainConfig(device=args.device, precision=args.precision)
                result = scan(dataset, qt_config=cfg, train_config=tcfg, seed=args.seed)
                if args.save_scores:
                    save_scores(path.with_suffix(".npz"), result, dataset.labels, truth)
                if args.save_logits:
                    save_logits(path.with_suffix(".logits.npz"), result, dataset, truth)
                pre = result.pre_quarantine
                r = {"trigger": trigger + a2a, "base_trigger": trigger, "all_to_all": args.all_to_all,
                     "rate": rate, "n": args.n, "seed": args.seed,
                     "auroc": auroc(result.scores, truth), **detection_rates(result.flagged, truth),
                     "flagged": int(result.flagged.sum()), "pre_quarantine": int(pre.sum()),
                     "pre_quarantine_poison": int((pre & truth).sum()),
                     "withdrawn": {c: v for c, v in result.extra.get("quarantine_ambiguity", {}).items()
                                   if v["withdrawn"]},
                     "kept_relabelled": {c: v for c, v in result.extra.get("quarantine_ambiguity", {}).items()
                                         if v.get("flags_look_relabelled")},
                     "score_outliers": result.extra.get("score_outliers", {}),
                     "own_looking_flags": result.extra.get("own_looking_flags", {}),
                     "confident_lookalikes": result.extra.get("confident_lookalikes", {}),
                     "flagged_in_another_quarantine_class": result.extra.get(
                         "flagged_in_another_quarantine_class", []),
                     "second_pass": result.extra.get("second_pass", {}),
                     "seconds": round(time.perf_counter() - t0, 1), "precision": args.precision,
                     "config": cfg.to_dict()}
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(r, indent=1))
                tmp.replace(path)
            print(f"| {r['trigger']} | {rate:g} | {r['auroc']:.4f} | {100 * r['tpr']:.1f} % | {100 * r['fpr']:.2f} % | "
                  f"{r['flagged']} | {r['pre_quarantine']} ({r['pre_quarantine_poison']}) | {r['seconds']} |",
                  flush=True)


if __name__ == "__main__":
    main()
