"""What an image's pixels say about its label, independent of any training: nearest neighbours in pixel space.

Dirty-label poison is an image of one class relabelled as another, so the samples nearest to it in pixel space
carry other labels; under an all-to-one attack, many different ones (its sources). A clean group of a class looks
like its own class, or like one or two classes it is confused with. These statistics are read once per scan from
the input images (never from a trained model, which learns the trigger), so they do not depend on which samples
one training run happened to fit first.

N = number of samples, K = number of classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PIXEL_DIMS = 50  # principal components of the pixels kept for the neighbour search
COVARIANCE_ROWS = 10_000  # rows (strided) the principal directions are estimated from
NEIGHBOURS = 10
THUMBNAIL = 32  # larger images are area-averaged to this size for the neighbour search
MAX_QUERIES = 512  # members of a group whose neighbours are looked up (strided): enough for a share or an entropy


def pixel_embedding(images: np.ndarray, dims: int = PIXEL_DIMS) -> torch.Tensor:
    """(N, dims) float32: the images (N, C, H, W) uint8, scaled to 0..1 (area-averaged to at most
    ``THUMBNAIL`` x ``THUMBNAIL`` first, so a set of large images costs what a CIFAR-sized one does), centred and
    projected on the top ``dims`` principal directions of their pixels. Deterministic: the directions come from an
    eigendecomposition of the covariance of a strided subset of rows, no random projections (and no draw from
    torch's global RNG, which seeds training)."""
    num = images.shape[0]
    step = max(1, num // COVARIANCE_ROWS)
    sub = _pixel_rows(images, np.arange(0, num, step))
    mean = sub.mean(dim=0)
    centred = sub - mean
    cov = (centred.T @ centred).double() / max(1, sub.shape[0] - 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    basis = vectors[:, -dims:].flip(1).float()
    out = torch.empty(num, basis.shape[1], dtype=torch.float32)
    for i in range(0, num, 8192):  # in chunks: a float copy of 60k CIFAR images would be 740 MB
        rows = np.arange(i, min(num, i + 8192))
        out[i:i + 8192] = (_pixel_rows(images, rows) - mean) @ basis
    return out


def _pixel_rows(images: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """(len(rows), D) float32 pixels in 0..1, each image area-averaged to at most THUMBNAIL x THUMBNAIL."""
    batch = torch.from_numpy(np.ascontiguousarray(images[rows])).float() / 255.0
    if batch.shape[-2] * batch.shape[-1] > THUMBNAIL * THUMBNAIL:
        size = (min(THUMBNAIL, batch.shape[-2]), min(THUMBNAIL, batch.shape[-1]))
        batch = torch.nn.functional.adaptive_avg_pool2d(batch, size)
    return batch.reshape(len(rows), -1)


def neighbour_labels(embedding: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, exclude: torch.Tensor,
                     k: int = NEIGHBOURS) -> torch.Tensor:
    """(Q, k) labels of the ``k`` nearest samples (Euclidean, in ``embedding``) to each of ``queries`` (Q,) indices,
    among the samples not in ``exclude`` (N,) bool."""
    reference = torch.nonzero(~exclude).flatten()
    k = min(k, reference.numel())
    points = embedding[reference]
    out = []
    for i in range(0, queries.numel(), 1024):
        nearest = torch.cdist(embedding[queries[i:i + 1024]], points).topk(k, largest=False).indices
        out.append(labels[reference][nearest])
    return torch.cat(out) if out else torch.zeros(0, k, dtype=labels.dtype)


def strided(indices: torch.Tensor, at_most: int = MAX_QUERIES) -> torch.Tensor:
    """At most ``at_most`` of ``indices``, evenly spaced (deterministic)."""
    return indices[::max(1, -(-indices.numel() // at_most))]


def label_agreement(embedding: torch.Tensor, labels: torch.Tensor, sample: int = 1000) -> float:
    """Share of the nearest neighbours of a strided sample that carry the sample's label: how much pixel
    neighbourhoods say about labels in this dataset (Fashion-MNIST about 0.8; far less for natural photos)."""
    queries = strided(torch.arange(labels.numel()), sample)
    if queries.numel() < 2:
        return 0.0
    distances = torch.cdist(embedding[queries], embedding)
    distances[torch.arange(queries.numel()), queries] = float("inf")  # leave each query out of its own neighbours
    nearest = distances.topk(min(NEIGHBOURS, labels.numel() - 1), largest=False).indices
    return float((labels[nearest] == labels[queries, None]).float().mean())


def group_content(embedding: torch.Tensor, labels: torch.Tensor, members: torch.Tensor, label: int,
                  num_classes: int) -> dict:
    """What the pixel neighbours (outside the group) of a group labelled ``label``, ``members`` (M,) indices on any
    device, say: ``agreement``, the share that carry ``label``; ``diversity``, the entropy of the other labels
    among them over its maximum, log(K - 1): 1 = spread evenly over every other class (relabelled content from all
    of them, what an all-to-one attack makes), 0 = one other class (a clean group confused with a neighbour
    class)."""
    members = members.cpu()
    group = torch.zeros(labels.numel(), dtype=torch.bool)
    group[members] = True
    found = neighbour_labels(embedding, labels, strided(members), group)
    if found.numel() == 0:
        return {"agreement": 1.0, "diversity": 0.0}
    others = found[found != label]
    share = torch.bincount(others, minlength=num_classes).double()
    share = share / share.sum().clamp(min=1)
    entropy = float(-(share[share > 0] * share[share > 0].log()).sum())
    return {"agreement": round(float((found == label).float().mean()), 4),
            "diversity": round(entropy / math.log(max(2, num_classes - 1)), 4)}
