"""What an image's pixels say about its label, independent of any training: nearest neighbours in pixel space.

Dirty-label poison is an image of one class relabelled as another, so the samples nearest to it in pixel space
carry other labels; under an all-to-one attack, many different ones (its sources). A clean group of a class looks
like its own class, or like one or two classes it is confused with. These statistics are read once per scan from
the input images (never from a trained model, which learns the trigger), so they do not depend on which samples
one training run happened to fit first.

The same holds for the exact readings of the pixels that step 3's last rules use: blocks of pixels repeated at
one position (:func:`shared_blocks`, :func:`class_bound_blocks`, :func:`common_blocks`), each image's count of
pixels at each value (:func:`value_counts`, :func:`value_histograms`, :func:`palette_holes`), and where its content
sits in its frame (:func:`framing_offsets`, :func:`out_of_frame`).

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


def nearest_in(embedding: torch.Tensor, queries: torch.Tensor, pool: torch.Tensor, k: int = NEIGHBOURS,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, min(k, P)) positions in ``pool`` (P,) indices of the ``k`` nearest of its samples (Euclidean, in
    ``embedding``) to each of ``queries`` (Q,) indices; with ``labels``, only samples of another class than the
    query's. In batches of 1,024 queries into one reused buffer, so memory stays at 1,024 x P distances.

    Why this shape: the step-3 rules look up the neighbours of most of the set, so this is quadratic in N and its
    constant matters (60,000 images: 26 s a rule with ``torch.cdist``, a same-class mask and a fresh buffer per
    batch). Queries are taken a class at a time against the pool's other classes (no mask to build and fill), and
    ranked by ``|p|^2 - 2 q.p``, one matrix product: the query's own ``|q|^2`` and the square root change no
    ranking."""
    k = min(k, pool.numel())
    out = torch.empty(queries.numel(), k, dtype=torch.long, device=queries.device)
    if labels is None:
        groups = [(torch.arange(queries.numel(), device=queries.device),
                   torch.arange(pool.numel(), device=pool.device))]
    else:
        query_labels, pool_labels = labels[queries], labels[pool]
        groups = [(torch.nonzero(query_labels == c).flatten(), torch.nonzero(pool_labels != c).flatten())
                  for c in torch.unique(query_labels).tolist()]
    for rows, positions in groups:
        masked = positions.numel() < k  # fewer samples of other classes than k: the nearest, then any of its own
        if masked:
            positions = torch.arange(pool.numel(), device=pool.device)
        points = embedding[pool[positions]]
        squared_norms = points.pow(2).sum(dim=1)
        buffer = points.new_empty(min(1024, rows.numel()), points.shape[0])  # reused: a fresh one costs page faults
        for i in range(0, rows.numel(), 1024):
            batch = rows[i:i + 1024]
            order = torch.addmm(squared_norms[None, :], embedding[queries[batch]], points.T, alpha=-2.0,
                                out=buffer[:batch.numel()])
            if masked:
                order[labels[queries[batch]][:, None] == labels[pool][None, :]] = float("inf")
            out[batch] = positions[order.topk(k, largest=False).indices]
    return out


def neighbour_labels(embedding: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, exclude: torch.Tensor,
                     k: int = NEIGHBOURS) -> torch.Tensor:
    """(Q, k) labels of the ``k`` nearest samples (Euclidean, in ``embedding``) to each of ``queries`` (Q,) indices,
    among the samples not in ``exclude`` (N,) bool."""
    reference = torch.nonzero(~exclude).flatten()
    return labels[reference][nearest_in(embedding, queries, reference, k)]


def pixel_residuals(embedding: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, exclude: torch.Tensor,
                    k: int = NEIGHBOURS) -> torch.Tensor:
    """(Q, D) each of ``queries`` (Q,) indices in ``embedding`` minus the mean of its ``k`` nearest samples of
    other classes outside ``exclude`` ((N,) bool): what a relabelled image adds to the content it was made from
    (its source class's typical images), for a clean image its difference from the look-alikes of other
    classes."""
    pool = torch.nonzero(~exclude).flatten()
    nearest = pool[nearest_in(embedding, queries, pool, k, labels=labels)]
    return embedding[queries] - embedding[nearest].mean(dim=1)


