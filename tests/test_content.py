"""Pixel-content statistics (qtclean.content) and the content seed they drive (qt.content_seed)."""

from __future__ import annotations

import numpy as np
import torch

from conftest import framed
from qtclean import content, qt, readout

K = 5


def _images(per_class: int = 40, sources: tuple[int, ...] = (1, 2, 3, 4), per_source: int = 10, seed: int = 0):
    """Class c's images are noisy copies of one prototype (1x8x8 uint8). Poison: ``per_source`` images of each
    class in ``sources``, labelled 0 (dirty-label, all-to-one when ``sources`` is every other class)."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(K, 1, 8, 8))
    labels = np.repeat(np.arange(K), per_class)
    origin = labels.copy()
    poison_origin = np.repeat(np.array(sources, dtype=np.int64), per_source)
    origin = np.concatenate([origin, poison_origin])
    labels = np.concatenate([labels, np.zeros(len(poison_origin), dtype=np.int64)])
    noise = rng.normal(0, 12, size=(len(origin), 1, 8, 8))
    images = np.clip(prototypes[origin] + noise, 0, 255).astype(np.uint8)
    poisoned = np.zeros(len(labels), dtype=bool)
    poisoned[K * per_class:] = True
    return images, torch.from_numpy(labels), torch.from_numpy(poisoned)


def _features(poisoned: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """What a K-way model that learned the trigger gives: one extra direction for the poison, noise otherwise."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(poisoned.numel(), 6, generator=gen)
    feats[poisoned, 0] += 8.0
    return feats


