"""Step 3's rules (qtclean.readout) on hand-made tensors where the right answer is known: which flags a rule
withdraws or adds, what it scores, and where it stays out."""

from __future__ import annotations

import pytest
import torch

from conftest import framed, target_beside_false_alarms
from qtclean import qt, readout
from qtclean.content import pixel_residuals, value_counts, value_histograms


def test_a_quarantine_that_is_a_continuum_of_scores_is_withdrawn_and_a_crisp_one_kept():
    crisp = torch.cat([torch.full((50,), 0.95), torch.full((45,), 0.05), torch.full((5,), 0.5)])  # 5 % ambiguous
    continuum = torch.linspace(0.0, 1.0, 100)  # a clean subgroup grown into: 40 % between 0.3 and 0.7
    untouched = torch.full((100,), 0.5)  # all ambiguous, but nothing flagged: nothing to withdraw
    scores = torch.cat([crisp, continuum, untouched])
    labels = torch.arange(3).repeat_interleave(100)
    flagged = torch.cat([crisp > 0.6, continuum > 0.5, torch.zeros(100, dtype=torch.bool)])
    kept, info = readout.withdraw_ambiguous(scores, flagged, labels, 3, qt.QTConfig())
    assert torch.equal(kept, torch.cat([crisp > 0.6, torch.zeros(200, dtype=torch.bool)]))
    assert info == {0: {"flagged": 50, "ambiguous_share": 0.05, "withdrawn": False},
                    1: {"flagged": 50, "ambiguous_share": 0.4, "withdrawn": True}}
    lenient = qt.QTConfig(max_ambiguous_share=0.5)  # the threshold decides
    assert torch.equal(readout.withdraw_ambiguous(scores, flagged, labels, 3, lenient)[0], flagged)
    assert torch.equal(readout.withdraw_ambiguous(scores, flagged, labels, 3, qt.QTConfig.paper())[0], flagged)


def test_a_quarantine_that_let_its_content_seed_go_is_withdrawn_and_flagged_by_the_seed():
    """Classes 0 and 1 were started by content seeds of 40 samples each. Class 0's quarantine ends crisp but on 8
    of them (20 %, under a quarter): withdrawn, its seed (as widened: 50) flagged instead. Class 1's holds 30 of
    its 40 (75 %): kept. Class 2 had no content seed: its crisp flags stand. Off (0, the paper) or without the seed:
    every class kept as before. A seeded class with no flags at all falls back too."""
    labels = torch.arange(3).repeat_interleave(100)
    seed = torch.zeros(300, dtype=torch.bool)
    seed[0:40] = seed[100:140] = True
    flagged = torch.zeros(300, dtype=torch.bool)
    flagged[32:40] = flagged[60:90] = True  # class 0: 8 of its seed and 30 others it swung to
    flagged[110:140] = flagged[200:250] = True
    scores = torch.where(flagged, 0.95, 0.05)  # crisp everywhere: the ambiguity rule has nothing to say
    widened = seed.clone()
    widened[40:50] = widened[140:150] = True  # what widen_content_seed adds for the fallback
    kept, info = readout.withdraw_ambiguous(scores, flagged, labels, 3, qt.QTConfig(), seeded_by_content=widened,
                                            content_seed=seed)
    assert torch.equal(kept, (labels != 0) & flagged | (labels == 0) & widened)
    assert info[0] == {"flagged": 38, "ambiguous_share": 0.0, "withdrawn": True, "content_seed": 40,
                       "content_seed_held": 0.2, "content_flagged": 50}
    assert not info[1]["withdrawn"] and "content_seed_held" not in info[1] and not info[2]["withdrawn"]
    for cfg, given in [(qt.QTConfig.paper(content_fallback=True), seed), (qt.QTConfig(), None),
                       (qt.QTConfig(content_fallback=False), seed)]:  # off, no seed, nothing to fall back to
        assert torch.equal(readout.withdraw_ambiguous(scores, flagged, labels, 3, cfg, seeded_by_content=widened,
                                                      content_seed=given)[0], flagged)
    none_left = flagged & (labels != 0)  # class 0's quarantine emptied at the last epoch
    kept, info = readout.withdraw_ambiguous(scores, none_left, labels, 3, qt.QTConfig(), seeded_by_content=widened,
                                            content_seed=seed)
    assert torch.equal(kept, none_left | (labels == 0) & widened) and info[0]["content_seed_held"] == 0.0


def test_a_continuum_whose_flags_look_relabelled_from_every_class_is_kept():
    """Class 1's quarantine is a continuum (40 % ambiguous), but its flags as a group look like images relabelled
    from every other class (the content seed's test): it stands. Flags that look like their own class or like one
    other class, no pixel evidence (``None``: neighbours that say little about labels), or the switch off:
    withdrawn as before. A class with content-seed members falls back to them without the group test."""
    crisp = torch.cat([torch.full((50,), 0.95), torch.full((45,), 0.05), torch.full((5,), 0.5)])
    continuum = torch.linspace(0.0, 1.0, 100)
    scores = torch.cat([crisp, continuum])
    labels = torch.arange(2).repeat_interleave(100)
    flagged = torch.cat([crisp > 0.6, continuum > 0.5])
    relabelled = {"agreement": 0.05, "diversity": 0.98}
    asked = []

    def content(stats):
        return lambda c: asked.append(c) or stats

    kept, info = readout.withdraw_ambiguous(scores, flagged, labels, 2, qt.QTConfig(),
                                            flags_content=content(relabelled))
    assert torch.equal(kept, flagged) and asked == [1]  # only a class about to be withdrawn is looked at
    assert info[1] == {"flagged": 50, "ambiguous_share": 0.4, "withdrawn": False, "flags_look_relabelled": relabelled}
    withdrawn = torch.cat([crisp > 0.6, torch.zeros(100, dtype=torch.bool)])
    own_class = {"agreement": 0.6, "diversity": 0.98}  # a clean subgroup grown into: its neighbours are its class
    one_source = {"agreement": 0.05, "diversity": 0.3}  # a group that looks like one neighbour class
    for stats, cfg in [(own_class, qt.QTConfig()), (one_source, qt.QTConfig()), (None, qt.QTConfig()),
                       (relabelled, qt.QTConfig(keep_relabelled_quarantine=False)), (relabelled, qt.QTConfig.paper(
                           max_ambiguous_share=0.12))]:
        kept, info = readout.withdraw_ambiguous(scores, flagged, labels, 2, cfg, flags_content=content(stats))
        assert torch.equal(kept, withdrawn) and info[1]["withdrawn"] and "flags_look_relabelled" not in info[1]
    few = flagged.clone()
    few[100:196] = False  # 4 flags left in class 1, under CONTENT_MIN_CLASS_SHARE of it
    kept, info = readout.withdraw_ambiguous(scores, few, labels, 2, qt.QTConfig(), flags_content=content(relabelled))
    assert torch.equal(kept, withdrawn) and info[1]["withdrawn"]
    seed = torch.zeros(200, dtype=torch.bool)
    seed[100:130] = True  # class 1 has content-seed members: they are its answer, the group test is not asked
    asked.clear()
    kept, info = readout.withdraw_ambiguous(scores, flagged, labels, 2, qt.QTConfig(), seeded_by_content=seed,
                                            flags_content=content(relabelled))
    assert torch.equal(kept, withdrawn | seed) and info[1]["content_flagged"] == 30 and asked == []


def test_a_quarantine_that_took_its_class_whole_is_withdrawn_and_a_target_with_its_clean_part_left_kept():
    """Class 0 is an all-to-one target: 900 flagged poisoned samples on top of its 100 clean ones (91 % of the
    class flagged, as a 10 % attack on 100 classes makes it), which stay. Class 1's crisp quarantine took 92 of
    its 100 samples, leaving 8 (under half the median class, 100): a clean class taken whole, withdrawn. Kept:
    with the rule off (0, the paper) and where its flags as a group look relabelled from every other class."""
    labels = torch.cat([torch.zeros(1000, dtype=torch.long), torch.ones(100, dtype=torch.long),
                        torch.full((100,), 2)])
    flagged = torch.zeros(1200, dtype=torch.bool)
    flagged[:900] = True  # the target's poison
    flagged[1000:1092] = True  # class 1 taken whole
    scores = torch.where(flagged, 0.95, 0.05)  # crisp: the ambiguity rule has nothing to say
    kept, info = readout.withdraw_ambiguous(scores, flagged, labels, 3, qt.QTConfig())
    assert torch.equal(kept, flagged & (labels == 0))
    assert info[0] == {"flagged": 900, "ambiguous_share": 0.0, "withdrawn": False}
    assert info[1] == {"flagged": 92, "ambiguous_share": 0.0, "withdrawn": True, "unflagged_left": 8}
    for cfg in (qt.QTConfig(min_class_remainder=0.0), qt.QTConfig.paper(max_ambiguous_share=0.12),
                qt.QTConfig(min_class_remainder=0.05)):  # 8 left >= 0.05 * 100
        assert torch.equal(readout.withdraw_ambiguous(scores, flagged, labels, 3, cfg)[0], flagged)
    relabelled = {"agreement": 0.05, "diversity": 0.98}  # a small class targeted by an all-to-one attack
    kept, info = readout.withdraw_ambiguous(scores, flagged, labels, 3, qt.QTConfig(),
                                            flags_content=lambda c: relabelled)
    assert torch.equal(kept, flagged) and info[1]["flags_look_relabelled"] == relabelled


def _all_to_all_in_pixels(num_classes: int = 6, flagged_classes: int = 4, trigger_size: float = 4.0):
    """Pixel embedding (6-D) of an all-to-all attack: each class a tight cluster of 60 clean images, and 12 images
    of class c - 1 with the trigger (a shift of ``trigger_size`` along a dimension no class uses) labelled c. The
    first ``flagged_classes`` classes' poison is flagged; the rest's is not (classes no seed reached)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.zeros(num_classes, 6)
    for c in range(num_classes):
        centres[c, c % 5] = 10.0 * (1 + c // 5)
    trigger = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, trigger_size])
    points, labels, poisoned = [], [], []
    for c in range(num_classes):
        points.append(centres[c] + 0.5 * torch.randn(60, 6, generator=g))
        labels.append(torch.full((60,), c))
        poisoned.append(torch.zeros(60, dtype=torch.bool))
        source = (c - 1) % num_classes
        points.append(centres[source] + trigger + 0.5 * torch.randn(12, 6, generator=g))
        labels.append(torch.full((12,), c))
        poisoned.append(torch.ones(12, dtype=torch.bool))
    labels, poisoned = torch.cat(labels), torch.cat(poisoned)
    return torch.cat(points), labels, poisoned, poisoned & (labels < flagged_classes)


def test_the_trigger_found_in_flagged_classes_flags_its_poison_in_the_others():
    """Four of six classes flagged (a many-target attack): the flags' residuals (image minus its look-alikes of
    other classes) give the trigger's direction, and the two classes without flags get exactly their poison."""
    embedding, labels, poisoned, flagged = _all_to_all_in_pixels()
    out, added_scores, info = readout.flag_by_trigger_residual(embedding, labels, flagged, 6, qt.QTConfig(),
                                                               baseline=0.8)
    assert torch.equal(out, poisoned)
    assert info["added_per_class"] == {"4": 12, "5": 12} and -1.0 < info["threshold_cosine"] < 1.0
    added = out & ~flagged  # each scores as a flag (0.5 at the bar, up to 1), every other sample 0
    assert bool((added_scores[added] > 0.5).all()) and bool((added_scores[added] <= 1.0).all())
    assert bool((added_scores[~added] == 0).all())
    residual = pixel_residuals(embedding, labels, torch.nonzero(added).flatten(), flagged)
    cosines = residual[:, 5] / residual.norm(dim=1)  # the trigger is dimension 5: the score follows the alignment
    assert float(torch.corrcoef(torch.stack([cosines, added_scores[added]]))[0, 1]) > 0.5
    residual = pixel_residuals(embedding, labels, torch.nonzero(poisoned).flatten(), poisoned)
    assert float(residual[:, 5].mean()) > 3.0  # what the poison adds to its source's images: the trigger


