"""Speed benchmark (issue 8): end-to-end scans and our engine against the textbook input pipeline.

    python benchmarks/speed.py scan --n 60000 --format folder        # 60k Fashion-MNIST image folder, 10 % BadNets
    python benchmarks/speed.py scan --n 50000 --format cifar --device cuda   # 32x32 RGB CIFAR-format set
    python benchmarks/speed.py engine --n 20000 --epochs 2           # same model/epochs: engine vs DataLoader
    python benchmarks/speed.py profile --n 10000                     # where a CPU epoch spends its time
    python benchmarks/speed.py compile --n 20000 --epochs 4          # does torch.compile pay off, compile included?

`scan` times `python -m qtclean scan` from process start to files written (wall clock) and reads run.json for
the per-phase split, peak memory and detection (AUROC / TPR / FPR against the planted truth).
`engine` trains the default CNN for the same epochs two ways, in this process: qtclean's engine (uint8 set on the
device, index batches; on CUDA also once with eager steps instead of CUDA-graph replays) and the textbook pipeline
(a torchvision-style Dataset with ToTensor + Normalize per sample, a DataLoader, per-batch `.to(device)`), and
prints img/s of each and the ratio.

Fashion-MNIST is read from /usr/share/datasets/fashion-mnist (or $QTCLEAN_FMNIST_DIR).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from fmnist import CLASSES, as_rgb32, subset  # noqa: E402
from patch_detection import write_folder  # noqa: E402

from qtclean.attacks import poison  # noqa: E402
from qtclean.data.cifar_writer import write_batch  # noqa: E402
from qtclean.metrics import auroc, detection_rates  # noqa: E402


def write_cifar10(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """CIFAR-10 layout: 5 training batches, batches.meta, a small test batch."""
    root.mkdir(parents=True, exist_ok=True)
    flat = images.reshape(len(labels), -1)
    for b, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        write_batch(root / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels":
                    labels[part].tolist(), "data": flat[part], "filenames": [f"fmnist_{i}.png" for i in part]})
    write_batch(root / "batches.meta", {"label_names": CLASSES, "num_cases_per_batch": len(labels) // 5,
                                        "num_vis": flat.shape[1]})
    write_batch(root / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels[:10].tolist(),
                                      "data": flat[:10], "filenames": ["t.png"] * 10})


def cmd_scan(args) -> None:
    images, labels = subset(args.n, seed=1)
    images, labels, truth = poison(images, labels, attack="badnets", rate=args.rate, target=0, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        if args.format == "cifar":
            write_cifar10(data, as_rgb32(images), labels)
            ids = [f"data_batch_{b}:{r}" for b, part in
                   enumerate(np.array_split(np.arange(len(labels)), 5), start=1) for r in range(len(part))]
        else:
            ids = write_folder(data, images, labels)
        truth_by_id = dict(zip(ids, truth))
        cmd = [sys.executable, "-m", "qtclean", "scan", str(data), "--out", str(run), "--device", args.device,
               *args.scan_args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"scan failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        with open(run / "scores.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        info = json.loads((run / "run.json").read_text())
    t = np.array([truth_by_id[r["id"]] for r in rows])
    score = np.array([float(r["score"]) for r in rows])
    flagged = np.array([r["flagged"] == "1" for r in rows])
    pre = sum(e["seconds"] for e in info["epochs"] if e["phase"] == "pre-quarantine")
    qua = sum(e["seconds"] for e in info["epochs"] if e["phase"] in ("quarantine", "second pass"))
    uint8_mib = images.nbytes / 2**20 * (3 * 32 * 32 / (28 * 28) if args.format == "cifar" else 1)
    out = {"n": args.n, "format": args.format, "device": info["device"], "wall_seconds": round(wall, 1),
           "scan_seconds": info["total_seconds"], "pre_quarantine_seconds": round(pre, 1),
           "quarantine_seconds": round(qua, 1), "epochs_run": len(info["epochs"]),
           "stop_reason": info.get("stop_reason"), "peak_rss_mib": round(rss_mib), "dataset_uint8_mib":
           round(uint8_mib, 1), "peak_device_mib": info.get("peak_device_memory_mib"),
           "auroc": round(auroc(score, t), 4), **{k: round(v, 4) for k, v in detection_rates(flagged, t).items()},
           "command": " ".join(["qtclean", "scan", "DATA", "--device", args.device, *args.scan_args])}
    print(json.dumps(out), flush=True)


class TextbookDataset:
    """What a tutorial writes: a Dataset over HWC uint8 arrays with ToTensor + Normalize per sample."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, mean, std):
        from torchvision import transforms

        self.images, self.labels = images_hwc, labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def cmd_engine(args) -> None:
    import torch

    from qtclean import qt
    from qtclean.engine import (autocast_for, channel_stats, default_threads, make_optimizer, prepare_model,
                                put_on_device, resolve_device, train_epoch)
    from qtclean.models import build_model

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or default_threads())
    images, labels = subset(args.n, seed=1)
    if args.format == "cifar":
        images = as_rgb32(images)
    c = images.shape[1]

    def fresh_model(engine: bool):
        torch.manual_seed(0)
        model = build_model("cnn", c, len(CLASSES))
        model = prepare_model(model, device) if engine else model.to(device)  # the textbook: NCHW
        return model, make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # qtclean's engine (on CUDA twice: CUDA-graph steps, the default, and eager steps)
    data = put_on_device(images, labels, device)

    def engine_img_per_s(cuda_graph: bool) -> float:
        model, opt = fresh_model(engine=True)
        gen = torch.Generator(device=device)
        gen.manual_seed(0)
        for epoch in range(args.epochs + 1):  # epoch 0 warms up (cudnn autotune, allocator)
            if epoch == 1:
                sync()
                t0 = time.perf_counter()
            train_epoch(model, opt, data, lambda lg, idx: qt.per_sample_cross_entropy(lg, data.labels[idx]),
                        batch_size=args.batch_size, generator=gen, cuda_graph=cuda_graph)
        sync()
        return args.n * args.epochs / (time.perf_counter() - t0)

    ours = engine_img_per_s(cuda_graph=True)
    eager = engine_img_per_s(cuda_graph=False) if device.type == "cuda" else ours

    # textbook pipeline
    mean, std = channel_stats(images)
    ds = TextbookDataset(np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels,
                         (mean / 255).tolist(), (std / 255).tolist())
    workers = args.workers if args.workers is not None else (0 if device.type == "cpu" else 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=False,
                                         persistent_workers=workers > 0)
    model, opt = fresh_model(engine=False)

    def textbook_epoch():
        model.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_for(device):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    textbook_epoch()  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        textbook_epoch()
    sync()
    textbook = args.n * args.epochs / (time.perf_counter() - t0)
    print(json.dumps({"n": args.n, "format": args.format, "device": str(device), "epochs": args.epochs,
                      "batch_size": args.batch_size, "textbook_workers": workers,
                      "engine_img_per_s": round(ours), "engine_eager_img_per_s": round(eager),
                      "textbook_img_per_s": round(textbook), "ratio": round(ours / textbook, 2),
                      "ratio_eager_engine": round(eager / textbook, 2)}), flush=True)