def test_pixel_embedding_is_deterministic_and_leaves_the_training_rng_alone():
    images, _, _ = _images()
    state = torch.random.get_rng_state()
    first = content.pixel_embedding(images, dims=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.shape == (len(images), 5) and first.dtype == torch.float32
    assert torch.equal(first, content.pixel_embedding(images, dims=5))


def test_relabelled_content_disagrees_with_its_label_and_spreads_over_its_sources():
    images, labels, poisoned = _images()
    emb = content.pixel_embedding(images, dims=8)
    poison = content.group_content(emb, labels, torch.nonzero(poisoned).flatten(), 0, K)
    assert poison["agreement"] < 0.1 and poison["diversity"] > 0.9  # from classes 1-4, evenly
    clean = (labels == 2) & (torch.arange(len(labels)) % 2 == 0)  # half of a clean class
    # its other half is near (and so are the 10 relabelled 2s):
    assert content.group_content(emb, labels, torch.nonzero(clean).flatten(), 2, K)["agreement"] > 0.5
    assert content.label_agreement(emb, labels) > 0.6


def test_content_seed_takes_the_relabelled_cluster_and_no_clean_half():
    images, labels, poisoned = _images()
    emb = content.pixel_embedding(images, dims=8)
    mask, info = qt.content_seed(emb, _features(poisoned), labels, K, qt.QTConfig(), dims=4)
    assert torch.equal(mask, poisoned)
    assert info["pixel_label_agreement"] > 0.6 and {"0", "1", "2", "3", "4"} <= set(info)
    skip = torch.tensor([True] + [False] * (K - 1))
    assert not qt.content_seed(emb, _features(poisoned), labels, K, qt.QTConfig(), skip=skip, dims=4)[0].any()
    assert not qt.content_seed(emb, _features(poisoned), labels, K, qt.QTConfig.paper(), dims=4)[0].any()  # off


def test_nearest_in_finds_each_querys_nearest_of_other_classes_as_a_brute_force_search_does():
    """The class-at-a-time search (ranked by |p|^2 - 2 q.p, more than one batch of queries) returns, for every query,
    the same neighbours in the same order as the plain distances with the query's class masked out; without labels,
    the plain nearest; and where the other classes hold fewer samples than k, those first, then the query's own."""
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(3000, 6, generator=g) * torch.linspace(3.0, 0.5, 6)
    labels = torch.randint(0, 4, (3000,), generator=g)
    pool = torch.nonzero(torch.rand(3000, generator=g) < 0.8).flatten()
    queries = torch.arange(0, 3000, 2)  # 1,500: two batches of 1,024
    distances = torch.cdist(embedding[queries], embedding[pool])
    plain = distances.topk(10, largest=False).indices
    distances[labels[queries][:, None] == labels[pool][None, :]] = float("inf")
    other = distances.topk(10, largest=False).indices
    assert torch.equal(content.nearest_in(embedding, queries, pool), plain)
    found = content.nearest_in(embedding, queries, pool, labels=labels)
    assert torch.equal(found, other)
    assert (labels[pool][found] != labels[queries][:, None]).all()

    few = torch.tensor([0] * 20 + [1] * 3)  # class 1's queries see 20 others, class 0's only 3
    points = torch.arange(23, dtype=torch.float32)[:, None]
    near = content.nearest_in(points, torch.tensor([0, 22]), torch.arange(23), k=5, labels=few)
    assert set(near[0, :3].tolist()) == {20, 21, 22} and (few[near[0, 3:]] == 0).all()
    assert near[1].tolist() == [19, 18, 17, 16, 15]


def test_own_label_share_leaves_each_sample_out_of_its_own_neighbours():
    images, labels, poisoned = _images()
    emb = content.pixel_embedding(images, dims=8)
    queries = torch.arange(len(labels))
    share = content.own_label_share(emb, labels, queries)
    distances = torch.cdist(emb, emb)
    distances.fill_diagonal_(float("inf"))
    expected = (labels[distances.topk(10, largest=False).indices] == labels[:, None]).float().mean(dim=1)
    assert torch.allclose(share, expected)
    assert float(share[poisoned].max()) <= 0.5  # relabelled: among its sources
    assert float((share[~poisoned] > 0.5).float().mean()) > 0.9
    assert torch.allclose(content.own_label_share(emb, labels, queries[poisoned]), share[poisoned])


def _mixing_zone():
    """Points (2-D), labels, poison and border-case indices: class 0 holds relabelled images from inside class 1's
    cluster (poison) and clean border cases in a zone where classes 1 and 2 alternate (neighbours half 1, half 2)."""
    gen = torch.Generator().manual_seed(0)

    def blob(centre, n):
        return torch.tensor(centre) + torch.rand(n, 2, generator=gen)

    grid = torch.cartesian_prod(torch.arange(7.0), torch.arange(7.0))  # a zone where classes 1 and 2 alternate
    points = torch.cat([blob((0.0, 0.0), 40), blob((20.0, 0.0), 40), blob((0.0, 20.0), 40),  # classes 0, 1, 2
                        blob((20.0, 0.0), 8),  # poison: class 1 images labelled 0
                        grid + 10.0, torch.tensor([[12.5, 12.5], [13.5, 12.5], [12.5, 13.5], [13.5, 13.5]])])
    labels = torch.cat([torch.full((40,), 0), torch.full((40,), 1), torch.full((40,), 2), torch.full((8,), 0),
                        (grid.sum(dim=1) % 2 + 1).long(), torch.full((4,), 0)])  # border cases: class 0
    return points, labels, torch.arange(120, 128), torch.arange(177, 181)


def test_relabelled_members_are_typical_images_of_another_class_not_border_cases():
    """Class 0 holds relabelled images from inside class 1's cluster (poison) and a few clean border cases in a
    zone where classes 1 and 2 mix: both have mostly other labels around them, only the poison has one source."""
    points, labels, poison, border = _mixing_zone()
    members = torch.nonzero(labels == 0).flatten()
    share = content.own_label_share(points, labels, border)
    assert float(share.max()) <= 0.5  # the border cases are outliers too ...
    assert torch.equal(content.relabelled_members(points, labels, members), poison)  # ... but have no one source


def test_a_withdrawn_class_is_widened_by_the_lenient_source_test_only_where_its_content_seed_is():
    """readout.widen_content_seed: in a content-seeded class, members whose neighbours outside its outliers carry none
    of its label and half one other label join the seed (the border cases, at source share 0.5, not at the seed's
    own 0.7); classes 1 and 2, whose grid points are outliers too, are left as they are (no content seed), and
    the seed stays whatever its pixels say."""
    points, labels, poison, border = _mixing_zone()
    seed = torch.zeros(labels.numel(), dtype=torch.bool)
    seed[poison[:5]] = True
    seed[3] = True  # a seed member that is no pixel outlier stays
    only_zero = torch.tensor([True, False, False])
    widened = readout.widen_content_seed(points, labels, seed, only_zero, source_share=0.5)
    expected = seed.clone()
    expected[poison] = True
    expected[border] = True
    assert torch.equal(widened, expected)
    strict = readout.widen_content_seed(points, labels, seed, only_zero, source_share=0.7)
    expected[border] = False
    assert torch.equal(strict, expected)
    nothing_seeded = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(readout.widen_content_seed(points, labels, seed, nothing_seeded, source_share=0.5), seed)


def test_content_seed_takes_the_pixel_outliers_when_the_features_do_not_split_the_poison():
    """A network whose features have not separated the poison (random features here): the class's pixel outliers
    are the relabelled content itself."""
    images, labels, poisoned = _images()
    emb = content.pixel_embedding(images, dims=8)
    random_features = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(3))
    mask, info = qt.content_seed(emb, random_features, labels, K, qt.QTConfig(), dims=4)
    assert torch.equal(mask, poisoned)
    pixel_groups = [s for s in info["0"] if s["group"] == "pixels"]
    assert len(pixel_groups) == 1 and pixel_groups[0]["size"] == int(poisoned.sum())
    cfg = qt.QTConfig()
    assert all(not qt.content_accepted(s, cfg) for s in info["0"] if s["group"] == "features")


