"""WaNet (Nguyen & Tran 2021): a fixed, smooth image warp as the trigger, with "noise mode" cover samples."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _wanet_grid(h: int, w: int, k: int = 4, strength: float = 0.5):
    """The fixed warping field of WaNet (Nguyen & Tran 2021, Sec. 3.2): random k x k offsets, normalised, upsampled."""
    gen = torch.Generator().manual_seed(0)
    offsets = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    offsets = offsets / offsets.abs().mean()
    noise = F.interpolate(offsets, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack([xs, ys], dim=2)[None]
    return identity, strength * noise / h


def _warp(images: np.ndarray, grid) -> np.ndarray:
    x = torch.from_numpy(images.astype(np.float32))
    grid = torch.clamp(grid, -1, 1).expand(x.shape[0], -1, -1, -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)


def wanet(images: np.ndarray) -> np.ndarray:
    identity, warp = _wanet_grid(*images.shape[2:])
    return _warp(images, identity + warp)


def wanet_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """WaNet's noise mode: the same warp plus a per-sample random perturbation of the grid, labels kept."""
    h, w = images.shape[2:]
    identity, warp = _wanet_grid(h, w)
    jitter = torch.from_numpy(rng.uniform(-1, 1, size=(len(images), h, w, 2)).astype(np.float32)) / h
    out = np.empty_like(images)
    for i in range(len(images)):  # one grid per sample
        out[i:i + 1] = _warp(images[i:i + 1], identity + warp + jitter[i:i + 1])
    return out