def cmd_profile(args) -> None:
    """Where one CPU training epoch and one eval pass spend their time (torch.profiler, top operators)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from qtclean import qt
    from qtclean.engine import default_threads, make_optimizer, predict, prepare_model, put_on_device, train_epoch
    from qtclean.models import build_model

    torch.set_num_threads(args.threads or default_threads())
    images, labels = subset(args.n, seed=1)
    data = put_on_device(images, labels, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model("cnn", 1, len(CLASSES))
    if not args.nchw:
        model = prepare_model(model, torch.device("cpu"))
    else:  # the layout before session 3, for the before/after profile
        import qtclean.engine as engine

        engine.CHANNELS_LAST_DEVICES = ()
    opt = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator()
    gen.manual_seed(0)
    loss_fn = lambda lg, idx: qt.per_sample_cross_entropy(lg, data.labels[idx])  # noqa: E731
    train_epoch(model, opt, data, loss_fn, batch_size=128, generator=gen)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        train_epoch(model, opt, data, loss_fn, batch_size=128, generator=gen)
        t1 = time.perf_counter()
        predict(model, data)
        t2 = time.perf_counter()
    print(f"train epoch {t1 - t0:.2f}s ({args.n / (t1 - t0):,.0f} img/s), eval pass {t2 - t1:.2f}s "
          f"({args.n / (t2 - t1):,.0f} img/s), threads {torch.get_num_threads()}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def cmd_compile(args) -> None:
    """Eager vs torch.compile, same model and epochs, the compiled run timed *with* its compilation (issue 8); on
    CUDA also the engine's CUDA-graph steps (eager and compiled runs use eager steps)."""
    import torch

    from qtclean import qt
    from qtclean.engine import (default_threads, make_optimizer, prepare_model, put_on_device, resolve_device,
                                train_epoch)
    from qtclean.models import build_model

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or default_threads())
    images, labels = subset(args.n, seed=1)
    data = put_on_device(images, labels, device)
    out = {"n": args.n, "epochs": args.epochs, "device": str(device)}
    modes = ("eager", "cuda_graphs", "compiled") if device.type == "cuda" else ("eager", "compiled")
    for mode in modes:
        torch.manual_seed(0)
        model = prepare_model(build_model("cnn", 1, len(CLASSES)), device)
        opt = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
        runner = torch.compile(model) if mode == "compiled" else model
        gen = torch.Generator(device=device)
        gen.manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            train_epoch(runner, opt, data, lambda lg, idx: qt.per_sample_cross_entropy(lg, data.labels[idx]),
                        batch_size=128, generator=gen, cuda_graph=mode == "cuda_graphs")
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[f"{mode}_seconds"] = round(time.perf_counter() - t0, 2)
    out["speedup_incl_compile"] = round(out["eager_seconds"] / out["compiled_seconds"], 3)
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scan", help="end-to-end CLI scan of a poisoned Fashion-MNIST set")
    s.add_argument("--n", type=int, default=60000)
    s.add_argument("--rate", type=float, default=0.1)
    s.add_argument("--format", choices=["folder", "cifar"], default="folder")
    s.add_argument("--device", default="auto")
    s.add_argument("scan_args", nargs=argparse.REMAINDER, help="extra qtclean scan arguments, after --")
    e = sub.add_parser("engine", help="engine vs textbook DataLoader, same model and epochs")
    e.add_argument("--n", type=int, default=20000)
    e.add_argument("--epochs", type=int, default=2)
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--format", choices=["folder", "cifar"], default="folder")
    e.add_argument("--device", default="auto")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--workers", type=int, default=None, help="DataLoader workers [0 on CPU, 8 on CUDA]")
    p = sub.add_parser("profile", help="torch.profiler of one CPU training epoch and one eval pass")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--nchw", action="store_true", help="NCHW tensors (the engine before channels_last on CPU)")
    c = sub.add_parser("compile", help="eager vs torch.compile training, compile time included")
    c.add_argument("--n", type=int, default=20000)
    c.add_argument("--epochs", type=int, default=4)
    c.add_argument("--device", default="cpu")
    c.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.cmd == "compile":
        cmd_compile(args)
        return
    if args.cmd == "profile":
        cmd_profile(args)
        return
    if args.cmd == "scan":
        args.scan_args = [a for a in args.scan_args if a != "--"]
        cmd_scan(args)
    else:
        cmd_engine(args)


if __name__ == "__main__":
    main()