def test_content_seed_leaves_poison_from_a_single_source_and_data_whose_pixels_say_nothing():
    images, labels, poisoned = _images(sources=(1,), per_source=40)  # relabelled, but from one class only
    emb = content.pixel_embedding(images, dims=8)
    mask, info = qt.content_seed(emb, _features(poisoned), labels, K, qt.QTConfig(), dims=4)
    assert not mask.any()
    assert min(s["diversity"] for s in info["0"]) < qt.QTConfig().content_min_diversity
    images, labels, poisoned = _images()
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]  # labels unrelated
    mask, info = qt.content_seed(content.pixel_embedding(images, dims=8), _features(poisoned), shuffled, K,
                                 qt.QTConfig(), dims=4)
    assert not mask.any() and info["pixel_label_agreement"] < 0.5 and set(info) == {"pixel_label_agreement"}


def test_an_expanded_seed_must_be_relabelled_content():
    """A bimodal class is not enough: a clean class can have two modes (Fashion-MNIST's bags were expanded this
    way); with the pixel embedding, only a group whose pixel neighbours carry other labels is taken."""
    images, labels, poisoned = _images()
    emb = content.pixel_embedding(images, dims=8)
    feats = _features(poisoned)
    clean_half = (labels == 2) & (torch.arange(len(labels)) % 2 == 0)
    feats[clean_half, 1] += 8.0  # class 2: two modes in feature space, both clean
    pre = torch.zeros(len(labels), dtype=torch.bool)
    pre[torch.nonzero(poisoned).flatten()[:2]] = True  # class 0: two poisoned samples, too few to trust alone
    pre[torch.nonzero(clean_half).flatten()[:2]] = True  # class 2: two of its clean mode
    classes = torch.tensor([True, False, True, False, False])
    without, info = qt.expand_seed(feats, labels, pre, classes, qt.QTConfig(), dims=4)
    assert info[2]["accepted"] and bool(without[clean_half].all())  # bimodal, so taken on features alone
    checked, info = qt.expand_seed(feats, labels, pre, classes, qt.QTConfig(), dims=4, embedding=emb)
    assert torch.equal(checked, poisoned)
    assert info[0]["accepted"] and info[0]["pixel_agreement"] < 0.15
    assert not info[2]["accepted"] and info[2]["pixel_agreement"] > 0.5