def test_the_trigger_residual_counts_the_classes_quarantined_before_withdrawals():
    """Two of six classes flagged after step 3 withdrew a third class's quarantine: under the many-target bar by the
    flags alone. By default (``residual_by_quarantined_classes``) the three classes the quarantine flagged make it a
    many-target attack, and the four classes without flags get exactly their poison; counting only the classes
    still flagged (or without the mask, or with two quarantined classes) the trigger residual stays out."""
    embedding, labels, poisoned, flagged = _all_to_all_in_pixels(flagged_classes=2)
    quarantined = torch.tensor([True, True, True, False, False, False])
    default = qt.QTConfig()
    assert default.residual_by_quarantined_classes
    out, added_scores, info = readout.flag_by_trigger_residual(embedding, labels, flagged, 6, default, 0.8,
                                                               quarantined_classes=quarantined)
    assert torch.equal(out, poisoned) and info["added_per_class"] == {str(c): 12 for c in range(2, 6)}
    assert info["attacked_classes"] == [0, 1, 2]  # the two flagged and the one withdrawn
    by_flags = qt.QTConfig(residual_by_quarantined_classes=False)
    for cfg, given in ((by_flags, quarantined), (qt.QTConfig.paper(), quarantined), (default, None),
                       (default, torch.tensor([True, True] + [False] * 4))):
        same, none, nothing = readout.flag_by_trigger_residual(embedding, labels, flagged, 6, cfg, 0.8,
                                                               quarantined_classes=given)
        assert torch.equal(same, flagged) and nothing == {} and not bool(none.any())


def test_the_trigger_residual_leaves_out_look_alikes_that_carry_a_large_trigger():
    """A trigger larger than the distance between classes (a frame round the image), three of six classes flagged:
    the unflagged classes' poison are each other's nearest images, so against every unflagged sample their
    residual is one class minus another and shows no trigger (none of their 36 found). Without the images of
    those classes that lie far along the flags' plain direction (flags' mean minus their class's rest), it is the
    trigger: all 36, no clean image."""
    embedding, labels, poisoned, flagged = _all_to_all_in_pixels(flagged_classes=3, trigger_size=30.0)
    out, _, info = readout.flag_by_trigger_residual(embedding, labels, flagged, 6, qt.QTConfig(), baseline=0.8)
    assert torch.equal(out, poisoned) and info["added_per_class"] == {"3": 12, "4": 12, "5": 12}
    assert info["lookalikes_left_out"] == 36  # exactly those classes' poison
    any_lookalike = qt.QTConfig(residual_untriggered_lookalikes=False)
    out, _, info = readout.flag_by_trigger_residual(embedding, labels, flagged, 6, any_lookalike, baseline=0.8)
    assert not bool((out & poisoned & ~flagged).any())


def test_a_faint_trigger_keeps_its_look_alikes():
    """The lab's faint case (a shift of 4, classes 10 apart): no image of the classes without flags lies beyond
    the flagged classes' clean images along the flags' direction, so the rule finds what it found without it."""
    embedding, labels, poisoned, flagged = _all_to_all_in_pixels()
    with_it = readout.flag_by_trigger_residual(embedding, labels, flagged, 6, qt.QTConfig(), baseline=0.8)
    without = readout.flag_by_trigger_residual(embedding, labels, flagged, 6,
                                               qt.QTConfig(residual_untriggered_lookalikes=False), baseline=0.8)
    assert with_it[2]["lookalikes_left_out"] == 0 and "lookalikes_left_out" not in without[2]
    assert torch.equal(with_it[0], poisoned) and torch.equal(with_it[0], without[0])


def _all_to_one_in_pixels():
    """Pixel embedding (7-D) of an all-to-one attack: six classes, each a cluster of 200 clean images around its own
    axis, and 20 images of each of classes 1-3 with the trigger (a shift of 4 along the seventh dimension, in
    which images vary little) labelled 0; the quarantine settled on 40 of those 60 (flagged)."""
    g = torch.Generator().manual_seed(0)
    centres = 8.0 * torch.eye(6, 7)
    trigger = 4.0 * torch.eye(7)[6]
    spread = torch.tensor([2.0] * 6 + [0.2])  # the look varies more than the trigger does
    points = [centres[c] + spread * torch.randn(200, 7, generator=g) for c in range(6)]
    points += [centres[c] + trigger + spread * torch.randn(20, 7, generator=g) for c in range(1, 4)]
    labels = torch.cat([torch.full((200,), c) for c in range(6)] + [torch.zeros(60, dtype=torch.long)])
    poisoned = torch.cat([torch.zeros(1200, dtype=torch.bool), torch.ones(60, dtype=torch.bool)])
    flagged = poisoned.clone()
    flagged[torch.nonzero(poisoned).flatten()[::3]] = False  # 20 left, six or seven of each source class
    return torch.cat(points), labels, poisoned, flagged


def test_the_poison_a_settled_quarantine_left_is_found_by_its_flags_trigger():
    """All-to-one, 40 of 60 poisoned images flagged: their residuals (image minus its look-alikes of other classes)
    give the trigger's direction, and the 20 left in the target class point that way (cosine over 0.75), far past
    the bar the classes without flags set (their 99.99 % quantile); of the target's 200 clean images a few pass it
    too (2 here: the bar is other classes' quantile). Each added flag scores 0.5 to 1, the poison highest."""
    embedding, labels, poisoned, flagged = _all_to_one_in_pixels()
    out, added_scores, info = readout.flag_residual_in_flagged_classes(embedding, labels, flagged, 6, qt.QTConfig(),
                                                                       baseline=0.8)
    assert bool(out[poisoned].all()) and int((out & ~poisoned).sum()) <= 4
    assert info["0"]["flags_median_cosine"] > 0.75 > 0.2 > info["0"]["bar_cosine"]
    added = out & ~flagged
    assert float(added_scores[poisoned & ~flagged].min()) > float(added_scores[added & ~poisoned].max())
    assert bool((added_scores[added] > 0.5).all()) and bool((added_scores[added] <= 1.0).all())
    assert bool((added_scores[~added] == 0).all())


def test_the_residual_in_flagged_classes_stays_out_where_it_cannot_tell():
    """Flags that look like their own class (clean images of the target that its quarantine took: their shared
    residual is the class's own look, which every other member of the class shares), flags that look relabelled
    but share no pattern (label noise: their median cosine far under the bar), half of the classes flagged or more
    (the many-target rule's case), pixel neighbours that say little about labels, or the paper's settings (and the
    option off): the flags as they came."""
    embedding, labels, poisoned, flagged = _all_to_one_in_pixels()
    clean_flags = torch.zeros_like(flagged)
    clean_flags[:40] = True
    out, added_scores, info = readout.flag_residual_in_flagged_classes(embedding, labels, clean_flags, 6, qt.QTConfig(),
                                                                       baseline=0.8)
    assert torch.equal(out, clean_flags) and info["0"] == {"relabelled_share": 0.0, "added": 0}
    assert not bool(added_scores.any())
    label_noise = embedding.clone()
    label_noise[poisoned, 6] -= 4.0  # the same images relabelled, without the trigger
    out, added_scores, info = readout.flag_residual_in_flagged_classes(label_noise, labels, flagged, 6, qt.QTConfig(),
                                                                       baseline=0.8)
    assert torch.equal(out, flagged) and info["0"]["added"] == 0 and info["0"]["relabelled_share"] > 0.5
    assert info["0"]["flags_median_cosine"] < 0.5 < info["0"]["bar_cosine"]
    three_classes = flagged.clone()
    for c in (1, 2):
        three_classes[torch.nonzero(labels == c).flatten()[:3]] = True
    cases = [(three_classes, qt.QTConfig(), 0.8), (flagged, qt.QTConfig(), 0.3), (flagged, qt.QTConfig.paper(), 0.8),
             (flagged, qt.QTConfig(residual_in_flagged_classes=False), 0.8)]
    for given, cfg, baseline in cases:
        out, added_scores, info = readout.flag_residual_in_flagged_classes(embedding, labels, given, 6, cfg, baseline)
        assert torch.equal(out, given) and info == {} and not bool(added_scores.any())


def test_the_residual_in_flagged_classes_gate_is_its_own_number(monkeypatch):
    """The flags' median must pass the gate quantile whatever the bar: with the bar at the reference's minimum
    (every candidate above it), flags that share no pattern (label noise) still add nothing; only with the gate
    lowered too does the rule act."""
    embedding, labels, poisoned, flagged = _all_to_one_in_pixels()
    label_noise = embedding.clone()
    label_noise[poisoned, 6] -= 4.0
    monkeypatch.setattr(readout, "FLAGGED_CLASS_RESIDUAL_QUANTILE", 0.0)
    out, _, info = readout.flag_residual_in_flagged_classes(label_noise, labels, flagged, 6, qt.QTConfig(), 0.8)
    assert torch.equal(out, flagged) and info["0"]["added"] == 0
    monkeypatch.setattr(readout, "FLAGGED_CLASS_RESIDUAL_GATE_QUANTILE", 0.0)
    out, _, info = readout.flag_residual_in_flagged_classes(label_noise, labels, flagged, 6, qt.QTConfig(), 0.8)
    assert info["0"]["added"] == int((labels[~flagged] == 0).sum()) > 0 and bool(out[labels == 0].all())


def test_the_trigger_residual_rule_stays_out_where_it_cannot_tell():
    """Under half of the classes flagged (an all-to-one attack and its false alarms), every class flagged (nothing
    to add), the flagged classes flagged whole (no clean reference), pixel neighbours that say little about labels,
    or the paper's settings: the flags as they came."""
    embedding, labels, poisoned, _ = _all_to_all_in_pixels()
    two_classes = poisoned & (labels < 2)
    cases = [(two_classes, qt.QTConfig(), 0.8), (poisoned, qt.QTConfig(), 0.8), (labels < 4, qt.QTConfig(), 0.8),
             (poisoned & (labels < 4), qt.QTConfig(), 0.3), (poisoned & (labels < 4), qt.QTConfig.paper(), 0.8)]
    for given, cfg, baseline in cases:
        out, added_scores, info = readout.flag_by_trigger_residual(embedding, labels, given, 6, cfg, baseline)
        assert torch.equal(out, given) and info == {} and not bool(added_scores.any())


def test_flags_without_the_trigger_that_look_like_their_class_are_withdrawn_in_a_many_target_attack():
    """Every class's poison flagged (all-to-all), with 8 clean images of class 0 that its quarantine took (in their
    own cluster, no trigger): those 8 go, and so do 5 clean images of class 1 placed among class 2's (they look
    relabelled) whose residual points away from the trigger. Kept: the poison, and 5 images of class 0 with the
    trigger (poison that looks like its target: own-looking, but its residual points the trigger's way)."""
    embedding, labels, poisoned, _ = _all_to_all_in_pixels()
    g = torch.Generator().manual_seed(1)
    centre = {c: embedding[(labels == c) & ~poisoned].mean(0) for c in range(3)}
    trigger = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 4.0])
    own_with_trigger = centre[0] + trigger + 0.5 * torch.randn(5, 6, generator=g)
    away_from_trigger = centre[2] - trigger + 0.5 * torch.randn(5, 6, generator=g)
    embedding = torch.cat([embedding, own_with_trigger, away_from_trigger])
    labels = torch.cat([labels, torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)])
    poisoned = torch.cat([poisoned, torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)])
    took = torch.zeros_like(poisoned)
    took[torch.nonzero((labels == 0) & ~poisoned).flatten()[:8]] = True
    took[-5:] = True
    flagged = poisoned | took
    out, info = readout.withdraw_trigger_free_flags(embedding, labels, flagged, 6, qt.QTConfig(), baseline=0.8)
    assert torch.equal(out, poisoned)
    assert info["withdrawn_per_class"] == {"0": 8, "1": 5, "2": 0, "3": 0, "4": 0, "5": 0}
    assert info["flags_median_cosine"] > info["bar_cosine"] > info["relabelled_bar_cosine"]


