"""Training engine: the whole set resident on the device, batches drawn by index, no per-sample Python.

Knows nothing of Quarantine Training: callers pass a per-sample loss function ``loss_fn(logits, idx)`` that
returns a (B,) tensor, so the same loop trains the K-way pre-quarantine model and the 2K-way quarantine model.
N = number of samples. Host syncs happen once per epoch (the mean loss), never per batch. On CUDA each full-size
training step (gather, normalise, forward, loss, backward, SGD step) is recorded once per epoch as a CUDA graph and
replayed: the default CNN is so small that at batch 128 an eager step is bound by launching its kernels one by one
from Python, not by the GPU's work (see :func:`train_epoch`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import InputError, RunError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` = first CUDA device if present, else MPS if present, else CPU; explicit choices are checked."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present; "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return dev
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise InputError("--device mps: MPS is not available on this machine; use --device cpu or auto")
        return torch.device("mps")
    raise InputError(f"--device {spec!r}: choose auto, cpu, cuda, cuda:N or mps")


def default_threads() -> int:
    """CPU threads when ``--threads`` is not given: ``OMP_NUM_THREADS`` if set (torch's usual setting), else the
    cores this process may use (affinity-aware, so containers and ``taskset`` are respected)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class DeviceData:
    """The training set on the device: uint8 images (N, C, H, W), labels (N,), per-channel mean/std (0..255)."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    dtype: torch.dtype
    mixed_precision: bool = True  # bf16 autocast on CUDA (see autocast_for); False = fp32 everywhere

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def autocast(self, *, cache: bool = True):
        """The precision context for a forward pass over this data (:func:`autocast_for`)."""
        return autocast_for(self.images.device, cache=cache, enabled=self.mixed_precision)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Float, normalised, channels_last on CPU and CUDA; converted per batch so the set stays uint8 in memory."""
        x = self.images.index_select(0, idx).to(self.dtype)
        x = (x - self.mean) / self.std
        if x.device.type in CHANNELS_LAST_DEVICES:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def channel_stats(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) of uint8 images (N, C, H, W), on the 0..255 scale; std at least 1."""
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(images.shape[1]):  # a 256-bin histogram per channel: exact, and no float copy of the set
        hist = np.zeros(256, dtype=np.float64)
        for start in range(0, images.shape[0], 4096):  # chunks: bincount widens its input to int64 (8x the bytes)
            hist += np.bincount(images[start:start + 4096, c].reshape(-1), minlength=256)
        n = max(hist.sum(), 2.0)
        mean = (hist * values).sum() / n
        var = (hist * (values - mean) ** 2).sum() / (n - 1)
        means.append(mean)
        stds.append(max(np.sqrt(var), 1.0))
    return torch.tensor(means, dtype=torch.float32), torch.tensor(stds, dtype=torch.float32)


PRECISIONS = ("bf16", "fp32")


def put_on_device(images: np.ndarray, labels: np.ndarray, device: torch.device,
                  precision: str = "bf16") -> DeviceData:
    """Move the uint8 set to ``device`` once; mean/std are computed from the data itself (no dataset constants).
    ``precision``: "bf16" = bf16 autocast on CUDA (fp32 elsewhere), "fp32" = fp32 on every device."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    imgs = torch.from_numpy(np.ascontiguousarray(images))
    mean, std = channel_stats(images)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        need = imgs.numel() + 256 * 2**20  # the uint8 set plus working room for a small model's activations
        if need > free:
            raise RunError(f"the dataset needs {need / 2**20:,.0f} MiB on {device}, {free / 2**20:,.0f} MiB are "
                           "free; use --device cpu, a smaller --image-size, or free the GPU")
    try:
        imgs = imgs.to(device)
    except RuntimeError as exc:  # out of device memory
        need = imgs.numel() / 2**20
        raise RunError(f"the dataset ({need:.0f} MiB as uint8) does not fit on {device}: {exc}; "
                       "use --device cpu or a smaller --image-size") from exc
    return DeviceData(
        images=imgs,
        labels=torch.from_numpy(labels.astype(np.int64)).to(device),
        mean=mean.view(1, -1, 1, 1).to(device),
        std=std.view(1, -1, 1, 1).to(device),
        dtype=torch.float32,
        mixed_precision=precision == "bf16",
    )


CHANNELS_LAST_DEVICES = ("cpu", "cuda")


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on ``device``, channels_last where it pays: on 2 CPU cores the default CNN trains 1.4x (1x28x28)
    to 1.6x (3x32x32) faster and evaluates 1.7-2.1x faster than in NCHW (benchmarks/speed.py); on CUDA it is
    what cuDNN's tensor-core kernels want."""
    model = model.to(device)
    if device.type in CHANNELS_LAST_DEVICES:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (the paper trains with SGD); foreach kernels where available."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=momentum > 0, foreach=True)


def autocast_for(device: torch.device, *, cache: bool = True, enabled: bool = True):
    """One place decides precision: bf16 autocast on CUDA (when ``enabled``), fp32 elsewhere. ``cache=False``
    inside a CUDA graph capture, where autocast's cache of cast weights must not outlive the capture."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return torch.autocast(device.type, enabled=False)


def model_outputs(model: nn.Module) -> int:
    """Number of logits the model produces (its head's out_features)."""
    return int(model.head.out_features)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: DeviceData, loss_fn: LossFn,
                idx: torch.Tensor, total: torch.Tensor, *, in_graph: bool = False) -> None:
    """One SGD step on the samples ``idx``; adds the batch's summed loss to ``total`` (on the device, no sync)."""
    x = data.batch(idx)
    with data.autocast(cache=not in_graph):
        logits = model(x)
    loss = loss_fn(logits.float(), idx)
    if not in_graph:  # a captured step's backward writes fresh gradients (they are None when capture starts)
        optimizer.zero_grad(set_to_none=True)
    loss.mean().backward()
    optimizer.step()
    total += loss.detach().sum()


GRAPH_WARMUP_STEPS = 2  # eager steps before a capture: cuDNN autotuning and the optimizer's lazy state happen there


class _CapturedStep:
    """A full-size training step recorded as a CUDA graph: ``run(idx)`` copies the batch indices into the graph's
    static index buffer and replays it. Everything the step reads (the uint8 set, labels, per-sample soft targets
    through ``loss_fn``, weights, optimizer state) stays at fixed addresses for the epoch it is captured in."""

    def __init__(self, model, optimizer, data: DeviceData, loss_fn: LossFn, total: torch.Tensor, batch_size: int):
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=total.device)
        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            _train_step(model, optimizer, data, loss_fn, self.idx, total, in_graph=True)

    def run(self, idx: torch.Tensor) -> None:
        self.idx.copy_(idx)
        self.graph.replay()


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: DeviceData, loss_fn: LossFn, *,
                batch_size: int, generator: torch.Generator,
                on_batch: Callable[[int], None] | None = None, cuda_graph: bool = True) -> float:
    """One pass over a random permutation of the set; returns the mean per-sample loss.

    ``loss_fn(logits, idx)`` gets the batch logits and the dataset indices of the batch rows and returns a (B,)
    loss, so per-sample state (labels, soft targets) is read through ``idx`` on the device. It must not sync with
    the host (no ``.item()``, no boolean-mask indexing) so that on CUDA the step can be captured.

    With ``cuda_graph`` (CUDA only), the first ``GRAPH_WARMUP_STEPS`` steps run eagerly on a side stream, the step
    is then captured once and replayed for the other full-size batches; the last, smaller batch runs eagerly. The
    arithmetic is the eager step's, kernel for kernel. The capture is redone every epoch because callers swap the
    tensors ``loss_fn`` reads between epochs. A step that cannot be captured falls back to eager with a warning.
    """
    model.train()
    device = data.images.device
    n = data.num_samples
    order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    total = torch.zeros((), device=device)
    graphed = cuda_graph and device.type == "cuda" and n // batch_size > GRAPH_WARMUP_STEPS
    side = torch.cuda.Stream(device) if graphed else None
    if graphed:  # the warm-up steps on a side stream, as torch.cuda.graph requires
        side.wait_stream(torch.cuda.current_stream(device))
    step = None
    for i, start in enumerate(range(0, n, batch_size)):
        idx = order[start:start + batch_size]
        if idx.numel() < 2:  # BatchNorm needs two samples; a lone remainder waits for the next epoch
            continue
        if graphed and i >= GRAPH_WARMUP_STEPS and idx.numel() == batch_size:
            if step is None:
                torch.cuda.current_stream(device).wait_stream(side)
                try:
                    step = _CapturedStep(model, optimizer, data, loss_fn, total, batch_size)
                except RuntimeError as exc:  # e.g. a custom loss_fn that syncs with the host
                    warnings.warn(f"CUDA graph capture failed ({exc}); training this epoch eagerly", stacklevel=2)
                    graphed = False
            if step is not None:
                step.run(idx)
            else:
                _train_step(model, optimizer, data, loss_fn, idx, total)
        elif graphed and i < GRAPH_WARMUP_STEPS:
            with torch.cuda.stream(side):
                _train_step(model, optimizer, data, loss_fn, idx, total)
        else:
            _train_step(model, optimizer, data, loss_fn, idx, total)
        if on_batch is not None:
            on_batch(int(idx.numel()))
    if graphed and step is None:  # every batch was a warm-up one
        torch.cuda.current_stream(device).wait_stream(side)
    return float(total.item()) / max(n, 1)


@torch.inference_mode()
def predict(model: nn.Module, data: DeviceData, *, chunk: int | None = None, rows: torch.Tensor | None = None,
            embed: bool = False, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Logits (N, outputs), float32, in index order, from the model in eval mode; with ``rows`` (a 1-D index
    tensor on the device) only those samples, in that order; with ``embed`` the penultimate features instead.

    ``chunk`` defaults to 4096 on accelerators (fewer launches) and 512 on CPU, where a 2048-image chunk's
    activations alone took ~500 MB of peak RSS and bought no speed.
    """
    model.eval()
    device = data.images.device
    chunk = chunk or (512 if device.type == "cpu" else 4096)
    if rows is None:
        rows = torch.arange(data.num_samples, device=device)
    forward = model.embed if embed else model
    out = []
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        with data.autocast():
            out.append(forward(data.batch(idx)).float())
        if on_batch is not None:
            on_batch(int(idx.numel()))
    return torch.cat(out) if out else torch.zeros(0, model_outputs(model), device=device)
