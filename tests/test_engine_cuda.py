"""The CUDA-graph training step (qtclean.engine.train_epoch): same arithmetic as the eager step, fewer launches.

These tests need a CUDA device; CI has none, so they are skipped there and run on a GPU machine
(benchmarks/gpu.sh runs them first).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from qtclean import qt
from qtclean.engine import GRAPH_WARMUP_STEPS, make_optimizer, prepare_model, put_on_device, train_epoch
from qtclean.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _setup(n: int = 1000, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 60, (n, 1, 16, 16), dtype=np.uint8)
    images[np.arange(n), 0, labels * 4, labels * 4] = 255  # a class-dependent pixel: learnable in one epoch
    device = torch.device("cuda")
    data = put_on_device(images, labels, device)
    torch.manual_seed(0)
    model = prepare_model(build_model("cnn", 1, 4), device)
    opt = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    return data, model, opt, gen


def _epochs(cuda_graph: bool, epochs: int = 2):
    """Mean losses of ``epochs`` epochs and the trained weights, flattened."""
    data, model, opt, gen = _setup()
    losses = [train_epoch(model, opt, data, lambda lg, idx: qt.per_sample_cross_entropy(lg, data.labels[idx]),
                          batch_size=128, generator=gen, cuda_graph=cuda_graph) for _ in range(epochs)]
    return losses, torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu()


def test_graph_epochs_replay_and_match_eager(monkeypatch):
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), real_replay(self))[1])
    graph_losses, graph_params = _epochs(cuda_graph=True)
    monkeypatch.undo()
    eager_losses, eager_params = _epochs(cuda_graph=False)
    full_batches = 1000 // 128
    assert len(replays) == 2 * (full_batches - GRAPH_WARMUP_STEPS)  # every full batch after the warm-up, each epoch
    assert graph_losses[1] < graph_losses[0]  # it trains
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=2e-3)
    assert torch.allclose(graph_params, eager_params, rtol=1e-2, atol=1e-3)


def test_per_sample_state_swapped_between_epochs_is_read_by_the_new_capture():
    """scan.py rebinds the soft-target tensor every epoch; each epoch's capture must read the new one."""
    data, model, opt, gen = _setup()
    weights = torch.ones(data.num_samples, device="cuda")
    first = train_epoch(model, opt, data, lambda lg, idx: weights[idx] * qt.per_sample_cross_entropy(
        lg, data.labels[idx]), batch_size=128, generator=gen)
    zero = torch.zeros(data.num_samples, device="cuda")  # a new tensor, as scan.py makes each epoch
    before = [p.detach().clone() for p in model.parameters()]
    second = train_epoch(model, opt, data, lambda lg, idx: zero[idx] * qt.per_sample_cross_entropy(
        lg, data.labels[idx]), batch_size=128, generator=gen)
    assert first > 0 and second == 0.0
    # only weight decay and the momentum left from epoch 1 move the weights: no loss gradient reaches them
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_loss_that_syncs_with_the_host_falls_back_to_eager_with_a_warning():
    data, model, opt, gen = _setup()

    def syncing_loss(lg, idx):
        ce = qt.per_sample_cross_entropy(lg, data.labels[idx])
        if ce.mean().item() < -1:  # a host sync: cannot be captured
            raise AssertionError
        return ce

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = train_epoch(model, opt, data, syncing_loss, batch_size=128, generator=gen)
    assert any("CUDA graph capture failed" in str(w.message) for w in caught)
    assert np.isfinite(loss) and loss > 0
    again = train_epoch(model, opt, data, lambda lg, idx: qt.per_sample_cross_entropy(lg, data.labels[idx]),
                        batch_size=128, generator=gen)
    assert again < loss  # the device is still usable and training goes on
