"""A universal perturbation per class on the scan's K-way model (issue 6, session 36; a lead, nothing adopted).

sig puts its sine on 2,000 of the 2,048 T-shirts and changes no label, so the poison is the class: nothing in it
fits faster than the rest or looks like another class, and the quarantine flags nothing. What such an attack
leaves is in the model: a small additive pattern (the trigger) takes any image to the target class. This trains
the scan's K-way model (benchmarks/loss_dynamics.py, 8 epochs by default) on a lab cell and, for each class, looks
for one perturbation (the same for every image, on the 0-255 pixel scale, L2 norm at most BUDGET) that makes the
model label 1,024 images of the other classes as that class (projected gradient steps on their mean
cross-entropy), and prints the share it takes there, per class and budget, with the largest share against the
median of the other classes'. Session 37 added the reach: the median over the source classes of the share each
loses to the class, so that a class the model merely confuses with one or two neighbours (shirts, with T-shirts,
pullovers and coats) does not look like one a pattern reaches from everywhere; and budgets as an RMS per value
(``--rms``), so that 28x28 and 3x32x32 images get the same per-pixel strength.

    python benchmarks/class_inversion.py --attacks sig,none,badnets,badnets-cl --budgets 150,300,600
    python benchmarks/class_inversion.py --attacks sig,none --seeds 0,1,2,3 --epochs 4 --sources 300 --steps 20 \
        --rms 8,12
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



def flip_share(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int, budget: float,
               mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, num_sources: int = 1024,
               steps: int = 60) -> tuple[float, float]:
    """The share of ``num_sources`` images of other classes that one additive perturbation of L2 norm at most
    ``budget`` (0-255 scale) makes ``model`` label ``target``, after ``steps`` normalised gradient steps of a tenth
    of the budget, each projected back onto the ball; and the reach, the median over the source classes of the
    share taken from each."""
    sources = torch.nonzero(labels != target).flatten()
    picked = sources[torch.randperm(sources.numel(), generator=generator)[:num_sources]]
    x = images[picked]
    wanted = torch.full((x.shape[0],), target)
    delta = torch.zeros_like(x[:1]).requires_grad_(True)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(((x + delta).clamp(0, 255) - mean) / std), wanted)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= 0.1 * budget * grad / grad.norm().clamp(min=1e-12)
            delta *= min(1.0, budget / max(float(delta.norm()), 1e-12))
    with torch.no_grad():
        hit = (model(((x + delta).clamp(0, 255) - mean) / std).argmax(1) == target).float()
    source_labels = labels[picked]
    per_source = torch.stack([hit[source_labels == c].mean() for c in torch.unique(source_labels)])
    return float(hit.mean()), float(per_source.median())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default="sig,none", help="lab attacks, ATTACK or ATTACK@RATE, comma-separated")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--format", default="folder", choices=("folder", "cifar"))
    ap.add_argument("--seeds", default="0", help="scan seeds (model init and batch order), comma-separated")
    ap.add_argument("--epochs", type=int, default=8, help="K-way epochs")
    ap.add_argument("--budgets", default="150,300,600", help="L2 norms on the 0-255 scale, comma-separated")
    ap.add_argument("--rms", default="", help="budgets as an RMS per value instead (L2 = RMS x sqrt(C*H*W))")
    ap.add_argument("--sources", type=int, default=1024, help="images of the other classes per search")
    ap.add_argument("--steps", type=int, default=60, help="projected gradient steps per search")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
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
            values = int(np.prod(dataset.image_shape))
            budgets = ([(float(r) * values ** 0.5, f"rms {r} (L2 {float(r) * values ** 0.5:.0f})")
                        for r in args.rms.split(",")] if args.rms else
                       [(float(b), f"budget {b}") for b in args.budgets.split(",")])
            print(f"{attack} {rate} {args.format} scan seed {seed}:", flush=True)
            for budget, name in budgets:
                found = np.array([flip_share(model, images, labels, c, budget, mean, std, generator, args.sources,
                                             args.steps) for c in range(dataset.num_classes)])
                shares, reach = found[:, 0], found[:, 1]
                top, far = int(shares.argmax()), int(reach.argmax())
                others = np.median(np.delete(shares, top))
                print(f"  {name}: {' '.join(f'{s:.2f}' for s in shares)}; largest class {top} "
                      f"{shares[top]:.2f}, the others' median {others:.2f}", flush=True)
                print(f"    reach: {' '.join(f'{r:.2f}' for r in reach)}; largest class {far} {reach[far]:.2f}, "
                      f"the next {np.sort(reach)[-2]:.2f}", flush=True)
            print(f"  {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