def test_large_images_are_averaged_to_a_thumbnail_first():
    """A 4096x4096 set must not build a 16M x 16M covariance: the pixels are area-averaged to 32x32 first."""
    images, labels, _ = _images()
    big = np.repeat(np.repeat(images, 8, axis=2), 8, axis=3)  # 64x64, each pixel an 8x8 block
    small = np.repeat(np.repeat(images, 4, axis=2), 4, axis=3)  # 32x32: what the average gives
    assert torch.allclose(content.pixel_embedding(big, dims=5), content.pixel_embedding(small, dims=5), atol=1e-4)


def test_a_pattern_is_taken_out_only_where_it_is_the_groups_own():
    """Poisoned images with a large added trigger: their residuals point its way and the rest of their class's do
    not, so that direction is projected out (the trigger gone, they sit by their sources). A clean half of a
    class shares what tells the class from others with the other half: the embedding comes back as it was."""
    g = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.eye(4, 12)
    labels = torch.arange(4).repeat_interleave(60)
    trigger = torch.zeros(12)
    trigger[-1] = 20.0
    sources = 1 + torch.arange(36) % 3
    embedding = torch.cat([centres[labels], centres[sources] + trigger]) + 0.5 * torch.randn(276, 12, generator=g)
    labels = torch.cat([labels, torch.zeros(36, dtype=torch.long)])
    poison = torch.arange(240, 276)
    flags = torch.zeros(276, dtype=torch.bool)
    flags[poison[:27]] = True
    rest = torch.nonzero(~flags & (labels == 0)).flatten()
    out, gap = content.without_shared_residual(embedding, labels, poison[:27], flags, rest)
    assert gap >= content.SHARED_PATTERN_MIN_GAP
    assert out[poison, -1].abs().max() < 1.0 < embedding[poison, -1].min()  # the trigger's axis is gone
    half = torch.nonzero(labels == 1).flatten()[:30]
    clean = torch.zeros(276, dtype=torch.bool)
    clean[half] = True
    out, gap = content.without_shared_residual(embedding, labels, half, clean,
                                               torch.nonzero(~clean & (labels == 1)).flatten())
    assert gap < content.SHARED_PATTERN_MIN_GAP and out is embedding


def test_shared_blocks_are_the_stamped_patch_not_a_flat_background_or_a_detail_every_image_has():
    """40 poisoned images carry a 3x3 patch at (5, 5); 30 of them and 5 clean images are flagged. Every image
    carries another pattern at (5, 0) (a detail of the data, as common among the flags as anywhere), and the top
    left corner is flat black in the poison and in every other image (a background: over half of the set), the
    top right corner flat black in the poison alone (background, however rare). Only the patch is the trigger,
    and its carriers are the poison, flagged or not; a flat white square stamped instead is a trigger too."""
    images, labels, poisoned = _images()
    poison = poisoned.numpy()
    patch = np.array([[255, 0, 255], [0, 255, 0], [255, 255, 0]], dtype=np.uint8)
    images[poison, 0, 5:8, 5:8] = patch
    images[:, 0, 5:8, 0:3] = patch.T
    images[poison, 0, 0:3, 0:3] = images[::2, 0, 0:3, 0:3] = 0
    images[poison, 0, 0:3, 5:8] = 0
    flagged = np.zeros(len(poison), dtype=bool)
    flagged[np.nonzero(poison)[0][:30]] = True
    flagged[:5] = True  # clean images of the target class
    carriers, positions = content.shared_blocks(images, flagged, min_share=0.2, enrichment=4.0)
    assert positions == [(5, 5)]
    assert np.array_equal(carriers, poison)
    assert content.shared_blocks(images, flagged, min_share=0.9, enrichment=4.0)[1] == []  # 30 of 35 carry it
    assert content.shared_blocks(images, np.zeros_like(flagged), 0.2, 4.0)[1] == []
    images[poison, 0, 5:8, 5:8] = 255
    carriers, positions = content.shared_blocks(images, flagged, min_share=0.2, enrichment=4.0)
    assert positions == [(5, 5)] and np.array_equal(carriers, poison)


