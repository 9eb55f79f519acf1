"""Two-way splits of a class's features: shared by activation clustering (baselines) and QT's feature seed."""

from __future__ import annotations

import torch


def class_indices(labels: torch.Tensor, num_classes: int, min_size: int = 1):
    """Yield (class, its sample indices) for each class with at least ``min_size`` samples."""
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() >= min_size:
            yield c, idx


def two_means(points: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Cluster assignment (n,) in {0, 1} by Lloyd's algorithm, seeded deterministically with the point farthest
    from the mean and the point farthest from that one."""
    first = torch.argmax(((points - points.mean(dim=0)) ** 2).sum(dim=1))
    second = torch.argmax(((points - points[first]) ** 2).sum(dim=1))
    centres = points[torch.stack([first, second])].clone()
    assign = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    for step in range(iters):
        new = torch.cdist(points, centres).argmin(dim=1)
        if step > 0 and torch.equal(new, assign):
            break
        assign = new
        for j in range(2):
            if bool((assign == j).any()):
                centres[j] = points[assign == j].mean(dim=0)
    return assign


def principal_components(features: torch.Tensor, dims: int) -> torch.Tensor:
    """One class's features (n, D), centred and projected on their top ``dims`` principal directions (n, dims)."""
    centred = features.double() - features.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:dims].T


def smaller_cluster(features: torch.Tensor, dims: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """One class's features (n, D) reduced to ``dims`` principal components and split by :func:`two_means`;
    returns the reduced points (n, dims) and the bool mask (n,) of the smaller cluster."""
    reduced = principal_components(features, dims)
    assign = two_means(reduced)
    small = int(torch.argmin(torch.bincount(assign, minlength=2)))
    return reduced, assign == small