def _all_to_one_quarantine_with_clean_images():
    """All-to-one in pixels (six classes, 60 clean images each): 6 images of each other class with the trigger,
    labelled 0, all flagged; so are 8 clean images of class 0 (its own look, no trigger) and 5 clean images of
    class 0 placed among class 2's (they look relabelled) whose residual points away from the trigger."""
    g = torch.Generator().manual_seed(4)
    centres = torch.zeros(6, 6)
    for c in range(6):
        centres[c, c % 5] = 10.0 * (1 + c // 5)
    trigger = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 4.0])
    clean = [centres[c] + 0.5 * torch.randn(60, 6, generator=g) for c in range(6)]
    poison = [centres[c] + trigger + 0.5 * torch.randn(6, 6, generator=g) for c in range(1, 6)]
    away = centres[2] - trigger + 0.5 * torch.randn(5, 6, generator=g)
    embedding = torch.cat([*clean, *poison, away])
    labels = torch.cat([torch.arange(6).repeat_interleave(60), torch.zeros(30 + 5, dtype=torch.long)])
    poisoned = torch.cat([torch.zeros(360, dtype=torch.bool), torch.ones(30, dtype=torch.bool),
                          torch.zeros(5, dtype=torch.bool)])
    took = torch.zeros_like(poisoned)
    took[:8] = True  # class 0's first clean images
    took[-5:] = True
    return embedding, labels, poisoned, took


def test_flags_without_the_trigger_in_an_all_to_one_quarantine_go_only_with_the_any_target_option():
    """One target (flags in one class of six): with ``trigger_free_any_target`` the 8 clean images that look like
    the target and the 5 that look relabelled but point away from the trigger are withdrawn and the poison stays;
    with the option off (many-target attacks only, as before), and in the paper's settings, the flags as they
    came."""
    embedding, labels, poisoned, took = _all_to_one_quarantine_with_clean_images()
    flagged = poisoned | took
    out, info = readout.withdraw_trigger_free_flags(embedding, labels, flagged, 6,
                                                    qt.QTConfig(trigger_free_any_target=True), baseline=0.8)
    assert torch.equal(out, poisoned)
    assert info["withdrawn_per_class"] == {"0": 13}
    for cfg in (qt.QTConfig(trigger_free_any_target=False), qt.QTConfig.paper()):
        same, none = readout.withdraw_trigger_free_flags(embedding, labels, flagged, 6, cfg, baseline=0.8)
        assert torch.equal(same, flagged) and "withdrawn_per_class" not in none


def test_flags_without_the_trigger_that_the_model_doubts_go_with_the_confidence_witness(monkeypatch):
    """The pixel witnesses given (patched: every flag looks relabelled; 20 poisoned flags point the trigger's way,
    cosine 0.9, and 6 clean ones point neither way, 0.0, between the two bars that the class's 34 unflagged images
    set, -0.5..0.5), the model's word decides the six: with ``trigger_free_confidence_quantile`` (the default,
    0.01) those whose label it gives a probability under the flags that carry the trigger (0.6 against 0.999) go,
    one it is as sure of stays; with it 0, or without the probabilities, all six stay."""
    from qtclean import content

    labels = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(40, dtype=torch.long)])
    flagged = torch.zeros(100, dtype=torch.bool)
    flagged[:26] = True
    cosines = torch.zeros(100)
    cosines[:20] = 0.9
    cosines[26:60] = torch.linspace(-0.5, 0.5, 34)
    monkeypatch.setattr(readout, "_trigger_cosine", lambda *args, **kwargs: (lambda queries: cosines[queries]))
    monkeypatch.setattr(content, "own_label_share_outside", lambda embedding, labels, queries, flagged: torch.zeros(
        queries.numel()))
    probability = torch.full((100,), 0.999)
    probability[20:25] = 0.6  # the last of the six the model is sure of
    embedding = torch.zeros(100, 6)
    plain, _ = readout.withdraw_trigger_free_flags(embedding, labels, flagged, 2,
                                                   qt.QTConfig(trigger_free_confidence_quantile=0.0), 0.8, probability)
    assert torch.equal(plain, flagged)  # the pixel bars alone keep the six
    cfg = qt.QTConfig(trigger_free_confidence_quantile=0.01)
    out, info = readout.withdraw_trigger_free_flags(embedding, labels, flagged, 2, cfg, 0.8, probability)
    expected = flagged.clone()
    expected[20:25] = False
    assert torch.equal(out, expected)
    assert info["withdrawn_per_class"] == {"0": 5} and info["confidence_bar"] == pytest.approx(0.999)
    without, _ = readout.withdraw_trigger_free_flags(embedding, labels, flagged, 2, cfg, 0.8)
    assert torch.equal(without, flagged)


def test_label_probability_adds_a_class_and_its_quarantine_class():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
    labels = torch.tensor([0, 1])
    assert torch.allclose(readout.label_probability(logits, labels, 2), torch.tensor([0.4, 0.4]))


def _false_quarantine_among_targets():
    """All-to-all in pixels (six classes): every class's poison flagged but class 4's, with 10 clean images of class
    0 beside it; class 4's quarantine took 30 of its clean images (a subgroup of its own look, no trigger) and none
    of its 12 poisoned ones."""
    embedding, labels, poisoned, flagged = _all_to_all_in_pixels(flagged_classes=6)
    flagged = flagged & (labels != 4)
    g = torch.Generator().manual_seed(3)
    subgroup = torch.zeros(6)
    subgroup[4] = 3.0  # a look of its own, along a class dimension: not the trigger's (dimension 5)
    clean4 = torch.nonzero((labels == 4) & ~poisoned).flatten()[:30]
    embedding = embedding.clone()
    embedding[clean4] += subgroup + 0.2 * torch.randn(30, 6, generator=g)
    flagged[clean4] = True
    flagged[torch.nonzero((labels == 0) & ~poisoned).flatten()[:10]] = True
    return embedding, labels, poisoned, flagged


def test_a_quarantine_without_the_trigger_the_other_targets_share_is_withdrawn():
    """Class 4's flags carry the trigger no more than the rest of its class (its unflagged members hold its
    poison) while the other classes' flags carry it: class 4 is withdrawn, and says which classes carry the
    trigger. Class 0, whose flags are its poison and 10 clean images, is kept: its flags carry the trigger."""
    embedding, labels, _, flagged = _false_quarantine_among_targets()
    info = {c: {"flagged": int((flagged & (labels == c)).sum()), "withdrawn": False} for c in range(6)}
    out = readout.withdraw_off_trigger_classes(embedding, labels, flagged, info, 6, qt.QTConfig(), baseline=0.8)
    assert torch.equal(out, flagged & (labels != 4))
    assert info[4] == {"flagged": 30, "withdrawn": True, "off_trigger": [0, 1, 2, 3, 5]}
    assert not any(info[c]["withdrawn"] for c in (0, 1, 2, 3, 5))


def test_the_off_trigger_rule_stays_out_where_it_cannot_tell():
    """Flags that share no trigger (every class's flags a clean subgroup, as a moving or image-dependent trigger's
    may look: no class's flags carry a trigger, so none is judged by it), under half of the classes flagged, pixel
    neighbours that say little about labels, or the paper's settings: the flags as they came, nothing recorded."""
    embedding, labels, poisoned, flagged = _false_quarantine_among_targets()
    clean_flags = torch.zeros_like(poisoned)
    for c in range(6):
        clean_flags[torch.nonzero((labels == c) & ~poisoned).flatten()[:10]] = True
    one_target = flagged & (labels >= 3) & (labels <= 4)  # two of six classes
    cases = [(clean_flags, qt.QTConfig(), 0.8), (one_target, qt.QTConfig(), 0.8), (flagged, qt.QTConfig(), 0.3),
             (flagged, qt.QTConfig.paper(), 0.8), (flagged, qt.QTConfig(withdraw_off_trigger=False), 0.8)]
    for given, cfg, baseline in cases:
        info: dict = {}
        assert torch.equal(readout.withdraw_off_trigger_classes(embedding, labels, given, info, 6, cfg, baseline),
                           given)
        assert info == {}


def test_a_withdrawn_class_the_trigger_residual_reflagged_is_completed_by_three_witnesses():
    """All-to-all: class 4's quarantine was withdrawn and the residual re-flagged 8 of its 12 poisoned images. Its
    other poison that the withdrawn quarantine scores like those 8 is added (3); not the poison it scores like
    clean (1), nor clean images scored high that look like their class though their pixels point the trigger's way
    (2, class 4 plus the trigger: the pixel test), nor clean ones scored high that look like another class but
    carry no trigger (2, class 2 minus the trigger: the cosine).
    Nothing where the class was not withdrawn, the residual flagged none of it, or in the paper's settings."""
    embedding, labels, poisoned, _ = _all_to_all_in_pixels()
    g = torch.Generator().manual_seed(2)
    trigger = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 4.0])
    away = embedding[(labels == 2) & ~poisoned].mean(0) - trigger + 0.5 * torch.randn(2, 6, generator=g)
    own_with_trigger = embedding[(labels == 4) & ~poisoned].mean(0) + trigger + 0.5 * torch.randn(2, 6, generator=g)
    embedding = torch.cat([embedding, own_with_trigger, away])
    labels = torch.cat([labels, torch.full((4,), 4)])
    poisoned = torch.cat([poisoned, torch.zeros(4, dtype=torch.bool)])
    probability = torch.full(labels.shape, 0.1)
    probability[poisoned] = 0.9
    class4_poison = torch.nonzero(poisoned & (labels == 4)).flatten()
    residual = torch.zeros_like(poisoned)
    residual[class4_poison[:8]] = True
    probability[class4_poison[:8]] = torch.linspace(0.6, 0.95, 8)
    probability[class4_poison[8:11]] = 0.8  # scored like the residual's flags: added
    probability[class4_poison[11]] = 0.2    # scored like clean: left
    probability[-4:] = 0.9
    flagged = poisoned & (labels != 4) | residual
    cfg = qt.QTConfig()
    out, added = readout.complete_residual_flags(probability, flagged, residual, labels, [4], embedding, 6, cfg)
    expected = flagged.clone()
    expected[class4_poison[8:11]] = True
    assert torch.equal(out, expected) and added == {"4": 3}
    for withdrawn, given_residual, settings in (([], residual, cfg), ([4], torch.zeros_like(residual), cfg),
                                                ([4], residual, qt.QTConfig.paper())):
        same, none = readout.complete_residual_flags(probability, flagged, given_residual, labels, withdrawn,
                                                     embedding, 6, settings)
        assert torch.equal(same, flagged) and not any(none.values())


