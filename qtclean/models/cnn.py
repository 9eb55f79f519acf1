"""The default model: a compact CNN that trains fast on two CPU cores.

Three conv-BN-ReLU blocks (width 16, 32, 64) with 2x2 max pooling after the first two, then global max and
average pooling concatenated. Max pooling keeps a small local trigger (a 3x3 patch in a corner) visible to the
head; average pooling carries the global shape. About 25k parameters; ~2 MMAC per 28x28 image.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class CompactCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(in_channels, w), nn.MaxPool2d(2),
            conv_bn(w, 2 * w), nn.MaxPool2d(2),
            conv_bn(2 * w, 4 * w),
        )
        self.head = nn.Linear(8 * w, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 8 * width) penultimate features, what the head reads (and what the AC/SS baselines cluster)."""
        f = self.features(x)
        return torch.cat([f.amax(dim=(2, 3)), f.mean(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))