def test_class_bound_blocks_are_a_pattern_written_onto_one_class_not_a_shared_flat_or_rare_one():
    """Five classes of 40 noisy prototypes. A pattern is written onto 30 of class 0's images (clean-label: labels
    kept) and 2 of class 1's; another onto 8 images of every class (a detail the classes share); a flat white
    square onto 30 of class 2's (a plain region); a third pattern onto 5 of class 3's (an eighth of the class,
    and under the ten images a block needs at any share). Only the first is class 0's block, and its carriers are
    class 0's 30; at a share of 0.8 it is not (30 of 40); with 5 of class 1's carrying it (30 of 35 in class 0,
    under nine in ten) it is no class's."""
    images, labels, _ = _images(sources=(), per_source=0)
    labels = labels.numpy()
    first = np.array([[10, 40, 90], [140, 190, 220], [250, 200, 150]], dtype=np.uint8)
    written = np.zeros(len(labels), dtype=bool)
    written[np.nonzero(labels == 0)[0][:30]] = True
    images[written, 0, 0:3, 0:3] = first
    images[np.nonzero(labels == 1)[0][:2], 0, 0:3, 0:3] = first
    for c in range(K):
        images[np.nonzero(labels == c)[0][-8:], 0, 5:8, 5:8] = first.T
    images[np.nonzero(labels == 2)[0][:30], 0, 5:8, 0:3] = 255
    third = images[np.nonzero(labels == 3)[0][:5]]
    third[:, 0, 0:3, 5:8] = first[::-1]
    images[np.nonzero(labels == 3)[0][:5]] = third
    carriers, found = content.class_bound_blocks(images, labels, min_class_share=0.2)
    assert found == [(0, 0, 0)] and np.array_equal(carriers, written)
    assert content.class_bound_blocks(images, labels, min_class_share=0.8)[1] == []  # 30 of 40
    carriers, found = content.class_bound_blocks(images, labels, min_class_share=0.05)
    assert found == [(0, 0, 0)] and np.array_equal(carriers, written)
    images[np.nonzero(labels == 1)[0][:5], 0, 0:3, 0:3] = first
    assert content.class_bound_blocks(images, labels, min_class_share=0.2)[1] == []


def test_common_blocks_are_a_pattern_on_a_share_of_the_whole_set_not_a_flat_region_nor_copies():
    """Five classes of 40 noisy prototypes. A pattern written onto 8 images of every class (40 of 200: 20 %) is
    common at a share of 0.1, and its carriers are those 40, whatever their classes; at 0.25 it is not. A flat
    white square on 40 images is a plain region, and 40 copies of one image share every block but are one image:
    neither is found."""
    images, labels, _ = _images(sources=(), per_source=0)
    labels = labels.numpy()
    pattern = np.array([[10, 40, 90], [140, 190, 220], [250, 200, 150]], dtype=np.uint8)
    written = np.zeros(len(labels), dtype=bool)
    for c in range(K):
        written[np.nonzero(labels == c)[0][-8:]] = True
    images[written, 0, 5:8, 5:8] = pattern
    carriers, found = content.common_blocks(images, min_share=0.1)
    assert found == [(5, 5)] and np.array_equal(carriers, written)
    assert content.common_blocks(images, min_share=0.25)[1] == []
    assert content.common_blocks(images, min_share=0.0)[1] == []
    plain, _, _ = _images(sources=(), per_source=0)
    plain[:40, 0, 0:3, 0:3] = 255
    plain[40:80] = plain[40]
    assert content.common_blocks(plain, min_share=0.1)[1] == []


