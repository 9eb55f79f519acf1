"""Models by name, and the K -> 2K head widening of Quarantine Training.

Every model exposes its final classifier as ``model.head`` (an ``nn.Linear``) so the widening is model-agnostic,
and ``model.embed(x)``, the features the head reads (the baselines' activations).
"""

from __future__ import annotations

import torch
from torch import nn

from .cnn import CompactCNN
from .preact_resnet import PreActResNet18

MODELS = {
    "cnn": CompactCNN,
    "preact-resnet18": PreActResNet18,
}


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A fresh model with ``num_classes`` outputs; ``name`` is a key of :data:`MODELS`."""
    return MODELS[name](in_channels, num_classes)


def widen_head(model: nn.Module, num_classes: int, *, quarantine_bias: float) -> None:
    """Replace the K-way head by a 2K-way head in place; output ``y + K`` is class y's quarantine class.

    Deviation from the paper (which starts the new layer from scratch): both halves start as copies of the
    trained K-way head, the quarantine half with its bias lowered by ``quarantine_bias`` (nats). Every sample
    then starts predicted in its source class with the features already learned, instead of all 2K outputs
    being random. Measured on Fashion-MNIST BadNets 10 %: literal port AUROC 0.49, copy init 1.000.
    """
    old: nn.Linear = model.head
    if old.out_features != num_classes:
        raise ValueError(f"head has {old.out_features} outputs, expected {num_classes}")
    new = nn.Linear(old.in_features, 2 * num_classes, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat([old.weight, old.weight]))
        new.bias.copy_(torch.cat([old.bias, old.bias - quarantine_bias]))
    model.head = new


__all__ = ["MODELS", "build_model", "widen_head", "CompactCNN", "PreActResNet18"]
