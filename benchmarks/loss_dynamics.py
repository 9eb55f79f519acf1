"""Per-sample loss dynamics of the K-way (pre-quarantine) model, for designing the pre-quarantine rule.

For each attack cell (Fashion-MNIST subset, poisoned as benchmarks/detection.py does, class order) it trains the
default model with the scan's pre-quarantine settings for --epochs epochs and after each epoch records every
sample's log-loss from an eval pass. Writes OUT/ATTACK-RATE-N.npz with log_losses (E, N) float16, labels, truth.
The arrays are what a selection rule sees, so rules can be compared offline in seconds.

    python benchmarks/loss_dynamics.py --out /tmp/dyn --attacks blend-noise,sig --epochs 8 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from detection import make_cell  # noqa: E402

from qtclean import qt  # noqa: E402
from qtclean.engine import (make_optimizer, predict, prepare_model, put_on_device, resolve_device,  # noqa: E402
                            train_epoch)
from qtclean.models import build_model  # noqa: E402
from qtclean.scan import TrainConfig  # noqa: E402


def parse_cell(spec: str, default_rate: float) -> tuple[str, float]:
    """"ATTACK" or "ATTACK@RATE" -> (attack, rate); the clean control ("none") has rate 0."""
    attack, _, rate = spec.partition("@")
    return attack, 0.0 if attack == "none" else float(rate or default_rate)


def train_k_way(dataset, device: torch.device, epochs: int, seed: int = 0, features_after: int = 0,
                on_epoch=None):
    """The scan's K-way (pre-quarantine) training with scan seed ``seed``, for ``epochs`` epochs; returns the model,
    the set on the device, every sample's log-loss after each epoch, (epochs, N), from an eval pass, and (when
    ``features_after`` > 0) the penultimate features after that epoch, else None. ``on_epoch(epoch, logits)``, if
    given, sees each eval pass's logits (N, K)."""
    tcfg = TrainConfig()
    data = put_on_device(dataset.images, dataset.labels, device)
    torch.manual_seed(seed)
    model = prepare_model(build_model(tcfg.model, dataset.image_shape[0], dataset.num_classes), device)
    opt = make_optimizer(model, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    rows, features = [], None
    for epoch in range(1, epochs + 1):
        train_epoch(model, opt, data, lambda lg, idx: qt.per_sample_cross_entropy(lg, data.labels[idx]),
                    batch_size=tcfg.batch_size, generator=gen)
        logits = predict(model, data)
        rows.append(torch.log(qt.per_sample_cross_entropy(logits, data.labels) + 1e-8))
        if on_epoch is not None:
            on_epoch(epoch, logits)
        if epoch == features_after:
            features = predict(model, data, embed=True)
    return model, data, torch.stack(rows), features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--attacks", default="badnets,blend-noise,blend-image,sig,badnets-a2a,badnets-cl,none")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", default="0", help="scan seeds (model init and batch order), comma-separated")
    ap.add_argument("--features-after", type=int, default=0,
                    help="also save the penultimate features after this epoch (0 = none)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    for spec in args.attacks.split(","):
        attack, rate = parse_cell(spec, args.rate)
        dataset, truth = make_cell(args.n, attack, rate)
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.perf_counter()
            _, _, log_losses, features = train_k_way(dataset, device, args.epochs, seed, args.features_after)
            arrays = {"log_losses": log_losses.cpu().numpy().astype(np.float16), "labels": dataset.labels,
                      "truth": truth}
            if features is not None:
                arrays["features"] = features.cpu().numpy().astype(np.float16)
            name = f"{attack}-{rate}-{args.n}" + (f"-s{seed}" if seed else "")
            np.savez_compressed(out / f"{name}.npz", **arrays)
            print(f"{attack} {rate} seed {seed} {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