def test_copies_of_one_image_are_no_class_bound_block():
    """Twelve exact copies of one image in a class of 40 (30 %: a scraped set's duplicates) share every block of
    it, yet carry no trigger: a block counts its distinct images, so nothing is found; twelve different images
    with one pattern written onto them are."""
    images, labels, _ = _images(sources=(), per_source=0)
    labels = labels.numpy()
    members = np.nonzero(labels == 2)[0]
    images[members[:12]] = images[members[0]]
    assert content.class_bound_blocks(images, labels, min_class_share=0.2)[1] == []
    images, labels, _ = _images(sources=(), per_source=0)
    labels = labels.numpy()
    images[members[:12], 0, 2:5, 2:5] = np.array([[10, 40, 90], [140, 190, 220], [250, 200, 150]], dtype=np.uint8)
    carriers, found = content.class_bound_blocks(images, labels, min_class_share=0.2)
    assert found == [(2, 2, 2)] and np.array_equal(np.nonzero(carriers)[0], members[:12])


def test_framing_offsets_are_where_the_content_sits_in_its_frame():
    """Left less right margin, top less bottom margin, of the pixels not at the set's background value: a centred
    block is at 0, 0; one moved 3 right at 6, 0; one 2 up at 0, -4; an empty image at 0, 0. A block wider than its
    margins rolled round the edge (3 right, 3 left, 2 down) touches both edges: read round the circle it is 6, -6
    and 4 from the centre, as if unwrapped; a block filling its frame stays at 0."""
    images = np.zeros((8, 1, 12, 12), dtype=np.uint8)
    images[:4, 0, 4:8, 4:8] = 200
    images[1] = np.roll(images[1], 3, axis=2)
    images[2] = np.roll(images[2], -2, axis=1)
    images[3] = 0
    images[4:7, 0, 1:11, 1:11] = 200  # margins of 1: a roll of 3 wraps it
    images[4] = np.roll(images[4], 3, axis=2)
    images[5] = np.roll(images[5], -3, axis=2)
    images[6] = np.roll(images[6], 2, axis=1)
    images[7] = np.roll(np.full((1, 12, 12), 200, dtype=np.uint8), 3, axis=2)
    images = np.concatenate([images, np.zeros((20, 1, 12, 12), dtype=np.uint8)])  # the background: 0
    assert content.framing_offsets(images)[:8].tolist() == [[0, 0], [6, 0], [0, -4], [0, 0], [6, 0], [-6, 0],
                                                            [0, 4], [0, 0]]
    assert content.framing_offsets(images, wrapped=False)[4:8].tolist() == [[0, 0]] * 4  # plain margins


def test_images_moved_in_a_set_framed_one_way_are_out_of_frame_and_nothing_else_is():
    """A set of centred objects with 30 of its 240 moved 3 pixels right: the 30 are out of frame (past the empty
    offsets 1..2, the first past them 3), also moved 3 down; the set without them has none, and neither has one
    whose objects sit anywhere (framed every way: no empty band), nor one with 6 moved (under the ten images past
    a band). A band of 0 turns it off; one wider than the empty offsets (1..5) finds nothing."""
    images, _, moved = framed()
    outside, found = content.out_of_frame(images, band=2)
    assert np.array_equal(outside, moved) and found == [{"axis": "x", "from": 3, "images": 30}]
    down, _, _ = framed(moved_per_class=0)
    down[moved] = np.roll(down[moved], 3, axis=2)
    outside, found = content.out_of_frame(down, band=2)
    assert np.array_equal(outside, moved) and [f["axis"] for f in found] == ["y"]
    assert not content.out_of_frame(framed(moved_per_class=0)[0], band=2)[0].any()
    assert not content.out_of_frame(framed(moved_per_class=2)[0], band=2)[0].any()  # 6 moved
    anywhere = framed(moved_per_class=0)[0]
    rng = np.random.default_rng(1)
    for i in range(len(anywhere)):
        anywhere[i] = np.roll(anywhere[i], (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(1, 2))
    assert not content.out_of_frame(anywhere, band=2)[0].any()
    off, found = content.out_of_frame(images, band=0)
    assert not off.any() and found == []
    assert np.array_equal(content.out_of_frame(images, band=5)[0], moved)
    assert not content.out_of_frame(images, band=6)[0].any()