def test_the_trigger_free_rule_stays_out_where_it_cannot_tell():
    """Flags in under half of the classes with ``trigger_free_any_target`` off, flags that share no trigger in
    their pixels (a trigger that moves or depends on the image: here clean images of every class, median cosine
    under the bar), pixel neighbours that say little about labels, or the paper's settings: the flags as they
    came."""
    embedding, labels, poisoned, _ = _all_to_all_in_pixels()
    clean_flags = torch.zeros_like(poisoned)
    for c in range(6):
        clean_flags[torch.nonzero((labels == c) & ~poisoned).flatten()[:10]] = True
    took = clean_flags & (labels == 0)
    cases = [(poisoned & (labels < 2) | took, qt.QTConfig(trigger_free_any_target=False), 0.8),
             (clean_flags, qt.QTConfig(), 0.8),
             (poisoned | took, qt.QTConfig(), 0.3), (poisoned | took, qt.QTConfig.paper(), 0.8)]
    for given, cfg, baseline in cases:
        out, info = readout.withdraw_trigger_free_flags(embedding, labels, given, 6, cfg, baseline)
        assert torch.equal(out, given)
        assert "withdrawn_per_class" not in info
    acting, _ = readout.withdraw_trigger_free_flags(embedding, labels, poisoned | took, 6, qt.QTConfig(), 0.8)
    assert torch.equal(acting & poisoned, poisoned) and int((acting & took).sum()) <= 2  # the same flags, all six


def test_flags_unlike_an_all_to_one_target_beside_it_are_withdrawn():
    embedding, labels, flagged = target_beside_false_alarms()
    info = {c: {"flagged": int((flagged & (labels == c)).sum()), "withdrawn": False} for c in range(3)}
    out = readout.withdraw_unlike_target(embedding, labels, flagged, info, 8, qt.QTConfig(), baseline=0.8)
    assert torch.equal(out, flagged & (labels == 0))
    assert info[0]["content"]["agreement"] <= 0.15 and info[0]["content"]["diversity"] >= 0.95
    assert not info[0]["withdrawn"] and "unlike_target" not in info[0]
    assert info[1]["content"]["agreement"] > 0.5  # its neighbours are its own class
    assert info[2]["content"]["diversity"] < 0.5  # its neighbours are one other class
    assert all(info[c]["withdrawn"] and info[c]["unlike_target"] == [0] for c in (1, 2))


def test_flags_unlike_a_target_stay_when_no_class_looks_like_one():
    """No accepted class (the target's flags gone: an all-to-all or single-source attack looks like this), pixel
    neighbours that say little about labels (natural photos), the paper's settings, or one class flagged: the
    flags are returned as they came."""
    embedding, labels, flagged = target_beside_false_alarms()
    without_target = flagged & (labels != 0)
    cases = [(without_target, qt.QTConfig(), 0.8), (flagged, qt.QTConfig(), 0.3), (flagged, qt.QTConfig.paper(), 0.8),
             (flagged & (labels == 1), qt.QTConfig(), 0.8)]
    for given, cfg, baseline in cases:
        info = {c: {"flagged": 1, "withdrawn": False} for c in range(3)}
        assert torch.equal(readout.withdraw_unlike_target(embedding, labels, given, info, 8, cfg, baseline), given)
        assert not any(v["withdrawn"] for v in info.values())


def test_flags_unlike_a_target_stay_when_half_of_the_classes_are_flagged():
    """Half of the classes flagged is a many-target attack (all-to-all), whose targets' poison each comes from one
    source class: one class's flags passing the all-to-one test must not withdraw the others'. The same three
    flagged groups among 6 classes (half flagged) stay as they are; among 8 (the test above) the rule acts."""
    embedding, labels, flagged = target_beside_false_alarms(6)
    info = {c: {"flagged": 1, "withdrawn": False} for c in range(3)}
    assert torch.equal(readout.withdraw_unlike_target(embedding, labels, flagged, info, 6, qt.QTConfig(), 0.8), flagged)
    assert not any(v["withdrawn"] for v in info.values())


def test_a_withdrawn_class_that_nothing_vouches_for_has_its_unflagged_scores_scaled():
    """Class 1 was withdrawn while class 0's flags stood: its unflagged scores are halved, in the same order;
    class 2, withdrawn too but content-seeded, keeps its scores, and so does class 0. With no flags outside a
    withdrawn class (it may be the target itself), or with scale 1, nothing changes."""
    scores = torch.tensor([0.95, 0.9, 0.1, 0.9, 0.8, 0.6, 0.2, 0.9, 0.7])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    flagged = torch.tensor([True, True, False, False, False, False, False, False, False])
    content_seeded = torch.tensor([False, False, True])

    def withdrawn(*classes):
        return {c: {"flagged": 1, "withdrawn": c in classes} for c in range(3)}

    info = withdrawn(1, 2)
    out = readout.demote_withdrawn_scores(scores, flagged, labels, info, content_seeded, 0.5)
    assert torch.allclose(out, torch.tensor([0.95, 0.9, 0.1, 0.45, 0.4, 0.3, 0.1, 0.9, 0.7]))
    assert info[1]["scores_scaled"] and not info[2]["scores_scaled"] and "scores_scaled" not in info[0]
    flagged_in_1 = torch.zeros(9, dtype=torch.bool)
    flagged_in_1[3] = True  # a flag kept in the withdrawn class itself (its content seed) is not "elsewhere"
    lone = withdrawn(1)
    assert torch.equal(readout.demote_withdrawn_scores(scores, flagged_in_1, labels, lone, content_seeded, 0.5), scores)
    assert not lone[1]["scores_scaled"]
    assert torch.equal(readout.demote_withdrawn_scores(scores, flagged, labels, withdrawn(1), content_seeded, 1.0),
                       scores)
    flagged_and_1 = flagged | flagged_in_1  # a flagged sample of a scaled class keeps its score
    assert torch.allclose(readout.demote_withdrawn_scores(scores, flagged_and_1, labels, withdrawn(1), content_seeded,
                                                          0.5),
                          torch.tensor([0.95, 0.9, 0.1, 0.9, 0.4, 0.3, 0.1, 0.9, 0.7]))
    assert qt.QTConfig.paper().withdrawn_score_scale == 1.0