def mean_direction(residuals: torch.Tensor) -> torch.Tensor:
    """(D,) the mean of ``residuals`` (M, D) scaled to length 1: the way a group's pixel residuals point
    together (a trigger they share, for poison)."""
    mean = residuals.mean(0)
    return mean / mean.norm().clamp(min=1e-12)


def cosine_with(residuals: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """(M,) the cosine of each of ``residuals`` (M, D) with ``direction`` (D,), of length 1."""
    return residuals @ direction / residuals.norm(dim=1).clamp(min=1e-12)


SHARED_PATTERN_MIN_GAP = 0.5  # how much closer to the group's residual direction its members lie than the rest


def without_shared_residual(embedding: torch.Tensor, labels: torch.Tensor, members: torch.Tensor,
                            exclude: torch.Tensor, reference: torch.Tensor,
                            min_gap: float = SHARED_PATTERN_MIN_GAP) -> tuple[torch.Tensor, float]:
    """``embedding`` (N, D) with the direction the ``members`` (M,) indices share in their pixel residuals
    (:func:`pixel_residuals`, look-alikes outside ``exclude`` (N,) bool; the mean, scaled to length 1) projected
    out of every row, where that direction is the group's own: its members' median cosine with it exceeds that of
    ``reference`` (R,) indices (the rest of their class) by at least ``min_gap``; else ``embedding`` as it is.
    Also the gap (the members' median cosine where ``reference`` is empty).

    Why: a trigger that dominates the pixels (a white frame on small dark images) makes poisoned copies each
    other's nearest neighbours whatever their content, so the poison a quarantine has not yet taken vouches, by
    its label, for the poison it has. With the pattern out, a relabelled image's neighbours are its source class
    again. Why the gap: a clean subgroup's residuals share a direction too (what tells its class from the nearest
    other), and taking that out can make it look like another class (the tests' 3-class set: 13 of 15 clean flags
    kept; gap 0.16, its poison's 0.83); the rest of its class shares that direction, the rest of a trigger's class
    does not (measured, Fashion-MNIST 20k: a frame's flags 0.88-0.95, faint blends' 0.58-0.66, clean half-classes
    -0.01-0.25; benchmarks/seed_cut.py)."""
    if members.numel() == 0:
        return embedding, 0.0
    residuals = pixel_residuals(embedding, labels, members, exclude)
    direction = mean_direction(residuals)

    def median_cosine(rows: torch.Tensor) -> float:
        return float(cosine_with(rows, direction).median()) if rows.numel() else 0.0

    gap = median_cosine(residuals) - median_cosine(pixel_residuals(embedding, labels, reference, exclude))
    if gap < min_gap:
        return embedding, gap
    return embedding - (embedding @ direction)[:, None] * direction[None, :], gap


def own_label_share_outside(embedding: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor,
                            exclude: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """(Q,) share of the ``k`` nearest samples outside ``exclude`` ((N,) bool) of each of ``queries`` (Q,) indices
    that carry the query's label: :func:`own_label_share` with a group (a class's flags) kept out of its own
    neighbourhood, so its members do not vouch for each other."""
    if queries.numel() == 0:
        return torch.zeros(0)
    return (neighbour_labels(embedding, labels, queries, exclude, k) == labels[queries, None]).float().mean(dim=1)


def strided(indices: torch.Tensor, at_most: int = MAX_QUERIES) -> torch.Tensor:
    """At most ``at_most`` of ``indices``, evenly spaced (deterministic)."""
    return indices[::max(1, -(-indices.numel() // at_most))]


def own_label_share(embedding: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor,
                    k: int = NEIGHBOURS) -> torch.Tensor:
    """(Q,) share of the ``k`` nearest other samples (Euclidean, in ``embedding``) of each of ``queries`` (Q,)
    indices that carry the query's label. Runs on ``embedding``'s device."""
    labels = labels.to(embedding.device)
    queries = queries.to(embedding.device)
    k = min(k, labels.numel() - 1)
    out = []
    for i in range(0, queries.numel(), 1024):
        batch = queries[i:i + 1024]
        distances = torch.cdist(embedding[batch], embedding)
        distances[torch.arange(batch.numel(), device=batch.device), batch] = float("inf")  # not its own neighbour
        nearest = distances.topk(k, largest=False).indices
        out.append((labels[nearest] == labels[batch, None]).float().mean(dim=1))
    return torch.cat(out) if out else torch.zeros(0, device=embedding.device)


def relabelled_members(embedding: torch.Tensor, labels: torch.Tensor, members: torch.Tensor,
                       outlier_share: float = 0.5, source_share: float = 0.7) -> torch.Tensor:
    """The subset of ``members`` (M,) indices of one class that look like typical images of another class: most of
    their nearest neighbours carry other labels (at most ``outlier_share`` their own), and among the samples outside
    that outlier group none of them carries their label and at least ``source_share`` carry one other label.

    Why two steps: relabelled copies of one source class are each other's neighbours and share their new label (at
    10 % poison about a fifth of a poisoned image's neighbours), so the first, lenient step finds them; it also
    takes a class's border cases (a T-shirt that looks like a shirt; measured: 17-20 % of the group on
    Fashion-MNIST's all-to-one attacks). Outside the group, a relabelled image's neighbours are its source class,
    while a border case's are a mix of its own class and one or two others (precision 92-96 % after this step).
    Runs on ``embedding``'s device; returns indices on ``members``'s."""
    device = members.device
    labels, members = labels.to(embedding.device), members.to(embedding.device)
    share = own_label_share(embedding, labels, members)
    outliers = members[share <= outlier_share]
    if outliers.numel() == 0:
        return outliers.to(device)
    inside = torch.zeros(labels.numel(), dtype=torch.bool, device=embedding.device)
    inside[outliers] = True
    found = neighbour_labels(embedding, labels, outliers, inside)
    own = (found == labels[outliers, None]).any(dim=1)
    counts = torch.nn.functional.one_hot(found, int(labels.max()) + 1).sum(dim=1)
    source = counts.max(dim=1).values >= source_share * found.shape[1]
    return outliers[~own & source].to(device)


def label_agreement(embedding: torch.Tensor, labels: torch.Tensor, sample: int = 1000) -> float:
    """Share of the nearest neighbours of a strided sample that carry the sample's label: how much pixel
    neighbourhoods say about labels in this dataset (Fashion-MNIST about 0.8; far less for natural photos)."""
    queries = strided(torch.arange(labels.numel()), sample)
    if queries.numel() < 2:
        return 0.0
    return float(own_label_share(embedding, labels, queries).mean())


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


BLOCK = 3  # side of the pixel blocks compared exactly (a 3x3 patch at 28x28; larger triggers hold such blocks too)
BLOCK_MAX_PIXELS = 64 * 64  # larger images skip the exact search: its cost grows with H x W per image
_HASH_PRIME = np.uint64(1_000_003)


def background_value(images: np.ndarray) -> int:
    """The set's most common pixel value, read from about 1,000 of its images: its background."""
    n = images.shape[0]
    return int(np.bincount(images[::max(1, n // 1000)].ravel(), minlength=256).argmax())


def _hashed_in(codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``codes`` (uint64) with one more pixel value each folded in (the hash wraps around 2**64 on purpose: call
    under ``np.errstate(over="ignore")``). One step of the hash of blocks and of whole images."""
    return codes * _HASH_PRIME + values.astype(np.uint64) + np.uint64(1)


def shared_blocks(images: np.ndarray, flagged: np.ndarray, min_share: float, enrichment: float,
                  size: int = BLOCK) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(N,) bool: the samples that carry, at its own position, a block of pixels (``size`` x ``size``, every
    channel, compared exactly) that at least ``min_share`` of the ``flagged`` samples ((N,) bool) carry there and
    that is at least ``enrichment`` times as common among them as in the whole set, and is not flat in the set's
    background value (its most common pixel value); and those blocks' positions (row, column of the top-left
    pixel), in order.

    Why: a stamped trigger (a patch, a fixed pattern on a background that is the same in every image) writes the
    same pixel values at the same place into every image that carries it, whatever the image shows, while two
    natural images almost never share a block that is not flat. So a block most flags share, and the rest of the
    set rarely does, is the trigger itself, and its carriers are the images the attacker stamped: the poison the
    quarantine missed among them, and none of the clean images it took (they carry no such block). A flat block
    counts too (BadNets' white square), but not a patch of background: a trigger that moves the content (a shift
    by three pixels, all-to-all) leaves background where the content was, shared by its flags and by every image
    whose content is elsewhere, and taking those added up to 3 % of the clean set in such runs. Blocks are
    compared by a 64-bit hash, one row of positions at a time (:func:`_block_codes`).
    """
    n, _, h, w = images.shape
    carriers = np.zeros(n, dtype=bool)
    positions: list[tuple[int, int]] = []
    num_flagged = int(flagged.sum())
    if num_flagged == 0 or h < size or w < size:
        return carriers, positions
    background = background_value(images)
    flagged_rows = np.flatnonzero(flagged)
    for row, codes in _block_codes(images, size):
        for col in range(codes.shape[1]):
            values, first, counts = np.unique(codes[flagged, col], return_index=True, return_counts=True)
            often = counts >= min_share * num_flagged
            for value, where, count in zip(values[often], first[often], counts[often]):
                block = images[flagged_rows[where], :, row:row + size, col:col + size]
                if bool((block == background).all()):
                    continue  # background, not a pattern
                carry = codes[:, col] == value
                if count / num_flagged >= enrichment * carry.mean():
                    carriers |= carry
                    positions.append((row, col))
    return carriers, positions


def common_blocks(images: np.ndarray, min_share: float,
                  size: int = BLOCK) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(N,) bool: the samples that carry, at its own position, a block of pixels (``size`` x ``size``, every
    channel, compared exactly, not of one value) that at least ``min_share`` of the set's distinct images carry
    there; and those blocks' positions (row, column), in order. Needs no flag and no label.

    Why: a stamp is the same pixel values at the same place in every image the attacker stamped, a share of the
    whole set, whichever classes they came from; natural images share an exact block only where they are flat or
    nearly so (on 20,000 clean Fashion-MNIST images, 2.2 % of them at the most, at the edge of the frame).
    Copies of one image share every block, so carriers count once per distinct image."""
    n = images.shape[0]
    carriers = np.zeros(n, dtype=bool)
    positions: list[tuple[int, int]] = []
    if n == 0 or min_share <= 0 or images.shape[2] < size or images.shape[3] < size:
        return carriers, positions
    least = max(CLASS_BLOCK_MIN_IMAGES, int(np.ceil(min_share * n)))
    image_codes = None
    for row, col, carry in _frequent_blocks(images, least, size):
        image_codes = _image_codes(images) if image_codes is None else image_codes
        if np.unique(image_codes[carry]).size >= least:
            carriers |= carry
            positions.append((row, col))
    return carriers, positions


def _frequent_blocks(images: np.ndarray, least: int, size: int):
    """(row, column, carriers (N,) bool) for each block of pixels (``size`` x ``size``, compared exactly) that at
    least ``least`` images carry at that position and that is not of one value (a plain region, natural in some
    sets); what :func:`common_blocks` and :func:`class_bound_blocks` then judge."""
    for row, codes in _block_codes(images, size):
        for col in range(codes.shape[1]):
            values, first, counts = np.unique(codes[:, col], return_index=True, return_counts=True)
            for value, where in zip(values[counts >= least], first[counts >= least]):
                block = images[where, :, row:row + size, col:col + size]
                if not bool((block == block.flat[0]).all()):
                    yield row, col, codes[:, col] == value


def _block_codes(images: np.ndarray, size: int):
    """(row, codes) for each row of block positions: ``codes`` (N, W - size + 1) uint64, a hash of each image's
    ``size`` x ``size`` block (every channel) whose top-left pixel is at (row, column). Equal blocks hash equal;
    unequal ones collide with a chance of about 2**-64 per pair. One row at a time, so memory stays at a few bytes
    per image and column."""
    n, c, h, w = images.shape
    cols = w - size + 1
    with np.errstate(over="ignore"):  # the hash wraps around 2**64 on purpose
        for row in range(h - size + 1):
            codes = np.zeros((n, cols), dtype=np.uint64)
            for ch in range(c):
                for dy in range(size):
                    line = images[:, ch, row + dy]
                    for dx in range(size):
                        codes = _hashed_in(codes, line[:, dx:dx + cols])
            yield row, codes


CLASS_BLOCK_PURITY = 0.9  # share of a block's carriers in one class for it to be that class's block
CLASS_BLOCK_MIN_IMAGES = 10  # distinct images carrying it, at the least (copies of one image share every block)


def class_bound_blocks(images: np.ndarray, labels: np.ndarray, min_class_share: float,
                       purity: float = CLASS_BLOCK_PURITY,
                       size: int = BLOCK) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """(N,) bool: the samples that carry, at its own position, a block of pixels (``size`` x ``size``, every
    channel, compared exactly, not of one value) that at least ``min_class_share`` of one class's samples carry
    there and whose carriers are at least ``purity`` that class's, and that are labelled that class; and those
    blocks' (row, column, class), in order. Needs no flag: the images and labels alone.

    Why: a trigger written onto one class's images (clean-label: sig's sine, a patch on images the attacker left
    labelled as they are; or all of an all-to-one attack's poison, relabelled to its target) puts the same pixel
    values at the same place into a large part of that class, while natural images share an exact block only
    where they are flat or nearly so, and no such block is one class's. Carriers count once per distinct image,
    and at least ``CLASS_BLOCK_MIN_IMAGES`` of them: copies of one image (common in scraped sets) share every
    block, and a small class's few images prove nothing. On 20,000 clean Fashion-MNIST images
    (28x28, and padded to 3x32x32) the most any non-flat block held of a class, at 90 % purity, was 3.7 %; the
    triggers that write fixed values onto Fashion-MNIST's flat background (patches, blends, added patterns), at
    5-10 % poison, held 30-98 % of their class. A flat block is left out: a plain region (a saturated sky, a
    border) can be one class's in natural photos. The quarantine misses exactly these cases where the poison is
    the class (sig at 10 % is 98 % of its class): then nothing in the class fits faster than the rest.
    """
    n = images.shape[0]
    carriers = np.zeros(n, dtype=bool)
    found: list[tuple[int, int, int]] = []
    if n == 0 or min_class_share <= 0 or images.shape[2] < size or images.shape[3] < size:
        return carriers, found
    class_sizes = np.bincount(labels)
    least = max(CLASS_BLOCK_MIN_IMAGES, int(np.ceil(min_class_share * class_sizes[class_sizes > 0].min())))
    image_codes = _image_codes(images)
    for row, col, carry in _frequent_blocks(images, least, size):
        per_class = np.bincount(labels[carry], minlength=class_sizes.size)
        top = int(per_class.argmax())
        if per_class[top] < purity * carry.sum():
            continue  # other classes' too
        in_class = carry & (labels == top)
        distinct = np.unique(image_codes[in_class]).size
        if distinct >= max(CLASS_BLOCK_MIN_IMAGES, min_class_share * class_sizes[top]):
            carriers |= in_class
            found.append((row, col, top))
    return carriers, found


def _image_codes(images: np.ndarray) -> np.ndarray:
    """(N,) uint64: a hash of each whole image (equal images hash equal), as :func:`_block_codes` hashes blocks."""
    flat = images.reshape(images.shape[0], -1)
    codes = np.zeros(flat.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):  # the hash wraps around 2**64 on purpose
        for column in flat.T:
            codes = _hashed_in(codes, column)
    return codes


def value_counts(images: np.ndarray) -> np.ndarray:
    """(N, 256) int32: each image's count of pixels at each value (every channel), the set's background value
    left out (0). What :func:`value_histograms` and :func:`palette_holes` read."""
    n = images.shape[0]
    flat = images.reshape(n, -1)
    counts = np.zeros((n, 256), dtype=np.int32)
    for start in range(0, n, 1024):  # one bincount over a block of images at a time: memory stays small
        rows = flat[start:start + 1024].astype(np.int64) + 256 * np.arange(min(1024, n - start))[:, None]
        counts[start:start + len(rows)] = np.bincount(rows.ravel(), minlength=256 * len(rows)).reshape(-1, 256)
    counts[:, background_value(images)] = 0
    return counts


def value_histograms(counts: np.ndarray) -> np.ndarray:
    """(N, 256) float32: each image's share of pixels at each value (``counts`` from :func:`value_counts`: the
    background left out), square-rooted (so a few pixels at a rare value count). Where a filter trigger (a coarser
    palette, a shift of brightness) leaves its mark: it moves each image's values, not its pixels' positions."""
    counts = counts.astype(np.float32)
    return np.sqrt(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0))


PALETTE_FEW = 0.3  # a value the flags hold under this share of what their classes' other images would: suspect
PALETTE_CORE_ROOM = 0.1  # a flag holding at most this share of its expected count at those values is the core's
PALETTE_CORE_SHARE = 0.5  # the core: at least this share of the flags, or the flags share no palette
PALETTE_HOLE = 0.05  # a value the core holds under this share of its expected count is a hole ...
PALETTE_MIN_HOLES = 16  # ... and a palette has at least this many holes (a few missing values are a detail:
# a value map that skips values skips many, gamma 0.6 47, a 0.2 blend 31-39, posterize 252; flags sharing no
# filter, 500 clean T-shirts beside 2,000 blended ones in their class, showed up to 8; benchmarks/simulated_flags.py)


def palette_holes(counts: np.ndarray, labels: np.ndarray, flagged: np.ndarray, num_classes: int,
                  min_expected: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """The holes in the flags' palette and, per image, how many of its pixels a clean image of its class would put
    there: ((256,) bool holes, (N,) expected count, (N,) its count there), all empty (no hole) where the flags
    share none; and what was seen, for run.json. ``counts`` from :func:`value_counts`; what a clean image of a
    class holds is read from the class's unflagged images (value shares, times the image's own pixel count).

    Three steps, each against a bar above: the values the flags hold too rarely (under ``PALETTE_FEW`` of their
    expected count); the core, the flags that hold almost none of those (``PALETTE_CORE_ROOM``), expected at
    least ``min_expected``, and at least ``PALETTE_CORE_SHARE`` of the flags; the holes, the values the core
    holds almost never (``PALETTE_HOLE``), at least ``PALETTE_MIN_HOLES`` of them, with the core's median
    expected count there at least ``min_expected``. The core makes the holes exact: a flag set with a quarter
    clean images holds every value, and a filter's poison none of the holes.

    Why: a filter that maps each value to another (a gamma curve, a coarser palette, a contrast stretch) stretches
    some ranges of values, and the values it skips are never in its output, whatever the image showed: gamma 0.6
    never gives 47 of the values up to 101. A clean image of the class holds dozens of pixels there; a
    filtered one exactly none."""
    n = counts.shape[0]
    info: dict = {}
    none = np.zeros(256, dtype=bool), np.zeros(n), np.zeros(n, dtype=np.int64)
    num_flagged = int(flagged.sum())
    if num_flagged == 0:
        return (*none, info)
    shares = np.zeros((num_classes, counts.shape[1]))
    for c in range(num_classes):
        total = counts[(labels == c) & ~flagged].sum(axis=0, dtype=np.int64)
        shares[c] = total / max(int(total.sum()), 1)
    pixels = counts.sum(axis=1, dtype=np.int64).astype(np.float64)

    def expected_in(members: np.ndarray) -> np.ndarray:  # (256,) the members' expected count at each value
        return np.bincount(labels[members], weights=pixels[members], minlength=num_classes) @ shares

    def at(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (N,) expected and own counts at ``values``
        return pixels * (shares[:, values].sum(axis=1))[labels], counts[:, values].sum(axis=1, dtype=np.int64)

    expected = expected_in(flagged)
    few = (counts[flagged].sum(axis=0, dtype=np.int64) < PALETTE_FEW * expected) & (expected >= 0.1 * num_flagged)
    expected_few, held_few = at(few)
    core = flagged & (expected_few >= min_expected) & (held_few <= PALETTE_CORE_ROOM * expected_few)
    info["core"] = int(core.sum())
    if info["core"] < PALETTE_CORE_SHARE * num_flagged:
        return (*none, info)
    expected = expected_in(core)
    holes = (counts[core].sum(axis=0, dtype=np.int64) < PALETTE_HOLE * expected) & (expected >= 0.1 * info["core"])
    info["holes"] = int(holes.sum())
    if info["holes"] < PALETTE_MIN_HOLES:
        return (*none, info)
    expected_holes, held_holes = at(holes)
    info["median_expected"] = round(float(np.median(expected_holes[core])), 1)
    if info["median_expected"] < min_expected:
        return (*none, info)
    info["values"] = np.flatnonzero(holes).tolist()
    return holes, expected_holes, held_holes, info


FRAME_EMPTY_SHARE = 1e-4  # an offset that at most this share of the set has counts as empty
FRAME_MIN_SHARE = 1e-3  # images past an empty band, at the least: this share of the set ...
FRAME_MIN_IMAGES = 10  # ... and this many


def framing_offsets(images: np.ndarray, wrapped: bool = True) -> np.ndarray:
    """(N, 2) int: where each image's content sits in its frame, as its left margin less its right margin and its
    top margin less its bottom margin, in pixels (content: pixels not at the set's background value, in any
    channel; an image without content: 0, 0), content rolled round an edge read as the circle it is
    (:func:`_line_offsets`; ``wrapped`` False: the plain margins). A centred image is at 0 or +-1."""
    n = images.shape[0]
    background = background_value(images)
    offsets = np.zeros((n, 2), dtype=np.int64)
    for start in range(0, n, 4096):  # a block of images at a time: the content mask of 60k RGB images is 180 MB
        content = (images[start:start + 4096] != background).any(axis=1)
        for axis, lines in enumerate((content.any(axis=1), content.any(axis=2))):  # columns, rows holding content
            offsets[start:start + len(lines), axis] = _line_offsets(lines, wrapped)
    return offsets


def _line_offsets(lines: np.ndarray, wrapped: bool = True) -> np.ndarray:
    """(M,) int: each row of ``lines`` ((M, W) bool, the columns or the rows that hold content) as an offset, its
    margin before the content less its margin after. Content that touches both edges with an empty run inside was
    rolled round the edge (as np.roll leaves it): the W lines are read as a circle, the content starts after its
    longest empty run and counts past the edge, so an image rolled 3 pixels is 6 from where it was, wrapped or not.

    Why: a trigger that shifts the image round (the held-out shift) wraps an item wider than its margin, which then
    touches both edges, and plain margins put it at the centre (offset 0): 216 of the 232 poisoned images the
    scan left all-to-all at seed 0. Clean items rarely read so (61 of Fashion-MNIST's 70,000, nearly all on the
    vertical axis, at scattered offsets), and :func:`out_of_frame` takes an image read round the edge only beside
    a group moved plainly."""
    m, w = lines.shape
    first, after = np.argmax(lines, axis=1), np.argmax(lines[:, ::-1], axis=1)
    offsets = np.where(lines.any(axis=1), first - after, 0)
    if not wrapped:
        return offsets
    longest = np.zeros(m, dtype=np.int64)  # the longest empty run inside the content, and the line it ends on
    end = np.zeros(m, dtype=np.int64)
    run = np.zeros(m, dtype=np.int64)  # empty lines since the last content
    seen = lines[:, 0].copy()  # content met so far: a run before it is a margin
    for j in range(1, w):
        closes = lines[:, j] & seen & (run > longest)  # an empty run inside ends just before line j
        longest = np.where(closes, run, longest)
        end = np.where(closes, j - 1, end)
        run = np.where(lines[:, j], 0, run + 1)
        seen |= lines[:, j]
    rolled = (first + after == 0) & (longest > 0)  # content on both edges, empty inside: rolled round the edge
    start = end + 1  # the content's first line, reading round the circle; it then spans w - longest lines
    round_the_edge = (2 * start - longest + w) % (2 * w) - w  # the nearer way round: rolled left is negative
    return np.where(rolled, round_the_edge, offsets)


def out_of_frame(images: np.ndarray, band: int, wrapped: bool = True) -> tuple[np.ndarray, list[dict]]:
    """(N,) bool: the images framed unlike the set, and where (one entry per axis and side: the first offset past
    the set's framing, the images at or past it). Per axis (:func:`framing_offsets`), walking out from the
    commonest offset to either side, the first ``band`` offsets in a row that the set leaves empty (each held by
    at most ``FRAME_EMPTY_SHARE`` of it) part the set's framing from what lies past them, which is out of frame
    where it is at least ``FRAME_MIN_IMAGES`` images and ``FRAME_MIN_SHARE`` of the set.

    The band and the group are read from the plain margins; with ``wrapped``, a side that holds such a group also
    takes the images that are past the band only when read round the edge (:func:`framing_offsets`): the moved
    images whose content wrapped, the same move as the group's.

    Why: a set cut by one pipeline frames its images one way (Fashion-MNIST centres every item to a pixel: its
    60,000 training images are at -1..2 on both axes), so a group of images whose content sits apart from that,
    past an empty band, was made some other way: a geometric trigger (the content moved 3 pixels: offsets 5-8)
    leaves no new pixel value and no block for the other rules to follow. A set framed every way (natural photos,
    whose content touches every edge, or objects placed anywhere) has no empty band, and nothing is out of frame.
    Read round the edge alone, without a group read plainly, nothing is: pieces of content at both edges (a blend
    in patches: adaptive-blend, 23 images at +10) look rolled, and so do a few clean items with an empty line
    inside (55 of Fashion-MNIST's 60,000)."""
    n = images.shape[0]
    out = np.zeros(n, dtype=bool)
    found: list[dict] = []
    if band <= 0 or n == 0:
        return out, found
    plain = framing_offsets(images, wrapped=False)
    offsets = framing_offsets(images) if wrapped else plain
    for axis, name in enumerate(("x", "y")):
        size = images.shape[3 - axis]
        counts = np.bincount(plain[:, axis] + size, minlength=2 * size + 1)
        empty = counts <= FRAME_EMPTY_SHARE * n
        mode = int(np.argmax(counts))
        for step in (1, -1):
            at, run = mode + step, 0
            while 0 <= at < counts.size and run < band:
                run = run + 1 if empty[at] else 0
                at += step
            if run < band:
                continue
            if ((plain[:, axis] + size - at) * step >= 0).sum() < max(FRAME_MIN_IMAGES, FRAME_MIN_SHARE * n):
                continue  # no group past the band, read plainly
            past = (offsets[:, axis] + size - at) * step >= 0  # at or past the band's far side (wrapped: as well)
            out |= past
            found.append({"axis": name, "from": int(at - size), "images": int(past.sum())})
    return out, found
