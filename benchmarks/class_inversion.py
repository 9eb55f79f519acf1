"""A universal perturbation per class on the scan's K-way model (issue 6, session 36; a lead, nothing adopted).

sig puts its sine on 2,000 of the 2,048 T-shirts and changes no label, so the poison is the class: nothing in it
fits faster than the rest or looks like another class, and the quarantine flags nothing. What such an attack
leaves is in the model: a small additive pattern (the trigger) takes any image to the target class. This trains
the scan's K-way model (benchmarks/loss_dynamics.py, 8 epochs by default) on a lab cell and, for each class, looks
for one perturbation (the same for every image, on the 0-255 pixel scale, L2 norm at most BUDGET) that makes the
model label 1,024 images of the other classes as that class (projected gradient steps on their mean
cross-entropy), and prints the share it takes there, per class and budget, with the largest share against the
median of the other classes'.

    python benchmarks/class_inversion.py --attacks sig,none,badnets,badnets-cl --budgets 150,300,600
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
from loss_dynamics import parse_cell, train_k_way  # noqa: E402

from qtclean.engine import resolve_device  # noqa: E402

SOURCES = 1024  # images of the other classes a perturbation must carry over
STEPS = 60


def flip_share(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int, budget: float,
               mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> float:
    """The share of ``SOURCES`` images of other classes that one additive perturbation of L2 norm at most ``budget``
    (0-255 scale) makes ``model`` label ``target``, after ``STEPS`` normalised gradient steps of a tenth of the
    budget, each projected back onto the ball."""
    sources = torch.nonzero(labels != target).flatten()
    x = images[sources[torch.randperm(sources.numel(), generator=generator)[:SOURCES]]]
    wanted = torch.full((x.shape[0],), target)
    delta = torch.zeros_like(x[:1]).requires_grad_(True)
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(model(((x + delta).clamp(0, 255) - mean) / std), wanted)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= 0.1 * budget * grad / grad.norm().clamp(min=1e-12)
            delta *= min(1.0, budget / max(float(delta.norm()), 1e-12))
    with torch.no_grad():
        return float((model(((x + delta).clamp(0, 255) - mean) / std).argmax(1) == target).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default="sig,none", help="lab attacks, ATTACK or ATTACK@RATE, comma-separated")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--format", default="folder", choices=("folder", "cifar"))
    ap.add_argument("--seeds", default="0", help="scan seeds (model init and batch order), comma-separated")
    ap.add_argument("--epochs", type=int, default=8, help="K-way epochs")
    ap.add_argument("--budgets", default="150,300,600", help="L2 norms on the 0-255 scale, comma-separated")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    budgets = [float(b) for b in args.budgets.split(",")]
    for spec in args.attacks.split(","):
        attack, rate = parse_cell(spec, args.rate)
        dataset, _truth = make_cell(args.n, attack, rate, args.format)
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            model, data, _, _ = train_k_way(dataset, device, args.epochs, seed)
            model.eval()
            images = torch.from_numpy(dataset.images).float().to(device)
            labels = torch.from_numpy(dataset.labels).to(device)
            mean, std = (v.float().view(1, -1, 1, 1).to(device) for v in (data.mean, data.std))
            generator = torch.Generator().manual_seed(seed)
            print(f"{attack} {rate} {args.format} scan seed {seed}:", flush=True)
            for budget in budgets:
                shares = np.array([flip_share(model, images, labels, c, budget, mean, std, generator)
                                   for c in range(dataset.num_classes)])
                top = int(shares.argmax())
                others = np.median(np.delete(shares, top))
                print(f"  budget {budget:g}: {' '.join(f'{s:.2f}' for s in shares)}; largest class {top} "
                      f"{shares[top]:.2f}, the others' median {others:.2f}", flush=True)
            print(f"  {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