def _quarantine_that_missed_part_of_its_poison():
    """Pixel embedding, scores and flags of four classes of 200 clean images, each a tight cluster with scores
    around 0.08; class 0 also holds 60 relabelled images, 20 inside each other class's cluster: 39 flagged (score
    0.95), 21 left with a raised score (0.4, the poison a quarantine learned late), and 5 of its own clean images
    with the same raised score (odd images of the class itself). Returns embedding, labels, scores, flags, and the
    masks of the 21 missed poison and the 5 odd clean images."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points, labels, scores, flagged, kind = [], [], [], [], []

    def add(centre: int, label: int, n: int, score: float, flag: bool, what: int):
        points.append(centres[centre] + 0.5 * torch.randn(n, centres.shape[1], generator=g))
        labels.append(torch.full((n,), label))
        odds = torch.tensor(score / (1 - score)).log() + 0.3 * torch.randn(n, generator=g)
        scores.append(torch.sigmoid(odds))
        flagged.append(torch.full((n,), flag))
        kind.append(torch.full((n,), what))

    for c in range(4):
        add(c, c, 200, 0.08, False, 0)
    for c in (1, 2, 3):
        add(c, 0, 13, 0.95, True, 0)
        add(c, 0, 7, 0.4, False, 1)
    add(0, 0, 5, 0.4, False, 2)
    kind = torch.cat(kind)
    return (torch.cat(points), torch.cat(labels), torch.cat(scores), torch.cat(flagged), kind == 1, kind == 2)


def test_score_outliers_of_a_flagged_class_that_look_relabelled_are_flagged():
    embedding, labels, scores, flagged, missed, odd_clean = _quarantine_that_missed_part_of_its_poison()
    out, info = readout.flag_score_outliers(scores, flagged, labels, 4, embedding, qt.QTConfig(), baseline=0.8)
    assert torch.equal(out, flagged | missed)  # the raised poison joins; the class's own odd images do not
    assert not bool(out[odd_clean].any())
    assert info["added_per_class"] == {"0": 21}
    assert 1.5 < info["threshold_z"] < 4.0  # the 0.99 quantile of near-normal noise, not a fixed number
    strict = readout.flag_score_outliers(scores, flagged, labels, 4, embedding, qt.QTConfig(score_outlier_quantile=1.0),
                                         baseline=0.8)[0]
    assert torch.equal(strict, flagged | missed)  # at the reference's maximum: still far above it


def test_score_outliers_change_nothing_without_a_reference_or_pixel_evidence():
    """The paper's settings, pixel neighbours that say little about labels, no flags at all, or flags in every
    class (no classes left to say how far a clean score strays): the flags come back as they were."""
    embedding, labels, scores, flagged, _, _ = _quarantine_that_missed_part_of_its_poison()
    every_class = flagged.clone()
    every_class[torch.stack([torch.nonzero(labels == c)[0, 0] for c in (1, 2, 3)])] = True
    cases = [(flagged, qt.QTConfig.paper(), 0.8), (flagged, qt.QTConfig(), 0.3),
             (torch.zeros_like(flagged), qt.QTConfig(), 0.8), (every_class, qt.QTConfig(), 0.8)]
    for given, cfg, baseline in cases:
        out, info = readout.flag_score_outliers(scores, given, labels, 4, embedding, cfg, baseline)
        assert torch.equal(out, given) and "added_per_class" not in info


def _quarantine_that_left_confident_lookalikes(missed_margin: float = 8.0):
    """Pixel embedding, labels, flags and final logits of four classes of 200 clean images (tight 2-D clusters,
    label margins around 4). Class 0 also holds relabelled images: 40 flagged (20 inside class 2's cluster, 20
    inside class 3's), 20 the quarantine missed inside class 1's cluster and 3 halfway between classes 2 and 3
    (a mixed look: the strict look-alike test rejects them, the pixel test does not), both labelled with margin
    ``missed_margin``; and 6 clean images of class 0 that look like class 1 (border cases, margin about 0.5).
    Returns embedding, labels, flags, logits and the masks of the 23 missed poison and the 6 border cases."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points, labels, flagged, margins, kind = [], [], [], [], []

    def add(where: torch.Tensor, label: int, n: int, margin: float, flag: bool, what: int):
        points.append(where + 0.5 * torch.randn(n, 2, generator=g))
        labels.append(torch.full((n,), label))
        margins.append(margin + 0.5 * torch.randn(n, generator=g))
        flagged.append(torch.full((n,), flag))
        kind.append(torch.full((n,), what))

    for c in range(4):
        add(centres[c], c, 200, 4.0, False, 0)
    add(centres[2], 0, 20, 4.0, True, 0)
    add(centres[3], 0, 20, 4.0, True, 0)
    add(centres[1], 0, 20, missed_margin, False, 1)
    add((centres[2] + centres[3]) / 2, 0, 3, missed_margin, False, 1)
    add(centres[1], 0, 6, 0.5, False, 2)
    labels, flagged, kind = torch.cat(labels), torch.cat(flagged), torch.cat(kind)
    logits = torch.zeros(labels.numel(), 8)
    logits[torch.arange(labels.numel()), labels] = torch.cat(margins)
    logits[flagged, labels[flagged] + 4] = 12.0  # the flags: predicted in their quarantine class
    return torch.cat(points), labels, flagged, logits, kind == 1, kind == 2


def test_lookalikes_a_kept_quarantine_left_are_flagged_when_the_model_is_sure_of_them():
    """Class 0's quarantine is kept and missed 23 of its relabelled images, which the model labels as surely as
    the class's own images: all 23 join (those inside class 1's cluster by the strict look-alike test, the mixed
    ones by the pixel test once the strict ones have said the class holds confident look-alikes); its border
    cases (look like class 1, labelled with doubt) do not. Where the missed images are labelled with doubt too,
    no look-alike is confident and nothing is added; where only a few are sure, under half of the class's strict
    look-alikes, nothing either (the gate); nor in a withdrawn class, in the paper's settings or where pixel
    neighbours say little about labels."""
    embedding, labels, flagged, logits, missed, border = _quarantine_that_left_confident_lookalikes()
    out, info = readout.flag_confident_lookalikes(logits, flagged, labels, [], embedding, 4, qt.QTConfig(), 0.8)
    assert torch.equal(out, flagged | missed) and info["0"]["added"] == 23
    assert not bool(out[border].any())
    assert 3.0 < info["0"]["margin_bar"] < 5.0  # the median margin of the class's own-looking images
    assert info["0"]["confident_share"] >= 0.75  # of its 20-plus strict look-alikes, only the 6 border cases fail
    strict_only = readout.flag_confident_lookalikes(logits, flagged, labels, [], embedding, 4,
                                                    qt.QTConfig(lookalike_pixel_test=False), 0.8)[1]
    assert 20 <= strict_only["0"]["added"] < 23  # the mixed-looking ones need the pixel test
    doubtful = _quarantine_that_left_confident_lookalikes(missed_margin=0.5)
    same, seen = readout.flag_confident_lookalikes(doubtful[3], doubtful[2], doubtful[1], [], doubtful[0], 4,
                                                   qt.QTConfig(), 0.8)
    assert torch.equal(same, doubtful[2]) and seen["0"]["added"] == 0 and seen["0"]["confident_share"] < 0.5
    few_sure = doubtful[3].clone()
    few_sure[torch.nonzero(doubtful[4]).flatten()[:5], 0] = 8.0  # 5 sure look-alikes: above the bar, but few
    same, seen = readout.flag_confident_lookalikes(few_sure, doubtful[2], doubtful[1], [], doubtful[0], 4,
                                                   qt.QTConfig(), 0.8)
    assert torch.equal(same, doubtful[2]) and seen["0"]["added"] == 0  # the gate: under half of them are sure
    for withdrawn, cfg, baseline in (([0], qt.QTConfig(), 0.8), ([], qt.QTConfig.paper(), 0.8),
                                     ([], qt.QTConfig(), 0.3)):
        same, none = readout.flag_confident_lookalikes(logits, flagged, labels, withdrawn, embedding, 4, cfg, baseline)
        assert torch.equal(same, flagged) and none == {}


def test_the_label_margin_ignores_the_quarantine_half():
    logits = torch.tensor([[3.0, 1.0, 9.0, 0.0], [0.0, 2.0, 0.0, 5.0]])  # K = 2: columns 2-3 are quarantine classes
    assert readout.label_margin(logits, torch.tensor([0, 0]), 2).tolist() == [2.0, -2.0]


def test_a_content_fallback_is_completed_by_the_quarantines_ranking():
    """A withdrawn class flagged by its content seed also flags its other members that score like the seed and
    whose pixel neighbours are other classes: class 0's seed holds 30 of its 60 relabelled images (scores 0.3-0.9,
    a continuum); of the rest, the 24 scored like the seed join, the 6 scored like clean images do not, nor do its
    own images scored like the seed (an own-looking score outlier). A class that is not withdrawn, one without
    seed members and the paper's settings change nothing."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    labels = torch.cat([torch.arange(4).repeat_interleave(200), torch.zeros(60, dtype=torch.long)])
    where = torch.cat([torch.arange(4).repeat_interleave(200), torch.tensor([1, 2, 3]).repeat_interleave(20)])
    embedding = centres[where] + 0.5 * torch.randn(labels.numel(), 2, generator=g)
    scores = torch.full((labels.numel(),), 0.05)
    scores[:200] = torch.linspace(0.0, 0.3, 200)  # class 0's own images: the low end of the continuum
    scores[190:200] = 0.6  # ... ten of them scored like the poison (they look like class 0)
    poison = torch.arange(800, 860)
    seed = torch.zeros(labels.numel(), dtype=torch.bool)
    seed[poison[::2]] = True  # every other relabelled image: 10 in each other class's cluster
    scores[poison[::2]] = torch.linspace(0.3, 0.9, 30)
    late, low = poison[1::2][:24], poison[1::2][24:]  # the seed's strict test missed them
    scores[late] = 0.6
    scores[low] = 0.05
    info = {0: {"flagged": 30, "ambiguous_share": 0.3, "withdrawn": True, "content_flagged": 30}}
    out = readout.complete_content_fallback(scores, seed.clone(), labels, seed, info, embedding, qt.QTConfig())
    expected = seed.clone()
    expected[late] = True
    assert torch.equal(out, expected)
    assert info[0]["content_completed"] == 24 and info[0]["seed_rank"] > 0.9
    lost = scores.clone()
    lost[poison] = 0.01  # a quarantine that let its seed go: it ranks the seed below the rest of the class
    lost[late] = 0.02
    unranked = {0: {"flagged": 0, "ambiguous_share": 0.0, "withdrawn": True, "content_flagged": 30}}
    assert torch.equal(readout.complete_content_fallback(lost, seed.clone(), labels, seed, unranked, embedding,
                                                         qt.QTConfig()), seed)  # the bar (its floor) would take all
    assert unranked[0]["content_completed"] == 0 and unranked[0]["seed_rank"] < 0.5
    whole = labels == 0  # a seed that is its class: no rest to rank it against (run.json gets null, not NaN)
    unranked = {0: {"flagged": 0, "ambiguous_share": 0.0, "withdrawn": True, "content_flagged": 260}}
    assert torch.equal(readout.complete_content_fallback(scores, whole, labels, whole, unranked, embedding,
                                                         qt.QTConfig()), whole)
    assert unranked[0]["content_completed"] == 0 and unranked[0]["seed_rank"] is None
    for change in ({"withdrawn": False}, {"content_flagged": 0}):
        other = {0: {**info[0], **change}}
        other[0].pop("content_completed"), other[0].pop("seed_rank")
        assert torch.equal(readout.complete_content_fallback(scores, seed, labels, seed, other, embedding,
                                                             qt.QTConfig()), seed)
        assert "content_completed" not in other[0]
    assert torch.equal(readout.complete_content_fallback(scores, seed, labels, seed, info, embedding,
                                                         qt.QTConfig.paper()), seed)


def test_scores_of_a_completed_fallback_class_follow_its_flags():
    """In a class whose content fallback was completed, a flag scores at least 0.5 and the rest at most 0.5, each
    side in its own order; another withdrawn class (no completion recorded) keeps its scores."""
    scores = torch.tensor([0.2, 0.7, 0.8, 0.1, 0.9, 0.3])
    flagged = torch.tensor([True, True, False, False, False, True])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    info = {0: {"withdrawn": True, "content_flagged": 1, "content_completed": 1},
            1: {"withdrawn": True, "content_flagged": 1}}
    out = readout.scores_follow_fallback_flags(scores, flagged, labels, info)
    assert torch.allclose(out, torch.tensor([0.5, 0.7, 0.5, 0.1, 0.9, 0.3]))
    del info[0]["content_completed"]
    assert torch.equal(readout.scores_follow_fallback_flags(scores, flagged, labels, info), scores)


def test_flag_ranked_scores_put_flags_first_and_a_flagged_class_next():
    """A flag scores 0.5 + s/2 (above 0.5 at any probability), an unflagged sample (share + (1 - share) s)/2 with
    its class's flagged share: class 0 (half flagged) ranks its unflagged members above class 1's at a higher
    probability, the order within each class stays. With flags in half of the classes (a many-target attack),
    no class gets a share: the unflagged score s/2."""
    scores = torch.tensor([0.2, 0.9, 0.1, 0.3, 0.3, 0.4, 0.05, 0.6])
    flagged = torch.tensor([True, True, False, False, False, False, False, False])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])
    out, share = readout.flag_ranked_scores(scores, flagged, labels, 4)
    assert torch.allclose(share, torch.tensor([0.5, 0.0, 0.0, 0.0]))
    assert torch.allclose(out, torch.tensor([0.6, 0.95, 0.275, 0.325, 0.15, 0.2, 0.025, 0.3]))
    assert torch.equal(out >= 0.5, flagged)
    assert out[3] > out[4] and out[2] > out[5]  # 0.3 in class 0 above 0.3 in class 1; 0.1 above 0.4 there
    assert torch.equal(out[labels == 0].argsort(), torch.tensor([2, 3, 0, 1]))  # the class's own order stays
    flagged[4] = True  # flags in classes 0 and 1: half of the 4 classes
    out, share = readout.flag_ranked_scores(scores, flagged, labels, 4)
    assert not share.any()
    assert torch.allclose(out[~flagged], scores[~flagged] / 2)
    assert torch.allclose(out[flagged], 0.5 + scores[flagged] / 2)
    certain = readout.flag_ranked_scores(torch.tensor([1.0, 0.0]), torch.tensor([False, True]), torch.tensor([0, 0]),
                                         4)[0]
    assert f"{float(certain[0]):.6f}" < "0.500000" <= f"{float(certain[1]):.6f}"  # the CSV's six decimals keep it
    assert not qt.QTConfig.paper().flag_ranked_scores and qt.QTConfig().flag_ranked_scores


def test_score_rules_stay_out_of_a_many_target_attack(monkeypatch):
    """With flags in half of the classes or more (a many-target attack, whose classes without flags are the ones
    no seed reached and hold poison of their own), neither score rule acts, though the reference is large enough
    (its minimum lowered here: the fixture's classes are small). With the same reference and one class flagged,
    the score outliers act as before."""
    embedding, labels, scores, flagged, missed, _ = _quarantine_that_missed_part_of_its_poison()
    monkeypatch.setattr(readout, "SCORE_OUTLIER_MIN_REFERENCE", 1)
    two_classes = flagged.clone()
    two_classes[torch.nonzero(labels == 1)[0, 0]] = True  # classes 0 and 1 of 4 flagged: half
    assert torch.equal(readout.flag_score_outliers(scores, two_classes, labels, 4, embedding, qt.QTConfig(), 0.8)[0],
                       two_classes)
    assert torch.equal(readout.own_looking_by_score(scores, two_classes, labels, 4, embedding, qt.QTConfig(), 0.8)[0],
                       two_classes)
    assert torch.equal(readout.flag_score_outliers(scores, flagged, labels, 4, embedding, qt.QTConfig(), 0.8)[0],
                       flagged | missed)


def _quarantine_grown_into_its_own_class():
    """Pixel embedding, scores and flags of four classes, each a tight cluster of 200 clean images; classes 1-3
    score around 0.08, class 0 (the target) spreads wider (log-odds sd 1). Class 0 also holds: 45 relabelled
    images inside the other clusters, flagged (score 0.95); 10 relabelled images that look like class 0 (inside
    its cluster) with a score far above it (0.99), 5 flagged and 5 not; and 10 of its own clean images flagged at
    a score its class reaches (0.5). Returns embedding, labels, scores, flags, and the masks of the 10 clean
    flags, the 5 flagged look-alikes and the 5 unflagged ones."""
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points, labels, scores, flagged, kind = [], [], [], [], []

    def add(centre: int, label: int, n: int, score: float, spread: float, flag: bool, what: int):
        points.append(centres[centre] + 0.5 * torch.randn(n, centres.shape[1], generator=g))
        labels.append(torch.full((n,), label))
        scores.append(torch.sigmoid(torch.tensor(score / (1 - score)).log() + spread * torch.randn(n, generator=g)))
        flagged.append(torch.full((n,), flag))
        kind.append(torch.full((n,), what))

    for c in range(4):
        add(c, c, 200, 0.08, 1.0 if c == 0 else 0.3, False, 0)
    for c in (1, 2, 3):
        add(c, 0, 15, 0.95, 0.1, True, 0)
    add(0, 0, 5, 0.99, 0.1, True, 2)
    add(0, 0, 5, 0.99, 0.1, False, 3)
    add(0, 0, 10, 0.5, 0.1, True, 1)
    kind = torch.cat(kind)
    return (torch.cat(points), torch.cat(labels), torch.cat(scores), torch.cat(flagged), kind == 1, kind == 2,
            kind == 3)


def test_samples_that_look_like_their_own_class_are_decided_by_their_score():
    embedding, labels, scores, flagged, clean_flags, look_alike, missed = _quarantine_grown_into_its_own_class()
    out, info = readout.own_looking_by_score(scores, flagged, labels, 4, embedding, qt.QTConfig(), baseline=0.8)
    assert torch.equal(out, (flagged & ~clean_flags) | missed)  # relabelled flags stay, look-alikes far up join
    assert info["withdrawn_per_class"] == {"0": 10} and info["added_per_class"] == {"0": 5}
    assert 3.0 < info["threshold_z"] < 8.0  # twice the 0.99 quantile of near-normal noise
    loose = readout.own_looking_by_score(scores, flagged, labels, 4, embedding, qt.QTConfig(own_looking_flag_z=10.0),
                                         baseline=0.8)[0]
    assert torch.equal(loose, flagged & ~clean_flags & ~look_alike)  # the factor is what keeps the look-alikes


def test_own_looking_samples_change_nothing_when_off_withdrawn_or_without_a_reference_or_pixel_evidence():
    """The paper's settings, a factor of 0, a withdrawn class (its scores did not separate), pixel neighbours
    that say little about labels, no flags, or flags in every class: the flags come back as they were."""
    embedding, labels, scores, flagged, _, _, _ = _quarantine_grown_into_its_own_class()
    every_class = flagged.clone()
    every_class[torch.stack([torch.nonzero(labels == c)[0, 0] for c in (1, 2, 3)])] = True
    class_0 = torch.tensor([True, False, False, False])
    cases = [(flagged, qt.QTConfig.paper(), 0.8, None), (flagged, qt.QTConfig(own_looking_flag_z=0.0), 0.8, None),
             (flagged, qt.QTConfig(), 0.8, class_0), (flagged, qt.QTConfig(), 0.3, None),
             (torch.zeros_like(flagged), qt.QTConfig(), 0.8, None), (every_class, qt.QTConfig(), 0.8, None)]
    for given, cfg, baseline, withdrawn in cases:
        out, info = readout.own_looking_by_score(scores, given, labels, 4, embedding, cfg, baseline, withdrawn)
        assert torch.equal(out, given) and not sum(info.get("withdrawn_per_class", {}).values())
        assert not sum(info.get("added_per_class", {}).values())


def test_a_withdrawn_class_falls_back_to_its_content_seed_and_a_kept_one_does_not():
    """Class 1's quarantine is a continuum (withdrawn): its flags become its content-seed members, whatever their
    scores; class 0's crisp quarantine keeps its own flags although it has seed members too; class 2 has a seed
    but no quarantine flags, so nothing is withdrawn and nothing falls back."""
    crisp = torch.cat([torch.full((50,), 0.95), torch.full((45,), 0.05), torch.full((5,), 0.5)])
    continuum = torch.linspace(0.0, 1.0, 100)
    scores = torch.cat([crisp, continuum, torch.full((100,), 0.5)])
    labels = torch.arange(3).repeat_interleave(100)
    flagged = torch.cat([crisp > 0.6, continuum > 0.5, torch.zeros(100, dtype=torch.bool)])
    seed = torch.zeros(300, dtype=torch.bool)
    seed[90:100] = True  # class 0: low scores, not flagged by the crisp quarantine
    seed[100:130] = True  # class 1: the low end of the continuum, not among its quarantine flags
    seed[200:220] = True  # class 2: never flagged by its quarantine
    kept, info = readout.withdraw_ambiguous(scores, flagged, labels, 3, qt.QTConfig(), seeded_by_content=seed)
    expected = torch.cat([crisp > 0.6, torch.zeros(200, dtype=torch.bool)])
    expected[100:130] = True
    assert torch.equal(kept, expected)
    assert info[1] == {"flagged": 50, "ambiguous_share": 0.4, "withdrawn": True, "content_flagged": 30}
    assert "content_flagged" not in info[0] and 2 not in info
    off = qt.QTConfig(content_fallback=False)  # the switch: withdrawn means nothing flagged
    assert torch.equal(readout.withdraw_ambiguous(scores, flagged, labels, 3, off, seeded_by_content=seed)[0],
                       torch.cat([crisp > 0.6, torch.zeros(200, dtype=torch.bool)]))


def test_step_3_hands_the_content_seed_to_the_withdrawal_and_says_what_the_quarantine_let_go():
    """The wiring in scan.read_out (the rule: above): class 0 was started by a content seed of 40 samples whose
    pixels look like classes 1 and 2; the final quarantine holds 30 other members instead. Read out, the seed is
    the class's answer and run.json's text says why; with the rule off the quarantine's flags stand."""
    from qtclean.scan import read_out

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(100)
    looks = labels.clone()
    looks[0:40] = 1 + torch.arange(40) % 2  # the seed: relabelled images of classes 1 and 2
    embedding = torch.nn.functional.one_hot(looks, 3).float() * 4 + 0.1 * torch.randn(300, 3, generator=gen)
    logits = torch.zeros(300, 6)
    logits[torch.arange(300), labels] = 5.0
    logits[60:90, 3] = 9.0  # the quarantine swung to 30 members outside the seed
    pre_mask = torch.zeros(300, dtype=torch.bool)
    pre_mask[0:40] = True
    epochs = [{"phase": "pre-quarantine", "epoch": 4, "content_seed_per_class": [40, 0, 0]}]
    extra: dict = {}
    _, flagged = read_out(logits, labels, pre_mask, epochs, qt.QTConfig(), lambda: (embedding, 0.9), extra)
    assert flagged[0:40].all() and not flagged[40:].any()
    assert extra["quarantine_ambiguity"]["0"]["content_seed_held"] == 0.0
    assert "holding only 0% of the 40 samples its content seed started it with" in extra["flags_withdrawn"]
    _, flagged = read_out(logits, labels, pre_mask, epochs, qt.QTConfig(content_seed_min_held=0.0),
                          lambda: (embedding, 0.9), {})
    assert flagged[60:90].all()  # kept (other rules may add the look-alike seed to them)


def test_unflagged_samples_of_a_many_target_attack_rank_by_their_trigger_residual():
    """Every class flagged, a third of each class's poison left unflagged (what a seeded quarantine missed): each
    unflagged sample gets its residual's rank among the clean reference, 0..1, and the missed poison ranks above
    every clean image; the flags get 0, and what the rule saw goes to run.json."""
    embedding, labels, poisoned, _ = _all_to_all_in_pixels(flagged_classes=6)
    missed = poisoned & (torch.arange(labels.numel()) % 3 == 0)
    flagged = poisoned & ~missed
    ranks, info = readout.residual_ranks(embedding, labels, flagged, 6, qt.QTConfig(), baseline=0.8)
    assert info["ranked"] is True and info["flags_median_rank"] > 0.9  # the missed poison ranks beside them
    assert bool((ranks[flagged] == 0).all()) and bool((ranks >= 0).all()) and bool((ranks <= 1).all())
    clean = ~poisoned
    assert float(ranks[missed].min()) > float(ranks[clean].max()) - 1e-6
    assert 0.3 < float(ranks[clean].median()) < 0.7  # the reference's own ranks spread over 0..1


def test_residual_ranks_stay_out_where_they_cannot_tell():
    """None where the option is off, pixels say little, fewer than half of the classes hold flags, or the flags share
    no trigger in their pixels (clean images flagged in every class: their median rank is no outlier)."""
    embedding, labels, poisoned, _ = _all_to_all_in_pixels(flagged_classes=6)
    off = qt.QTConfig(residual_ranked_scores=False)
    assert readout.residual_ranks(embedding, labels, poisoned, 6, off, baseline=0.8) == (None, {})
    assert readout.residual_ranks(embedding, labels, poisoned, 6, qt.QTConfig(), baseline=0.2) == (None, {})
    few = poisoned & (labels < 2)
    assert readout.residual_ranks(embedding, labels, few, 6, qt.QTConfig(), baseline=0.8) == (None, {})
    clean_flags = ~poisoned & (torch.arange(labels.numel()) % 7 == 0)
    ranks, info = readout.residual_ranks(embedding, labels, clean_flags, 6, qt.QTConfig(), baseline=0.8)
    assert ranks is None and info["ranked"] is False and info["flags_median_rank"] < 0.9
    assert qt.QTConfig.paper().residual_ranked_scores is False


def _stamped_set():
    """Three classes of 150 noisy prototypes each (1x8x8). Poison: 30 images of classes 1 and 2 labelled 0, stamped with a
    3x3 patch; covers: 10 images of class 0 and 10 of class 1, stamped, labels kept. The quarantine flagged half
    the poison and 3 clean images of class 0. The embedding: one direction per class an image looks like."""
    import numpy as np

    rng = np.random.default_rng(0)
    looks = np.concatenate([np.repeat(np.arange(3), 150), np.repeat([1, 2], 15)])
    labels = np.concatenate([np.repeat(np.arange(3), 150), np.zeros(30, dtype=np.int64)])
    images = np.clip(rng.integers(0, 256, size=(3, 1, 8, 8))[looks] + rng.normal(0, 12, (480, 1, 8, 8)),
                     0, 255).astype(np.uint8)
    poisoned = np.arange(480) >= 450
    covers = np.zeros(480, dtype=bool)
    covers[0:10] = covers[150:160] = True
    images[poisoned | covers, 0, 2:5, 2:5] = np.array([[255, 0, 255], [0, 255, 0], [255, 255, 0]])
    flagged = np.zeros(480, dtype=bool)
    flagged[450:465] = flagged[20:23] = True
    gen = torch.Generator().manual_seed(0)
    embedding = torch.nn.functional.one_hot(torch.from_numpy(looks), 3).float() * 4 + 0.1 * torch.randn(480, 3,
                                                                                                      generator=gen)
    return images, embedding, torch.from_numpy(labels), torch.from_numpy(flagged), torch.from_numpy(poisoned)


def test_the_stamped_images_the_quarantine_missed_are_flagged_and_its_clean_flags_withdrawn():
    """The patch is on 15 of class 0's 18 flags: the 3 clean flags carry none and are withdrawn; the unflagged
    poison carries it and looks like classes 1 and 2: flagged. The covers carry it too but look like their own
    class (class 0's) or are in a class without flags (class 1's): left. With a patch on only half of the flags
    (a trigger that differs from image to image, partly shared: IAB) no flag is withdrawn. Off, nothing changes;
    where pixel neighbours say nothing about labels, only the withdrawal; images over 64x64: skipped."""
    import numpy as np

    images, embedding, labels, flagged, poisoned = _stamped_set()
    out, info = readout.flag_shared_blocks(images, embedding, labels, flagged, 3, qt.QTConfig(), 0.9)
    assert torch.equal(out, poisoned)
    assert info["positions"] == 1 and info["per_class"] == {"0": {"flags": 18, "carrying": 15, "withdrawn": 3,
                                                                  "added": 15}}
    half = flagged.clone()
    half[25:37] = True  # 15 of 30 flags carry the patch
    out, info = readout.flag_shared_blocks(images, embedding, labels, half, 3, qt.QTConfig(), 0.9)
    assert torch.equal(out, half | poisoned) and info["per_class"]["0"]["withdrawn"] == 0
    off = qt.QTConfig(shared_block_min_share=0.0)
    assert torch.equal(readout.flag_shared_blocks(images, embedding, labels, flagged, 3, off, 0.9)[0], flagged)
    assert torch.equal(readout.flag_shared_blocks(images, embedding, labels, flagged, 3, qt.QTConfig(), 0.3)[0],
                       flagged & poisoned)
    large = np.zeros((480, 1, 80, 80), dtype=np.uint8)
    assert readout.flag_shared_blocks(large, embedding, labels, flagged, 3, qt.QTConfig(), 0.9)[1] == {
        "skipped": "images over 4096 pixels"}


def test_step_3_applies_the_exact_trigger_rule_when_it_has_the_images():
    """The wiring in scan.read_out: with the set's images the stamped images are the flags (the other rules off, as
    the paper's variant has them); without images (a caller that has none) the quarantine's flags stand."""
    from qtclean.scan import read_out

    images, embedding, labels, flagged, poisoned = _stamped_set()
    logits = torch.zeros(480, 6)
    logits[torch.arange(480), labels] = 5.0
    logits[flagged, 3] = 9.0  # class 0's quarantine class
    cfg = qt.QTConfig.paper(shared_block_min_share=0.2)
    extra: dict = {}
    scores, out = read_out(logits, labels, torch.zeros(480, dtype=torch.bool), [], cfg, lambda: (embedding, 0.9),
                           extra, images)
    assert torch.equal(out, poisoned) and extra["shared_blocks"]["per_class"]["0"]["added"] == 15
    assert bool((scores[out] >= 0.5).all()) and bool((scores[~out] <= 0.5).all())  # the flags first
    _, out = read_out(logits, labels, torch.zeros(480, dtype=torch.bool), [], cfg, lambda: (embedding, 0.9), {})
    assert torch.equal(out, flagged)


def _stamped_all_to_all_set(covers: int = 0):
    """Four classes of 120 noisy prototypes each (1x8x8); 15 of each class stamped with a 3x3 patch and labelled as
    the next class (all-to-all); ``covers`` images of classes 2 and 3 each stamped with their labels kept. The
    quarantine flagged class 1's poison only. The embedding: one direction per class an image looks like."""
    import numpy as np

    rng = np.random.default_rng(1)
    looks = np.repeat(np.arange(4), 120)
    images = np.clip(rng.integers(0, 256, size=(4, 1, 8, 8))[looks] + rng.normal(0, 12, (480, 1, 8, 8)),
                     0, 255).astype(np.uint8)
    poisoned = np.zeros(480, dtype=bool)
    stamped = np.zeros(480, dtype=bool)
    for c in range(4):
        members = np.flatnonzero(looks == c)
        poisoned[members[:15]] = True
        if c >= 2:
            stamped[members[15:15 + covers]] = True
    images[poisoned | stamped, 0, 2:5, 2:5] = np.array([[255, 0, 255], [0, 255, 0], [255, 255, 0]])
    labels = torch.from_numpy(np.where(poisoned, (looks + 1) % 4, looks))
    gen = torch.Generator().manual_seed(0)
    embedding = torch.nn.functional.one_hot(torch.from_numpy(looks), 4).float() * 4 + 0.1 * torch.randn(
        480, 4, generator=gen)
    poisoned_t = torch.from_numpy(poisoned)
    return images, embedding, labels, poisoned_t & (labels == 1), poisoned_t


def test_a_stamp_all_to_all_is_followed_into_the_classes_without_flags():
    """The quarantine reached one class of four: the patch its flags carry is on the other classes' poison too,
    each image looking like another class, and those are flagged (recorded per class). With covers among the
    carriers there (30 stamped images keeping their labels: 45 of 75 look relabelled, under four in five) nothing
    is added there, nor with the rule off (the flagged classes only, the paper's way)."""
    images, embedding, labels, flagged, poisoned = _stamped_all_to_all_set()
    out, info = readout.flag_shared_blocks(images, embedding, labels, flagged, 4, qt.QTConfig(), 0.9)
    assert torch.equal(out, poisoned)
    assert info["elsewhere"] == {"carriers": 45, "look_relabelled": 45}
    assert {c: v["added"] for c, v in info["per_class"].items()} == {"1": 0, "0": 15, "2": 15, "3": 15}
    flagged_only = qt.QTConfig(shared_block_other_classes=False)
    out, info = readout.flag_shared_blocks(images, embedding, labels, flagged, 4, flagged_only, 0.9)
    assert torch.equal(out, flagged) and "elsewhere" not in info
    images, embedding, labels, flagged, poisoned = _stamped_all_to_all_set(covers=15)
    out, info = readout.flag_shared_blocks(images, embedding, labels, flagged, 4, qt.QTConfig(), 0.9)
    assert torch.equal(out, flagged) and info["elsewhere"] == {"carriers": 75, "look_relabelled": 45}


def test_a_stamp_on_a_share_of_the_whole_set_is_found_without_a_flag():
    """No flag at all: the patch is on 60 of the 480 images (12.5 %, past the 5 % bar), every carrier looks like
    another class, and all 60 are flagged (recorded per class). With covers (30 more carriers keeping their
    labels: 60 of 90 look relabelled, under four in five), off, or pixel neighbours that say nothing about labels:
    nothing. Through scan.read_out, the paper's variant with the rule on: the same flags, scored as flags."""
    from qtclean.scan import read_out

    images, embedding, labels, _, poisoned = _stamped_all_to_all_set()
    none = torch.zeros(480, dtype=torch.bool)
    out, info = readout.flag_common_blocks(images, embedding, labels, none, qt.QTConfig(), 0.9)
    assert torch.equal(out, poisoned)
    assert info["positions"] == 1 and info["carriers"] == 60 and info["look_relabelled"] == 60
    assert info["added_per_class"] == {str(c): 15 for c in range(4)}
    assert torch.equal(readout.flag_common_blocks(images, embedding, labels, none, qt.QTConfig(common_block_share=0.0),
                                                  0.9)[0], none)
    assert readout.flag_common_blocks(images, embedding, labels, none, qt.QTConfig(), 0.3) == (none, {})
    covered, embedding_c, labels_c, _, _ = _stamped_all_to_all_set(covers=15)
    out, info = readout.flag_common_blocks(covered, embedding_c, labels_c, none, qt.QTConfig(), 0.9)
    assert not bool(out.any()) and info["carriers"] == 90 and info["look_relabelled"] == 60
    logits = torch.zeros(480, 8)
    logits[torch.arange(480), labels] = 5.0
    extra: dict = {}
    scores, out = read_out(logits, labels, none, [], qt.QTConfig.paper(common_block_share=0.05),
                           lambda: (embedding, 0.9), extra, images)
    assert torch.equal(out, poisoned) and extra["common_blocks"]["look_relabelled"] == 60
    assert bool((scores[out] >= 0.5).all()) and bool((scores[~out] <= 0.5).all())


def _gamma_set():
    """Four classes of 100 images (1x8x8: two columns of background, the rest uniform values 1-255); 25 of each
    class through a gamma curve (x -> 255 (x / 255)^0.6, which never gives 47 of the values) and labelled as the
    next class, all-to-all. The flags: 12 of each class's poison."""
    import numpy as np

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 100)
    images = rng.integers(1, 256, size=(400, 1, 8, 8)).astype(np.uint8)
    images[:, :, :, :2] = 0
    poisoned = np.zeros(400, dtype=bool)
    flagged = np.zeros(400, dtype=bool)
    for c in range(4):
        members = np.flatnonzero(labels == c)[:25]
        images[members] = np.round(255 * (images[members] / 255.0) ** 0.6).astype(np.uint8)
        poisoned[members] = True
        flagged[members[:12]] = True
    labels = np.where(poisoned, (labels + 1) % 4, labels)
    return images, torch.from_numpy(labels), torch.from_numpy(flagged), torch.from_numpy(poisoned)


def test_the_images_that_skip_the_values_the_flags_skip_are_flagged():
    """The gamma curve's 47 skipped values are holes in the flags' palette: the 52 unflagged filtered images hold
    none of them and are flagged, no clean image with them; also with 6 clean flags among the 48. Flags of clean
    images share no holes (no core): nothing added; nor off, nor where a clean image would hold fewer pixels there
    than the bar asks."""
    import numpy as np

    images, labels, flagged, poisoned = _gamma_set()
    counts = value_counts(images)
    out, info = readout.flag_palette_holes(counts, labels, flagged, 4, qt.QTConfig())
    assert torch.equal(out, poisoned)
    assert info["holes"] == 47 and info["core"] == 48 and info["added_per_class"] == {str(c): 13 for c in range(4)}
    never_given = set(range(256)) - set(np.round(255 * (np.arange(256) / 255.0) ** 0.6).astype(int).tolist())
    assert info["values"] == sorted(never_given)
    with_clean = flagged.clone()
    with_clean[torch.nonzero(~poisoned).flatten()[::50]] = True
    assert int((with_clean & ~poisoned).sum()) == 6
    out, info = readout.flag_palette_holes(counts, labels, with_clean, 4, qt.QTConfig())
    assert torch.equal(out, poisoned | with_clean) and info["core"] == 48
    clean_flags = ~poisoned & (torch.arange(400) % 8 == 0)
    out, info = readout.flag_palette_holes(counts, labels, clean_flags, 4, qt.QTConfig())
    assert torch.equal(out, clean_flags) and "added_per_class" not in info
    assert readout.flag_palette_holes(counts, labels, flagged, 4, qt.QTConfig(palette_min_expected=0.0)) \
        == (flagged, {})
    out, info = readout.flag_palette_holes(counts, labels, flagged, 4, qt.QTConfig(palette_min_expected=50.0))
    assert torch.equal(out, flagged) and "added_per_class" not in info


def test_step_3_flags_the_images_that_skip_the_flags_palette_when_it_has_the_images():
    """The wiring in scan.read_out: the quarantine took 12 of each class's filtered images; with the set's images
    the rest are flagged, scored as flags and recorded (the paper's variant with the rule on); without images,
    not."""
    from qtclean.scan import read_out

    images, labels, flagged, poisoned = _gamma_set()
    logits = torch.zeros(400, 8)
    logits[torch.arange(400), labels] = 5.0
    logits[flagged, labels[flagged] + 4] = 9.0
    cfg = qt.QTConfig.paper(palette_min_expected=5.0)
    extra: dict = {}
    scores, out = read_out(logits, labels, torch.zeros(400, dtype=torch.bool), [], cfg,
                           lambda: (torch.zeros(400, 3), 0.9), extra, images)
    assert torch.equal(out, poisoned) and sum(extra["palette_holes"]["added_per_class"].values()) == 52
    assert bool((scores[out] >= 0.5).all()) and bool((scores[~out] <= 0.5).all())
    _, out = read_out(logits, labels, torch.zeros(400, dtype=torch.bool), [], cfg, lambda: (torch.zeros(400, 3), 0.9),
                      {})
    assert torch.equal(out, flagged)


def _clean_label_set():
    """Three classes of 150 noisy prototypes each (1x8x8); a pattern written onto 120 of class 0's images, labels
    kept (clean-label poison: most of its class)."""
    import numpy as np

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 150)
    images = np.clip(rng.integers(0, 256, size=(3, 1, 8, 8))[labels] + rng.normal(0, 12, (450, 1, 8, 8)),
                     0, 255).astype(np.uint8)
    poisoned = np.zeros(450, dtype=bool)
    poisoned[:120] = True
    images[poisoned, 0, 4:7, 1:4] = np.array([[20, 60, 100], [140, 180, 220], [250, 210, 170]])
    return images, torch.from_numpy(labels), torch.from_numpy(poisoned)


