"""Does each lab attack work as a backdoor? Attack success rate of a plainly trained model (issue 4).

For each attack: poison a Fashion-MNIST training subset (as benchmarks/detection.py does), train the default model
with hard labels and no defence (`qtclean.scan(method="loss")` trains exactly that K-way model), then apply the
attack's test-time trigger (`qtclean.attacks.lab.test_time_trigger`) to every test-split image not of the target
class (all-to-all: to every image, the target being the next class). ASR = share predicted as the target; ACC =
accuracy on the clean test split. The bar: ASR >= 90 %.

    python benchmarks/asr.py --n 20000 --epochs 10
    python benchmarks/asr.py --attacks wanet,adaptive-blend --device cuda
    python benchmarks/asr.py --attacks iab --poison-seeds 2,3,4     # several poisoning draws
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

from detection import POISON_SEED, draw_tag, make_cell_with_trigger  # noqa: E402
from fmnist import CLASSES, load_fmnist  # noqa: E402

from qtclean import TrainConfig, scan  # noqa: E402
from qtclean.attacks.lab import LABEL_RULE, TRIGGERS, test_time_trigger  # noqa: E402
from qtclean.baselines import BaselineConfig  # noqa: E402
from qtclean.engine import channel_stats, predict, put_on_device, resolve_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--attacks", default=",".join(TRIGGERS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--poison-seeds", default=str(POISON_SEED), help="comma list of poisoning draws per attack")
    ap.add_argument("--results", default=str(HERE / "results" / "asr"))
    ap.add_argument("--rerun", action="store_true", help="run every cell again (results are kept per cell)")
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    test_images, test_labels = load_fmnist("test")
    test_images = test_images.copy()  # writable: torch.from_numpy warns on the read-only IDX buffer
    rows = []
    cells = [(a, int(p)) for a in args.attacks.split(",") for p in args.poison_seeds.split(",")]
    for attack, poison_seed in cells:
        path = results / f"{attack}-{args.rate}-{args.n}-{args.epochs}{draw_tag(poison_seed)}.json"
        if path.exists() and not args.rerun:
            rows.append(json.loads(path.read_text()))
            continue
        t0 = time.perf_counter()
        dataset, truth, trigger = make_cell_with_trigger(args.n, attack, args.rate, poison_seed=poison_seed)
        result = scan(dataset, method="loss", baseline_config=BaselineConfig(epochs=args.epochs),
                      train_config=TrainConfig(device=args.device))
        model = result.model.to(device)
        mean, std = channel_stats(dataset.images)  # the training set's normalisation, as the scan used

        def predictions(images: np.ndarray) -> np.ndarray:
            data = put_on_device(images, np.zeros(len(images), np.int64), device)
            data.mean, data.std = mean.view(1, -1, 1, 1).to(device), std.view(1, -1, 1, 1).to(device)
            return predict(model, data).argmax(dim=1).cpu().numpy()

        acc = float((predictions(test_images) == test_labels).mean())
        if LABEL_RULE.get(attack) == "all-to-all":  # every class is a victim, its target is the next class
            victims, targets = np.ones(len(test_labels), bool), (test_labels + 1) % len(CLASSES)
        else:  # all-to-one and clean-label: the trigger on other classes' images should give the target, 0
            victims = test_labels != 0
            targets = np.zeros(len(test_labels), np.int64)
        hits = predictions(test_time_trigger(test_images[victims], attack, trigger)) == targets[victims]
        asr = float(hits.mean())
        row = {"attack": attack, "poison_seed": poison_seed, "rate": args.rate, "n": args.n, "epochs": args.epochs,
               "acc": round(acc, 4), "asr": round(asr, 4), "poisoned": int(truth.sum()),
               "seconds": round(time.perf_counter() - t0, 1)}
        path.write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| attack | draw | poisoned | clean test ACC | ASR |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attack']} | {r.get('poison_seed', POISON_SEED)} | {r['poisoned']} | {100 * r['acc']:.1f} % "
              f"| {100 * r['asr']:.1f} % |")


if __name__ == "__main__":
    main()