def test_a_block_most_of_one_class_carries_is_flagged_without_any_flag():
    """The quarantine flagged nothing (the poison is the class): the pattern's 120 carriers are flagged; flags the
    model gave stay, and those it already had are not counted as added. Off, or images over 64x64: nothing."""
    import numpy as np

    images, labels, poisoned = _clean_label_set()
    none = torch.zeros(450, dtype=torch.bool)
    out, info = readout.flag_class_bound_blocks(images, labels, none, qt.QTConfig())
    assert torch.equal(out, poisoned)
    assert info["positions"] == 1 and info["per_class"] == {"0": {"carriers": 120, "added": 120}}
    some = none.clone()
    some[100:130] = True  # 20 carriers and 10 clean images of class 0
    out, info = readout.flag_class_bound_blocks(images, labels, some, qt.QTConfig())
    assert torch.equal(out, poisoned | some) and info["per_class"]["0"]["added"] == 100
    off = qt.QTConfig(class_block_share=0.0)
    assert torch.equal(readout.flag_class_bound_blocks(images, labels, none, off)[0], none)
    large = np.zeros((450, 1, 80, 80), dtype=np.uint8)
    assert readout.flag_class_bound_blocks(large, labels, none, qt.QTConfig())[1] == {
        "skipped": "images over 4096 pixels"}


def test_step_3_flags_a_class_bound_block_when_the_quarantine_flagged_nothing():
    """The wiring in scan.read_out: a model that quarantines nothing, and the pattern's carriers are the flags,
    scored above the rest of their class (the paper's variant with the rule on); without images, no flag."""
    from qtclean.scan import read_out

    images, labels, poisoned = _clean_label_set()
    logits = torch.zeros(450, 6)
    logits[torch.arange(450), labels] = 5.0
    cfg = qt.QTConfig.paper(class_block_share=0.2)
    extra: dict = {}
    scores, out = read_out(logits, labels, torch.zeros(450, dtype=torch.bool), [], cfg,
                           lambda: (torch.zeros(450, 3), 0.9), extra, images)
    assert torch.equal(out, poisoned) and extra["class_bound_blocks"]["per_class"]["0"]["added"] == 120
    assert bool((scores[out] >= 0.5).all()) and bool((scores[~out & (labels == 0)] <= 0.5).all())
    _, out = read_out(logits, labels, torch.zeros(450, dtype=torch.bool), [], cfg, lambda: (torch.zeros(450, 3), 0.9),
                      {})
    assert not bool(out.any())


def _posterized_set():
    """Four classes of 100 noisy images each (1x8x8, half their pixels background); 25 of each class posterized (every
    value down to a multiple of 32) and labelled as the next class, all-to-all. The flags: 12 of each class's
    poison."""
    import numpy as np

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 100)
    images = rng.integers(30, 231, size=(400, 1, 8, 8)).astype(np.uint8)
    images[:, :, :, :4] = 0
    poisoned = np.zeros(400, dtype=bool)
    flagged = np.zeros(400, dtype=bool)
    for c in range(4):
        members = np.flatnonzero(labels == c)[:25]
        images[members] &= 0xE0
        poisoned[members] = True
        flagged[members[:12]] = True
    labels = np.where(poisoned, (labels + 1) % 4, labels)
    return images, torch.from_numpy(labels), torch.from_numpy(flagged), torch.from_numpy(poisoned)


def test_a_filter_trigger_all_to_all_is_completed_by_the_gap_in_its_value_residual():
    """The unflagged posterized images point the flags' way in value space past a wide gap: flagged, and nothing
    else, also where the quarantine flagged one class's share only. Flags that share no filter (clean images) open
    no gap: nothing added; off, or no flag: nothing either."""
    images, labels, flagged, poisoned = _posterized_set()
    histograms = value_histograms(value_counts(images))
    out, info = readout.flag_value_residual(histograms, labels, flagged, 4, qt.QTConfig())
    assert torch.equal(out, poisoned)
    assert info["widest_gap"] >= 0.15 and sum(info["added_per_class"].values()) == 52
    clean_flags = torch.zeros(400, dtype=torch.bool)
    for c in range(4):
        clean_flags[torch.nonzero(~poisoned & (labels == c)).flatten()[:12]] = True
    out, info = readout.flag_value_residual(histograms, labels, clean_flags, 4, qt.QTConfig())
    assert torch.equal(out, clean_flags) and info["widest_gap"] < 0.15
    off = qt.QTConfig(value_residual_gap=0.0)
    assert torch.equal(readout.flag_value_residual(histograms, labels, flagged, 4, off)[0], flagged)
    one_class = flagged & (labels == 1)  # a quarantine that took one class's share: the rest follow all the same
    assert torch.equal(readout.flag_value_residual(histograms, labels, one_class, 4, qt.QTConfig())[0], poisoned)
    assert torch.equal(readout.flag_value_residual(histograms, labels, torch.zeros(400, dtype=torch.bool), 4,
                                                   qt.QTConfig())[0], torch.zeros(400, dtype=torch.bool))


def test_step_3_completes_a_filter_trigger_by_its_value_residual_when_it_has_the_images():
    """The wiring in scan.read_out: the quarantine took 12 of each class's posterized images; with the set's images
    the rest are flagged too and scored as flags (the paper's variant with the rule on); without images, not."""
    from qtclean.scan import read_out

    images, labels, flagged, poisoned = _posterized_set()
    logits = torch.zeros(400, 8)
    logits[torch.arange(400), labels] = 5.0
    logits[flagged, labels[flagged] + 4] = 9.0  # each flag in its class's quarantine class
    cfg = qt.QTConfig.paper(value_residual_gap=0.15)
    extra: dict = {}
    scores, out = read_out(logits, labels, torch.zeros(400, dtype=torch.bool), [], cfg,
                           lambda: (torch.zeros(400, 3), 0.9), extra, images)
    assert torch.equal(out, poisoned) and sum(extra["value_residual"]["added_per_class"].values()) == 52
    assert bool((scores[out] >= 0.5).all()) and bool((scores[~out] <= 0.5).all())
    _, out = read_out(logits, labels, torch.zeros(400, dtype=torch.bool), [], cfg, lambda: (torch.zeros(400, 3), 0.9),
                      {})
    assert torch.equal(out, flagged)


def test_flags_whose_values_moved_against_the_flags_shared_move_are_withdrawn():
    """The posterized set's 100 poisoned images flagged, with 12 clean images whose values avoid the palette (each
    made odd): the flags share one move in value space (median cosine 0.97), the 12 moved the other way and are
    withdrawn, no poisoned flag with them. With a bar over the flags' median, off, or fewer than ten flags: the
    flags as they were. Flags of clean images alone share no such move (median under 0.35): nothing withdrawn."""
    images, labels, _, poisoned = _posterized_set()
    clean = torch.nonzero(~poisoned).flatten()[::25][:12]
    images[clean.numpy(), :, :, 4:] |= 1  # no value on the palette: the move away from it
    flagged = poisoned.clone()
    flagged[clean] = True
    histograms = value_histograms(value_counts(images))
    out, info = readout.withdraw_against_value_move(histograms, labels, flagged, 4, qt.QTConfig())
    assert torch.equal(out, poisoned) and info["median_cosine"] > 0.9
    assert info["withdrawn_per_class"] == {"0": 3, "1": 3, "2": 3, "3": 3}
    out, info = readout.withdraw_against_value_move(histograms, labels, flagged, 4, qt.QTConfig(value_move_median=0.99))
    assert torch.equal(out, flagged) and "withdrawn_per_class" not in info
    assert readout.withdraw_against_value_move(histograms, labels, flagged, 4, qt.QTConfig(value_move_median=0.0)) \
        == (flagged, {})
    few = torch.zeros(400, dtype=torch.bool)
    few[clean[:9]] = True
    assert readout.withdraw_against_value_move(histograms, labels, few, 4, qt.QTConfig()) == (few, {})
    unmoved = torch.zeros(400, dtype=torch.bool)
    unmoved[torch.nonzero(~poisoned).flatten()[::10]] = True
    out, info = readout.withdraw_against_value_move(histograms, labels, unmoved, 4, qt.QTConfig())
    assert torch.equal(out, unmoved) and info["median_cosine"] < 0.35


def test_step_3_withdraws_flags_against_the_value_move_when_it_has_the_images():
    """The wiring in scan.read_out: the model flagged the 100 posterized images and the 12 off-palette clean ones;
    with the set's images the 12 are withdrawn, scored under the flags and recorded (the paper's variant with the
    rule on); without images, all 112 stay."""
    from qtclean.scan import read_out

    images, labels, _, poisoned = _posterized_set()
    clean = torch.nonzero(~poisoned).flatten()[::25][:12]
    images[clean.numpy(), :, :, 4:] |= 1
    flagged = poisoned.clone()
    flagged[clean] = True
    logits = torch.zeros(400, 8)
    logits[torch.arange(400), labels] = 5.0
    logits[flagged, labels[flagged] + 4] = 9.0
    cfg = qt.QTConfig.paper(value_move_median=0.35)
    extra: dict = {}
    scores, out = read_out(logits, labels, torch.zeros(400, dtype=torch.bool), [], cfg,
                           lambda: (torch.zeros(400, 3), 0.9), extra, images)
    assert torch.equal(out, poisoned) and sum(extra["value_move"]["withdrawn_per_class"].values()) == 12
    assert bool((scores[clean] <= 0.5).all()) and bool((scores[out] >= 0.5).all())
    _, out = read_out(logits, labels, torch.zeros(400, dtype=torch.bool), [], cfg, lambda: (torch.zeros(400, 3), 0.9),
                      {})
    assert torch.equal(out, flagged)


def test_images_framed_unlike_the_set_are_flagged_whatever_the_model_said():
    """Ten images of each class moved 3 pixels right in a set of centred objects: flagged with no flag to start
    from and beside flags elsewhere (kept), counted per class where added; off (0) or in a set framed one way
    throughout: the flags as they were, nothing recorded."""
    images, labels, moved = framed()
    labels, moved = torch.from_numpy(labels), torch.from_numpy(moved)
    none = torch.zeros(len(labels), dtype=torch.bool)
    out, info = readout.flag_out_of_frame(images, labels, none, qt.QTConfig())
    assert torch.equal(out, moved) and info["added_per_class"] == {"0": 10, "1": 10, "2": 10}
    assert info["offsets"] == [{"axis": "x", "from": 3, "images": 30}]
    elsewhere = none.clone()
    elsewhere[[20, 100]] = True  # a flag of the model's, not moved
    elsewhere[0] = True  # one moved image the model flagged already
    out, info = readout.flag_out_of_frame(images, labels, elsewhere, qt.QTConfig())
    assert torch.equal(out, moved | elsewhere) and info["added_per_class"] == {"0": 9, "1": 10, "2": 10}
    assert readout.flag_out_of_frame(images, labels, elsewhere, qt.QTConfig(out_of_frame_band=0)) == (elsewhere, {})
    unmoved = framed(moved_per_class=0)[0]
    out, info = readout.flag_out_of_frame(unmoved, labels, elsewhere, qt.QTConfig())
    assert torch.equal(out, elsewhere) and info == {}


def test_step_3_flags_images_framed_unlike_the_set_when_it_has_the_images():
    """The wiring in scan.read_out: a model that flagged nothing; with the set's images the 30 moved ones are
    flagged, scored as flags and recorded (the paper's variant with the rule on); without images, nothing."""
    from qtclean.scan import read_out

    images, labels, moved = framed()
    labels, moved = torch.from_numpy(labels), torch.from_numpy(moved)
    logits = torch.zeros(len(labels), 6)
    logits[torch.arange(len(labels)), labels] = 5.0
    cfg = qt.QTConfig.paper(out_of_frame_band=2)
    extra: dict = {}
    scores, out = read_out(logits, labels, torch.zeros(len(labels), dtype=torch.bool), [], cfg,
                           lambda: (torch.zeros(len(labels), 3), 0.9), extra, images)
    assert torch.equal(out, moved) and extra["out_of_frame"]["offsets"][0]["images"] == 30
    assert bool((scores[out] >= 0.5).all()) and bool((scores[~out] <= 0.5).all())
    _, out = read_out(logits, labels, torch.zeros(len(labels), dtype=torch.bool), [], cfg,
                      lambda: (torch.zeros(len(labels), 3), 0.9), {})
    assert not out.any()
