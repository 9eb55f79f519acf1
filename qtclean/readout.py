"""Step 3 of Quarantine Training: reading the quarantine model out into flags and scores.

N = number of samples, K = number of classes. The paper's read-out is one line (a sample predicted in its own
quarantine class, y + K, is flagged: :func:`qtclean.qt.is_quarantined`); the rules here check and complete it,
each measured on Fashion-MNIST and each with a ``QTConfig`` switch (off in the paper's variant; docs/benchmarks.md
has the ablation behind each):

- withdraw what does not look like a quarantine of poison: a class whose scores are a continuum
  (:func:`withdraw_ambiguous`), flags unlike an all-to-one target's beside it (:func:`withdraw_unlike_target`),
  a class whose flags lack the trigger the other targets' flags share (:func:`withdraw_off_trigger_classes`),
  flags without the trigger the other flags share (:func:`withdraw_trigger_free_flags`), and score a withdrawn
  class down unless something vouches for it (:func:`demote_withdrawn_scores`);
- complete a quarantine that stopped short: score outliers and own-looking samples of a flagged class
  (:func:`flag_score_outliers`, :func:`own_looking_by_score`), confident look-alikes
  (:func:`flag_confident_lookalikes`), the trigger's pixel residual in classes no seed reached and in a kept
  quarantine's class (:func:`flag_by_trigger_residual`, :func:`flag_residual_in_flagged_classes`,
  :func:`complete_residual_flags`), and a withdrawn class's content seed (:func:`widen_content_seed`,
  :func:`complete_content_fallback`);
- read the set's pixels exactly, for what a model's ranking cannot show: a block of pixels one class holds
  (:func:`flag_class_bound_blocks`), a block most flags share (:func:`flag_shared_blocks`), a block a large
  share of the whole set carries (:func:`flag_common_blocks`), the flags' move in
  pixel values (:func:`flag_value_residual`) and the flags moved against it
  (:func:`withdraw_against_value_move`), the images that skip the values the flags skip
  (:func:`flag_palette_holes`), images framed unlike the set (:func:`flag_out_of_frame`);
- score: flags first (0.5-1), then a class with flags before one without (:func:`flag_ranked_scores`); in a
  many-target attack, an unflagged sample also by its trigger residual (:func:`residual_ranks`).

The order they run in, and what each one is given, is :func:`qtclean.scan.read_out`. Pure tensor algorithm: no
files, no console. The pixel witnesses come from :mod:`qtclean.content`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .qt import (CONTENT_MIN_CLASS_SHARE, QTConfig, content_accepted, fewest_left_in_class, group_gap_direction,
                 is_many_target)

AMBIGUOUS_BAND = (0.3, 0.7)  # a final score (quarantine probability) in here is neither quarantined nor clean


def withdraw_ambiguous(scores: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       cfg: QTConfig, seeded_by_content: torch.Tensor | None = None,
                       flags_content: Callable[[int], dict | None] | None = None,
                       content_seed: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, dict]]:
    """The flags (N,) with those of every class whose quarantine is not separated from the rest of the class
    withdrawn, and per class with flags: its flagged count, ambiguous share and whether it was withdrawn.
    With ``seeded_by_content`` ((N,) bool, the samples :func:`content_seed` seeded, as :func:`widen_content_seed`
    widens them) and ``content_fallback``, a withdrawn class's flags are its members among them instead (their
    count: ``content_flagged``). With ``flags_content`` (a class -> the pixel content of its flags as a group,
    :func:`qtclean.content.group_content`, or None where pixels say nothing) and ``keep_relabelled_quarantine``,
    a class that has no such members keeps its flags when they pass the content seed's test
    (:func:`content_accepted`; the statistics: ``flags_look_relabelled``) and are at least
    ``CONTENT_MIN_CLASS_SHARE`` of the class (clean Fashion-MNIST's odd bags, 1-2 % of theirs, pass the test).

    A class's ambiguous share is the share of its samples whose score lies in ``AMBIGUOUS_BAND``. Why: a
    backdoor's quarantine holds samples that share a crisp feature, so its class splits into scores near 0 and
    near 1. A quarantine that grew into a clean class (an easy subgroup seeded by the pre-quarantine rule, then
    grown; measured on a 50k CIFAR-format BadNets scan: 3,122 bags, and on CIFAR-format WaNet: 1,450 trousers)
    has no such edge: its class is a continuum of scores. What a withdrawal does to the scores:
    :func:`demote_withdrawn_scores`.

    The content fallback: a content seed is evidence of its own, independent of the quarantine it started (a
    group whose pixels look like images of every other class; no clean group of 5 % of its class came near, 9
    clean sets), so where that quarantine did not separate, the seed is a better answer than nothing. Measured
    (20k, 10 %, withdrawn classes): adaptive-blend 0 -> 76 % of the poison found at 0.38 % FPR, a gamma-filter
    trigger 0 -> 77 % at 0.34 %; adding the class's scores above 0.7 to the seed cost FPR (3.3 % on a WaNet run).

    Why keep flags that look relabelled: the continuum can lie in the clean part of the target class alone (a
    faint blend that the model half-confuses with the class's own texture) while the quarantine holds the poison;
    its flags as a group then carry the signature of an all-to-one attack, which a quarantine grown into a clean
    class cannot (its pixel neighbours are its own class). Measured (20k, held-out stripes, loss-seeded, no content
    seed): 0 flagged -> 99.2 % at 0.63 % FPR. Where the class has content-seed members, they stay the answer:
    they pick samples, the group test only the class (adaptive-blend kept whole: 95.7 -> 93.7 %).

    With ``content_seed`` ((N,) bool, the samples :func:`content_seed` seeded, before widening) and
    ``content_fallback``, a class whose flags hold less than ``content_seed_min_held`` of its seed is withdrawn
    too, flags or none, to fall back to that seed (its share: ``content_seed_held``). Why: the seed is
    independent evidence (relabelled content), and the quarantine's last epoch can end crisp yet beside it: a
    held-out invisible frequency trigger's quarantine held 1,600-2,300 of class 0 through its epochs and 38 at
    the last, scored near 0 (AUROC 0.32, nothing ambiguous); the quarantines of the blends, WaNet, ISSBA and a
    frame held 0.87-1.00 of theirs (every saved run, 20k). A low rate's seed is impure (BadNets at 0.5 %: 173
    pixel outliers for 100 poisoned samples), and a quarantine that holds its poison holds about that share of
    it (46 %); the collapsed ones held 1-9 %.

    A class is withdrawn too when its flags leave fewer than ``min_class_remainder`` times the median class size
    unflagged in it (``unflagged_left``): the quarantine took the class itself. Why: an attack adds its poison to
    its target and leaves the target's own samples there, so its flags leave about a class's worth (measured,
    20k, all-to-one: 1.04-1.53 times the median, BadNets 10-30 %) whatever the number of classes; a loss seed of
    a clean, easy class can grow over it until only the release rule's lower split is left (grid and ramp
    all-to-all, scan seed 1: the sandals and sneakers, 0.09-0.10, FPR 12.8 and 20.6 %). A group test that
    passes keeps such a class too: a small class targeted by an all-to-one attack.
    """
    lo, hi = AMBIGUOUS_BAND
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1)
    ambiguous = torch.bincount(labels[(scores > lo) & (scores < hi)], minlength=num_classes) / counts
    per_class_flags = torch.bincount(labels[flagged], minlength=num_classes)
    withdraw = (ambiguous > cfg.max_ambiguous_share) & (per_class_flags > 0)
    whole = (per_class_flags > 0) & (counts - per_class_flags < fewest_left_in_class(labels, num_classes, cfg))
    withdraw |= whole
    info = {c: {"flagged": int(per_class_flags[c]), "ambiguous_share": round(float(ambiguous[c]), 4),
                "withdrawn": bool(withdraw[c])}
            for c in torch.nonzero(per_class_flags).flatten().tolist()}
    for c in torch.nonzero(whole).flatten().tolist():
        info[c]["unflagged_left"] = int(counts[c] - per_class_flags[c])
    if content_seed is not None and cfg.content_seed_min_held > 0 and cfg.content_fallback:  # withdrawn for it
        seed_counts = torch.bincount(labels[content_seed], minlength=num_classes)
        held = torch.bincount(labels[content_seed & flagged], minlength=num_classes) / seed_counts.clamp(min=1)
        lost = (seed_counts > 0) & (held < cfg.content_seed_min_held)
        withdraw |= lost
        for c in torch.nonzero(lost).flatten().tolist():
            info.setdefault(c, {"flagged": int(per_class_flags[c]), "ambiguous_share": round(float(ambiguous[c]), 4)})
            info[c].update(withdrawn=True, content_seed=int(seed_counts[c]), content_seed_held=round(float(held[c]), 4))
    falls_back = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
    if seeded_by_content is not None and cfg.content_fallback:
        falls_back = torch.bincount(labels[seeded_by_content], minlength=num_classes) > 0
    if flags_content is not None and cfg.keep_relabelled_quarantine:
        large = per_class_flags >= CONTENT_MIN_CLASS_SHARE * counts  # a few odd images prove nothing
        for c in torch.nonzero(withdraw & ~falls_back & large).flatten().tolist():
            stats = flags_content(c)
            if stats is not None and content_accepted(stats, cfg):  # its flags: relabelled from every other class
                withdraw[c] = False
                info[c].update(withdrawn=False, flags_look_relabelled=stats)
    kept = flagged & ~withdraw[labels]
    if seeded_by_content is not None and cfg.content_fallback:
        instead = seeded_by_content & withdraw[labels]
        kept = kept | instead
        content_counts = torch.bincount(labels[instead], minlength=num_classes)
        for c, v in info.items():
            if v["withdrawn"]:
                v["content_flagged"] = int(content_counts[c])
    return kept, info


def withdraw_unlike_target(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                           info: dict[int, dict], num_classes: int, cfg: QTConfig,
                           baseline: float) -> torch.Tensor:
    """The flags (N,) with those of every class whose flags do not look like relabelled images withdrawn, when
    another class's flags do. Each class with flags gets ``info[c]["content"]`` (:func:`qtclean.content.group_content`
    of its flagged members: agreement, diversity), and a class withdrawn here gets ``withdrawn`` and
    ``unlike_target`` (the classes whose flags passed :func:`content_accepted`).

    Why: an all-to-one attack relabels images of every other class into its target, so the target's flags are
    images whose pixel neighbours carry other labels, spread over every class (measured, 20k: the poison of every
    lab and held-out all-to-one trigger, agreement 0.02-0.04, diversity 0.99-1.00; the target's flags in the
    runs below, 0.01-0.08 and 0.96-1.00, except a partial adaptive-patch quarantine, 0.12 and 0.66). A clean class's
    quarantine beside it is a part of that class, whose neighbours outside the group are its own class or one
    neighbour class (measured, GPU: 982 bags beside stripes' target, diversity 0.34, kept at 6 % ambiguous, FPR
    5.6 %; sneakers beside adaptive-blend's, 0.36-0.38; trousers beside a roaming patch's, 0.22). Why only
    beside an accepted class: the same signature is what an all-to-all or single-source attack's poison has
    (badnets-a2a: diversity 0.19-0.87), so on its own it proves nothing. Nothing changes where pixel neighbours
    carry little about labels (``baseline`` under ``content_min_baseline``: natural photos), with one class
    flagged, or with at least ``MANY_TARGET_CLASS_SHARE`` of the classes flagged: that is a many-target
    attack, each target's poison relabelled from its own source class, where one class's flags can pass the test
    by chance and would withdraw every other target's (measured: a frame trigger all-to-all, the ankle boots'
    flags at diversity 0.929, 99.9 % found -> 10.8 % with the bar at 0.9).
    """
    from .content import group_content

    classes = torch.unique(labels[flagged]).tolist()
    if (not cfg.withdraw_unlike_target or baseline < cfg.content_min_baseline or len(classes) < 2
            or is_many_target(len(classes), num_classes)):
        return flagged
    for c in classes:
        members = torch.nonzero(flagged & (labels == c)).flatten()
        info.setdefault(c, {"flagged": int(members.numel()), "withdrawn": False})["content"] = group_content(
            embedding, labels, members, c, num_classes)
    targets = [c for c in classes if content_accepted(info[c]["content"], cfg)]
    if not targets:
        return flagged
    out = flagged.clone()
    for c in classes:
        if c not in targets:
            out[labels == c] = False
            info[c].update(withdrawn=True, unlike_target=targets)
    return out


OFF_TRIGGER_CARRY_QUANTILE = 0.99  # of a class's unflagged members: its flags' median past this carries the trigger


def withdraw_off_trigger_classes(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                                 info: dict[int, dict], num_classes: int, cfg: QTConfig,
                                 baseline: float) -> torch.Tensor:
    """The flags (N,) with those of every class withdrawn whose flags carry the trigger no more than the rest of
    their class does, in a many-target attack (at least ``MANY_TARGET_CLASS_SHARE`` of the classes flagged) where
    most flagged classes' flags carry it. Per flagged class, the trigger is what the other flagged classes' flags
    show (the mean of their unit mean residuals, as :func:`_trigger_cosine` estimates it; written out here so that
    each class's residuals are computed once, for the estimate and the test); its flags carry it when their median
    cosine passes the ``OFF_TRIGGER_CARRY_QUANTILE`` of its unflagged members', and carry it no more than the rest
    of the class when their median is at most the unflagged members' median. A class withdrawn here gets
    ``info[c]["off_trigger"]`` (the classes whose flags carry the trigger). Nothing where the option is off, pixel
    neighbours say little about labels (``baseline`` under ``content_min_baseline``), or fewer than three classes
    hold flags.

    Why: in a many-target attack a quarantine can take a group of clean images instead of its class's poison (a
    faint grid all-to-all, scan seed 2: 459 coats, 3 poisoned, 10 % of the class ambiguous, under the ambiguity
    rule's bar). Its flags look like relabelled images as poison does (coats look like pullovers), so no rule on
    their look can judge them, but they lack the trigger: their residuals' direction had cosine 0.05 with the other
    six classes' (those 0.72-0.93 with theirs). Kept, they pull the trigger's estimate away for the rules after
    this one, and their class counts as flagged, so the trigger residual never looks for its poison (184 coats).
    Withdrawn, the trigger residual finds it and the rest: 63.3 -> 98.9 %, FPR 4.03 -> 0.96 % (1.20 % if the
    withdrawn quarantine's ranking then completed the residual's flags there, as :func:`complete_residual_flags`
    does for a withdrawn class: it ranks clean coats first; ``qtclean.scan.read_out`` leaves such a class out of
    it). Why both tests: a trigger that moves or depends on the image (a roaming or dim patch, a DCT pattern)
    leaves every class's flags near their unflagged members' direction, and there the flags of one class or
    another fall under their members' median by chance (the median test alone picks a class in 8 of the other 38
    saved all-to-all runs; replayed, a roaming patch 100 -> 77 % found, a dim patch 99.9 -> 90.8 %); no class's
    flags carry the trigger there, so the first test keeps the rule out. Replayed on 39 saved all-to-all runs:
    the grid above changes, nothing else.
    :func:`withdraw_unlike_target` is its counterpart for an attack with one target. docs/benchmarks.md, "A
    quarantine without the trigger the other targets share".
    """
    from .content import cosine_with, mean_direction, pixel_residuals

    if not cfg.withdraw_off_trigger or baseline < cfg.content_min_baseline:
        return flagged
    device = flagged.device
    embedding, labels, cpu_flagged = embedding.cpu(), labels.cpu(), flagged.cpu()
    counts = torch.bincount(labels[cpu_flagged], minlength=num_classes)
    classes = torch.nonzero(counts).flatten().tolist()
    if len(classes) < 3 or not is_many_target(len(classes), num_classes):
        return flagged
    residuals, directions = {}, {}
    for c in classes:  # each class's members once: its flags give its part of the trigger, all of it the test
        members = torch.nonzero(labels == c).flatten()
        residuals[c] = (cpu_flagged[members], pixel_residuals(embedding, labels, members, cpu_flagged))
        directions[c] = mean_direction(residuals[c][1][residuals[c][0]])
    carrying, off = [], []
    for c in classes:
        is_flag, residual = residuals[c]
        if bool(is_flag.all()):  # no unflagged member to compare with
            continue
        others = mean_direction(torch.stack([directions[o] for o in classes if o != c]))
        cosines = cosine_with(residual, others).double()
        flags_median, rest = float(cosines[is_flag].median()), cosines[~is_flag]
        if flags_median > float(torch.quantile(rest, OFF_TRIGGER_CARRY_QUANTILE)):
            carrying.append(c)
        elif flags_median <= float(rest.median()):
            off.append(c)
    if not off or 2 * len(carrying) <= len(classes):  # the flags share no trigger to judge a class by
        return flagged
    out = cpu_flagged.clone()
    for c in off:
        out[labels == c] = False
        info.setdefault(c, {"flagged": int(counts[c]), "withdrawn": False}).update(withdrawn=True,
                                                                                    off_trigger=carrying)
    return out.to(device)


def demote_withdrawn_scores(scores: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor,
                            info: dict[int, dict], content_seeded: torch.Tensor, scale: float) -> torch.Tensor:
    """The scores (N,) with those of the unflagged samples of every withdrawn class (``info``, from
    :func:`withdraw_ambiguous`, :func:`withdraw_unlike_target` and :func:`withdraw_off_trigger_classes`) that
    nothing vouches for multiplied by ``scale`` (the order within the class stays); such a class gets
    ``info[c]["scores_scaled"] = True``. Nothing vouches for a withdrawn class when the content seed did not seed
    it (``content_seeded``, (K,) bool) and the final ``flagged`` lie in other classes.

    Why: a withdrawn quarantine is one the scan does not believe, yet its samples keep quarantine probabilities
    near 1, above part of the poison of a quarantine that stood, so a user who ranks by score (and AUROC) reads
    the false alarm first. Measured (GPU, 20k, four scan seeds): clean trousers quarantined and withdrawn beside
    a target class whose flags stood held AUROC at 0.952-0.981 in runs whose flags met the goal (ISSBA 0.988 ->
    0.9999, a roaming patch 0.977 -> 1.0 with ``scale`` 0.5). Why only then: a withdrawn class that is the only
    one with flags, or that the content seed found relabelled images in, is more likely the target itself (a
    quarantine that held its trigger but grew into clean samples), and there its highest scores are still mostly
    poison (demoting every withdrawn class cost adaptive-patch 0.849 -> 0.698 and the clean-label BadNets runs
    0.74-0.91 -> 0.49-0.81).
    """
    elsewhere = torch.bincount(labels[flagged], minlength=content_seeded.numel())
    elsewhere = elsewhere.sum() - elsewhere  # per class: final flags in the other classes
    for c, v in info.items():
        if v["withdrawn"]:
            v["scores_scaled"] = bool(not content_seeded[c] and elsewhere[c] > 0 and scale != 1.0)
    demoted = torch.zeros(content_seeded.numel(), dtype=torch.bool, device=labels.device)
    demoted[[c for c, v in info.items() if v.get("scores_scaled")]] = True
    demote = demoted[labels] & ~flagged
    return torch.where(demote, scores * scale, scores)


SCORE_OUTLIER_MIN_REFERENCE = 500  # samples in classes without flags: fewer, and their tail says little
SCORE_OUTLIER_MAX_OWN_SHARE = 0.5  # an added sample's pixel neighbours outside the flags: at most this share its label


def _looks_relabelled(embedding: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor,
                      flagged: torch.Tensor) -> torch.Tensor:
    """(M,) bool: which of ``candidates`` (M,) indices look like images of other classes, the pixel test of the
    score rules: their 10 nearest pixel neighbours outside the flags (``flagged``, (N,) bool) carry their label at
    most ``SCORE_OUTLIER_MAX_OWN_SHARE`` of the time. CPU tensors."""
    from .content import own_label_share_outside

    return own_label_share_outside(embedding.cpu(), labels, candidates, flagged) <= SCORE_OUTLIER_MAX_OWN_SHARE


def robust_class_z(scores: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                   num_classes: int) -> torch.Tensor:
    """(N,) each score's log-odds, centred on its class's unflagged median and divided by their spread (1.4826 x
    the median absolute deviation: a standard deviation for normal data, unmoved by the flagged tail)."""
    p = scores.double().clamp(1e-6, 1 - 1e-6)
    odds = (p / (1 - p)).log()
    z = torch.zeros_like(odds)
    for c in range(num_classes):
        in_class = labels == c
        rest = odds[in_class & ~flagged]
        if rest.numel() == 0:
            continue
        median = rest.median()
        spread = 1.4826 * (rest - median).abs().median() + 1e-9
        z[in_class] = (odds[in_class] - median) / spread
    return z


def _class_z_against_reference(scores: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor, num_classes: int,
                               cfg: QTConfig, baseline: float,
                               enabled: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """What the two score rules of step 3 measure against (CPU tensors in, CPU tensors out): the classes with
    flags ((K,) bool), each sample's :func:`robust_class_z` and the samples of the classes without flags ((N,)
    bool), whose z says how far a clean score strays by chance. None where the rule is not ``enabled`` or that
    says too little: no flags, fewer than ``SCORE_OUTLIER_MIN_REFERENCE`` samples in classes without flags, flags
    in ``MANY_TARGET_CLASS_SHARE`` of the classes or more, or pixel neighbours that say little about labels
    (``baseline`` under ``content_min_baseline``: the rules' pixel tests would mean nothing).

    Why not in a many-target attack: its classes without flags are the few that no seed reached, which hold poison
    of their own, so their z is no measure of a clean score's chance spread (bar z 1.45-1.79 against 2.1-2.6 in
    all-to-one runs), and a quarantine that took clean samples of a target is then the norm, not the exception.
    Measured (20k, all-to-all, three held-out triggers at scan seed 2 with the second pass after the residual):
    the two rules added 95-270 flags, 85-100 % of them clean (FPR 0.26-0.77 % without them, 1.27-1.86 % with)."""
    flagged_classes = torch.zeros(num_classes, dtype=torch.bool)
    flagged_classes[torch.unique(labels[flagged])] = True
    reference = ~flagged_classes[labels]
    if (not enabled or not bool(flagged.any()) or baseline < cfg.content_min_baseline
            or int(reference.sum()) < SCORE_OUTLIER_MIN_REFERENCE
            or is_many_target(flagged_classes, num_classes)):
        return None
    return flagged_classes, robust_class_z(scores, labels, flagged, num_classes), reference


def flag_score_outliers(scores: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        embedding: torch.Tensor, cfg: QTConfig, baseline: float) -> tuple[torch.Tensor, dict]:
    """The flags (N,) with, in each class that has flags, the unflagged samples whose score stands out from their
    class (:func:`robust_class_z`) beyond the ``score_outlier_quantile`` of the same measure over the classes
    without flags, and whose pixel neighbours outside the flags (``embedding``) carry their label at most
    ``SCORE_OUTLIER_MAX_OWN_SHARE`` of the time; and what it did (threshold, per class added), for run.json.

    Why: a quarantine that learned its trigger on most of its poison leaves the rest of it with raised scores
    (quarantine probability 0.1-0.4 against 0.04-0.16 for the class's clean samples: WaNet, ISSBA, IAB, a
    scattered-pixels trigger, BadNets at 0.5 %), below the flag. The classes without flags show how far a clean
    sample's score strays from its class by chance, so the threshold comes from the data rather than a fixed
    z. The pixel test keeps the class's own odd images out (about half of the candidates in runs whose poison
    was all found already). Nothing changes without flags, with fewer than ``SCORE_OUTLIER_MIN_REFERENCE``
    samples in classes without flags (all-to-all: every class is flagged), or where pixel neighbours say little
    about labels (``baseline`` under ``content_min_baseline``). The scores stay as they are.
    """
    info: dict = {}
    device = flagged.device
    scores, flagged, labels = scores.cpu(), flagged.cpu(), labels.cpu()
    against = _class_z_against_reference(scores, flagged, labels, num_classes, cfg, baseline,
                                         enabled=cfg.score_outlier_quantile > 0)
    if against is None:
        return flagged.to(device), info
    flagged_classes, z, reference = against
    threshold = float(torch.quantile(z[reference], cfg.score_outlier_quantile))
    candidates = torch.nonzero(flagged_classes[labels] & ~flagged & (z > threshold)).flatten()
    info["threshold_z"] = round(threshold, 3)
    candidates = candidates[_looks_relabelled(embedding, labels, candidates, flagged)]
    out = flagged.clone()
    out[candidates] = True
    added = torch.bincount(labels[candidates], minlength=num_classes)
    info["added_per_class"] = {str(c): int(added[c]) for c in torch.nonzero(flagged_classes).flatten().tolist()}
    return out.to(device), info


OWN_LOOKING_REFERENCE_QUANTILE = 0.99  # how far a clean score of a class without flags strays by chance


def own_looking_by_score(scores: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         embedding: torch.Tensor, cfg: QTConfig, baseline: float,
                         withdrawn: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The flags (N,) with, in each class whose quarantine stood (flags, not ``withdrawn``, (K,) bool), the samples
    that look like images of their own class (pixel neighbours outside the flags, ``embedding``, carry their label
    more than ``SCORE_OUTLIER_MAX_OWN_SHARE`` of the time) decided by their score alone: flagged where it stands out
    from their class's unflagged samples (:func:`robust_class_z`) by more than ``own_looking_flag_z`` times the
    ``OWN_LOOKING_REFERENCE_QUANTILE`` of the same measure over the classes without flags, unflagged where it does
    not; and what it did (threshold, per class withdrawn and added), for run.json.

    Why: pixels cannot tell a clean image of the class from poison that happens to look like its target (a shirt
    relabelled T-shirt), so for those the score must. A quarantine that grew into clean samples of its own class
    holds them at scores their class's clean samples reach (WaNet draw 4, CPU: 107 of the target's 141 flags that
    look like T-shirts are clean, z 2.3-3.7, 10th-90th percentile, against a reference of 2.47; FPR 1.15 %),
    while poison that looks like its target keeps a score far above its class, flagged or not (IAB: 116 such
    flags, z 5.6-10.1; BadNets and every patch trigger: over 10). Twice the reference splits them: at 3x IAB lost
    71 of its poison, at 1x WaNet kept 75 of those clean flags. :func:`flag_score_outliers` adds the raised
    samples that look relabelled above the reference itself; this adds those that do not, above twice it. Only where the
    quarantine stood: in a withdrawn class the scores did not separate (adaptive-blend's content-flagged class
    would gain 60 clean samples). Nothing changes without flags, with fewer than ``SCORE_OUTLIER_MIN_REFERENCE``
    samples in classes without flags, or where pixel neighbours say little about labels (``baseline`` under
    ``content_min_baseline``). The scores stay as they are.
    """
    info: dict = {}
    device = flagged.device
    scores, flagged, labels = scores.cpu(), flagged.cpu(), labels.cpu()
    against = _class_z_against_reference(scores, flagged, labels, num_classes, cfg, baseline,
                                         enabled=cfg.own_looking_flag_z > 0)
    if against is None:
        return flagged.to(device), info
    flagged_classes, z, reference = against
    stood = flagged_classes & ~(withdrawn.cpu() if withdrawn is not None else torch.zeros_like(flagged_classes))
    threshold = cfg.own_looking_flag_z * float(torch.quantile(z[reference], OWN_LOOKING_REFERENCE_QUANTILE))
    # the samples to decide: every flag of a class that stood, and its unflagged samples above the threshold
    candidates = torch.nonzero(stood[labels] & (flagged | (z > threshold))).flatten()
    decided = candidates[~_looks_relabelled(embedding, labels, candidates, flagged)]
    out = flagged.clone()
    out[decided] = z[decided] > threshold
    info["threshold_z"] = round(threshold, 3)
    gone = torch.bincount(labels[flagged & ~out], minlength=num_classes)
    added = torch.bincount(labels[out & ~flagged], minlength=num_classes)
    classes = torch.nonzero(stood).flatten().tolist()
    info["withdrawn_per_class"] = {str(c): int(gone[c]) for c in classes}
    info["added_per_class"] = {str(c): int(added[c]) for c in classes}
    return out.to(device), info


def _trigger_cosine(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                    flagged_classes: torch.Tensor, estimate_from: torch.Tensor | None = None,
                    not_lookalike: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The trigger as the flags (``estimate_from``, (N,) bool; default ``flagged``) of ``flagged_classes`` ((K,)
    bool) estimate it, as a function: indices (Q,) -> the cosine (Q,) of each sample's pixel residual
    (:func:`qtclean.content.pixel_residuals`, look-alikes outside ``not_lookalike``, (N,) bool; default
    ``flagged``) with the trigger's direction (the mean over flagged classes of their flags' mean residual, each
    scaled to length 1, so a large class does not outweigh the rest). CPU tensors."""
    from .content import cosine_with, mean_direction, pixel_residuals

    estimate_from = flagged if estimate_from is None else estimate_from
    not_lookalike = flagged if not_lookalike is None else not_lookalike
    directions = []
    for c in torch.nonzero(flagged_classes).flatten().tolist():
        members = torch.nonzero(estimate_from & (labels == c)).flatten()
        if members.numel() == 0:
            continue
        directions.append(mean_direction(pixel_residuals(embedding, labels, members, not_lookalike)))
    direction = mean_direction(torch.stack(directions))

    def cosine(queries: torch.Tensor) -> torch.Tensor:
        return cosine_with(pixel_residuals(embedding, labels, queries, not_lookalike), direction)

    return cosine


def _score_past_bar(cosines: torch.Tensor, bar: float) -> torch.Tensor:
    """The score of a flag a trigger-residual rule adds: 0.5 at the bar, rising with the cosine to 1 at 1, the
    scale of a quarantine flag (its quarantine probability, at the clean level, would rank it after clean flags)."""
    return 0.5 + 0.5 * (cosines - bar) / max(1.0 - bar, 1e-12)


def _large_trigger_carriers(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                            flagged_classes: torch.Tensor, quantile: float) -> torch.Tensor:
    """(N,) bool: the samples of the classes without flags that lie further along the flags' plain direction
    (:func:`group_gap_direction`) from their class's median than ``quantile`` of the flagged classes' unflagged
    samples lies from theirs: images that carry a large trigger themselves. Each class from its own median: a
    class whose own look lies that way carries no trigger for it."""
    carriers = torch.zeros_like(flagged)
    direction = group_gap_direction(embedding, labels, flagged, flagged_classes)
    if direction is None:
        return carriers
    reference = ~flagged & flagged_classes[labels]
    along = (embedding @ direction).double()
    bar = torch.quantile(along[reference], quantile) - along[reference].median()
    for c in torch.nonzero(~flagged_classes).flatten().tolist():
        members = torch.nonzero(labels == c).flatten()
        if members.numel():
            carriers[members[along[members] - along[members].median() > bar]] = True
    return carriers


def _many_target_trigger_cosine(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                                flagged_classes: torch.Tensor,
                                cfg: QTConfig) -> tuple[Callable[[torch.Tensor], torch.Tensor], int | None]:
    """:func:`_trigger_cosine` with the look-alikes a many-target attack needs: outside the flags and, with
    ``residual_untriggered_lookalikes`` (and the many-target rule on: its quantile is their bar), outside the images
    that carry a large trigger themselves (:func:`_large_trigger_carriers`); also how many of those were left out
    (None where none were looked for)."""
    not_lookalike, left_out = flagged, None
    if cfg.residual_untriggered_lookalikes and cfg.trigger_residual_quantile > 0:
        carriers = _large_trigger_carriers(embedding, labels, flagged, flagged_classes, cfg.trigger_residual_quantile)
        not_lookalike, left_out = flagged | carriers, int(carriers.sum())
    return _trigger_cosine(embedding, labels, flagged, flagged_classes, not_lookalike=not_lookalike), left_out


TRIGGER_FREE_MIN_OWN_SHARE = 0.3  # a flag whose pixel neighbours outside the flags carry its label more than this
TRIGGER_FREE_RELABELLED_QUANTILE = 0.25  # ... and the bar for a flag that looks relabelled: poison looks so too


def withdraw_trigger_free_flags(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                                num_classes: int, cfg: QTConfig, baseline: float,
                                label_probability: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The flags (N,) without, in an attack whose flags carry the trigger in their pixels (with
    ``trigger_free_any_target`` off: only a many-target one, at least ``MANY_TARGET_CLASS_SHARE`` of the classes
    flagged), those that look like images of their own class (their pixel neighbours outside the flags carry their
    label more than ``TRIGGER_FREE_MIN_OWN_SHARE`` of the time) and whose pixel residual points the trigger's way
    (:func:`_trigger_cosine`) less than the ``trigger_free_quantile`` of the flagged classes' unflagged samples
    does, and those that look relabelled whose residual points that way less than
    ``TRIGGER_FREE_RELABELLED_QUANTILE`` of them does (away from the trigger, more than most clean images), and,
    given ``label_probability`` and a ``trigger_free_confidence_quantile``, those that look relabelled, point that
    way less than the first bar and whose label the model holds less surely than that quantile of the flags over
    it; and what it did, for run.json. The flags carry the trigger when their median cosine is above the first
    bar: not so for a trigger that moves (a roaming patch) or that depends on the image (a gamma filter), whose
    flags are left as they are. Nothing either where pixel neighbours say little about labels (``baseline`` under
    ``content_min_baseline``), the quantile is 0, or the flagged classes have no unflagged sample.

    Why: in a many-target attack the quarantines of easy classes grow into their clean samples (trousers beside
    their poison), and the own-looking rule (:func:`own_looking_by_score`) cannot judge them there, having no clean
    classes to set its bar by. A relabelled image looks like its source class and, minus that content, leaves the
    trigger; a clean sample the quarantine took looks like its own class and leaves none. A flag that looks
    relabelled must point away from the trigger to go, since a faint trigger's poison may leave little of it
    (a ramp: 41 poisoned among the 99 such flags under the first bar). Measured (20k,
    all-to-all, faint triggers, CPU, 12 runs replayed): FPR 1.57 -> 0.71 % and 1.52 -> 0.63 % where it was over
    1 %, less elsewhere, at the cost of at most four poisoned images a run (a faint ramp's, the trigger whose
    residual separates least); docs/benchmarks.md, "Flags without the trigger in a many-target attack".

    Why in an all-to-one attack too (``trigger_free_any_target``): its target's quarantine grows into clean images
    of the target as well (blend-image in CIFAR format: 413 clean T-shirts beside the 2,000 poisoned), and the
    own-looking rule keeps those whose score stands out, as such a quarantine's do. Measured (20k, the 189 saved
    one-target runs read out again): 94 change, every one with less FPR (median 0.04 % less; blend-image in CIFAR
    format 2.29 -> 1.16 % and 1.57 -> 0.71 %, the held-out stripes 0.99 -> 0.39 %), one run meets the goal that
    missed it and none stops meeting it; poison lost: IAB at 28x28 about 50 images a run (98.5-99.5 -> 96.0-96.8
    %: an input-aware trigger leaves some images little of it), up to 22 elsewhere (clean-label BadNets), one of
    BadNets at 0.5 %'s 100; docs/benchmarks.md, "Flags without the trigger in an all-to-one quarantine".

    Why the model's word on a flag that looks relabelled (``trigger_free_confidence_quantile``, with
    ``label_probability``, (N,): :func:`label_probability`): such a flag goes on its pixels only when it points
    away from the trigger, since a faint trigger's poison may carry it weakly; between the two bars it stays, and
    so did 206 clean T-shirts that look like other classes in blend-image's CIFAR-format run at seed 1 (1.16 %
    FPR). Poison is held in its class by the trigger the model learned: there the flags that carry the trigger
    have their label at 0.984 of probability or more (their 1 % quantile, the bar), and so has most poison under
    the pixel bar; a clean image that looks like another class often has less. Measured (the 189 one-target
    and 44 all-to-all saved runs read out again): 89 change, none with more FPR (median 0.025 % less among the
    one-target ones); that run 1.16 -> 0.49 %, inside the goal, and none leaves it; poison lost: up to 1.2 % of a
    run's (IAB in CIFAR format 98.0-98.7 -> 96.9-97.8 %, clean-label BadNets 99.9-100 -> 99.1-99.2 %).
    """
    from .content import own_label_share_outside

    info: dict = {}
    if cfg.trigger_free_quantile <= 0 or baseline < cfg.content_min_baseline:
        return flagged, info
    device = flagged.device
    embedding, labels, flagged = embedding.cpu(), labels.cpu(), flagged.cpu()
    flagged_classes = torch.bincount(labels[flagged], minlength=num_classes) > 0
    reference = torch.nonzero(~flagged & flagged_classes[labels]).flatten()
    if not (cfg.trigger_free_any_target or is_many_target(flagged_classes, num_classes)) or reference.numel() == 0:
        return flagged.to(device), info
    flags = torch.nonzero(flagged).flatten()
    own_looking = torch.zeros_like(flagged)
    own_looking[flags] = own_label_share_outside(embedding, labels, flags, flagged) > TRIGGER_FREE_MIN_OWN_SHARE
    if bool(own_looking[flags].all()):  # no flag looks relabelled: no trigger to estimate
        return flagged.to(device), info
    # the trigger as the flags that look relabelled show it: a class's clean flags would pull its part of the
    # direction towards their own residual (measured on synthetic data: a quarter of them then stayed)
    cosine = _trigger_cosine(embedding, labels, flagged, flagged_classes, estimate_from=flagged & ~own_looking)
    reference_cosine = cosine(reference)
    bar = float(torch.quantile(reference_cosine, cfg.trigger_free_quantile))
    relabelled_bar = float(torch.quantile(reference_cosine, min(TRIGGER_FREE_RELABELLED_QUANTILE,
                                                                cfg.trigger_free_quantile)))
    flag_cosine = cosine(flags)
    info["bar_cosine"] = round(bar, 4)
    info["relabelled_bar_cosine"] = round(relabelled_bar, 4)
    info["flags_median_cosine"] = round(float(flag_cosine.median()), 4)
    if float(flag_cosine.median()) <= bar:  # the flags do not share a trigger in their pixels: nothing to judge by
        return flagged.to(device), info
    without_trigger = flag_cosine < bar
    gone_mask = (without_trigger & own_looking[flags]) | (flag_cosine < relabelled_bar)
    if cfg.trigger_free_confidence_quantile > 0 and label_probability is not None:
        # the model's second word on a flag that looks relabelled: poison is held by its learned trigger, as sure
        # of its label as the flags that carry the trigger; a clean image that looks like another class is not
        probability = label_probability.cpu().double()[flags]
        confidence_bar = float(torch.quantile(probability[~without_trigger], cfg.trigger_free_confidence_quantile))
        info["confidence_bar"] = round(confidence_bar, 4)
        gone_mask |= without_trigger & (probability < confidence_bar)
    gone = flags[gone_mask]
    out = flagged.clone()
    out[gone] = False
    counts = torch.bincount(labels[gone], minlength=num_classes)
    info["withdrawn_per_class"] = {str(c): int(counts[c]) for c in torch.nonzero(flagged_classes).flatten().tolist()}
    return out.to(device), info


def flag_by_trigger_residual(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                             num_classes: int, cfg: QTConfig, baseline: float,
                             quarantined_classes: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The flags (N,) with, in a many-target attack (at least ``MANY_TARGET_CLASS_SHARE`` of the classes flagged,
    not all; with ``residual_by_quarantined_classes``, of the classes flagged or in ``quarantined_classes``, (K,)
    bool: those the quarantine flagged before step 3 withdrew any, less those it judged false quarantines), the
    members of each class without flags whose pixel residual (:func:`qtclean.content.pixel_residuals`) points the
    way the flagged classes' residuals do: their cosine with the trigger's direction (the mean over flagged classes
    of their flags' mean residual, each scaled to length 1) above the ``trigger_residual_quantile`` of the unflagged
    samples of the flagged classes; the score (N,) each added flag earns, 0 elsewhere; and what it did, for
    run.json (``attacked_classes``: the classes counted toward that half). Nothing where pixel neighbours say
    little about labels (``baseline`` under ``content_min_baseline``), the quantile is 0, or the flagged classes
    have no unflagged sample.

    Why: in an all-to-all attack a class whose own early losses and features hide the trigger gets no seed, and
    its poison is missed whole (held-out pixels, stripes, a ramp and a grid blend: 49.6-79.5 % found). The
    trigger is the same in every class: a flagged image minus the typical images of the class it looks like is
    the trigger, whatever its source class, so the flags that were found estimate it without the truth. In a
    class without flags its poison lines up with that direction and its clean images do not (AUROC within such
    a class: 0.993-1.000 for BadNets' patch, four scattered pixels, faint stripes and a faint grid, 0.925-1.000
    for a faint ramp; a gamma filter, whose change depends on the image, 0.65-0.74). The reference is what the
    flagged classes left unflagged: clean images, as the rest of step 3 decided. docs/benchmarks.md, "Trigger
    residual".

    The look-alikes leave out the images of the classes without flags that carry a large trigger themselves
    (``residual_untriggered_lookalikes``, :func:`_large_trigger_carriers`; run.json's ``lookalikes_left_out`` counts
    them): a trigger larger than the differences between classes (a white frame round the image) makes the poison of
    those classes each other's nearest images, and one framed image minus another leaves no frame (held-out frame,
    all-to-all, scan seed 0: 3 of their 607 poisoned images found, 69.5 % of all; with it 99.7 %). A faint trigger
    moves its images too little for that, and its look-alikes stay as they were. docs/benchmarks.md, "Look-alikes
    without the trigger".

    The score: 0.5 at the bar, rising with the cosine to 1, the scale of a quarantine flag. These samples' quarantine
    probability is at the clean level (no quarantine learned their class), so a user who ranks by score, and AUROC,
    read them after the clean samples the quarantines took. docs/benchmarks.md, "Scores of the trigger residual's
    flags".
    """
    info: dict = {}
    no_scores = torch.zeros(flagged.shape, device=flagged.device)
    if cfg.trigger_residual_quantile <= 0 or baseline < cfg.content_min_baseline:
        return flagged, no_scores, info
    device = flagged.device
    embedding, labels, flagged = embedding.cpu(), labels.cpu(), flagged.cpu()
    per_class = torch.bincount(labels[flagged], minlength=num_classes)
    flagged_classes = per_class > 0
    attacked = flagged_classes  # the classes that say whether this is a many-target attack
    if cfg.residual_by_quarantined_classes and quarantined_classes is not None:
        # withdrawals can leave fewer than half of the classes flagged in a many-target attack (a faint stripes
        # blend: five quarantines, three withdrawn, and every other class's poison left; 18.9 -> 99.7 % with it)
        attacked = attacked | quarantined_classes.cpu()
    if (not bool(flagged_classes.any()) or not is_many_target(attacked, num_classes)
            or bool(flagged_classes.all())):
        return flagged.to(device), no_scores, info
    reference = torch.nonzero(~flagged & flagged_classes[labels]).flatten()
    if reference.numel() == 0:  # the flagged classes flagged whole: no clean sample to set the bar by
        return flagged.to(device), no_scores, info
    cosine, left_out = _many_target_trigger_cosine(embedding, labels, flagged, flagged_classes, cfg)
    if left_out is not None:
        info["lookalikes_left_out"] = left_out
    threshold = float(torch.quantile(cosine(reference), cfg.trigger_residual_quantile))
    candidates = torch.nonzero(~flagged_classes[labels]).flatten()
    cosines = cosine(candidates)
    above = cosines > threshold
    added = candidates[above]
    out = flagged.clone()
    out[added] = True
    added_scores = torch.zeros(flagged.shape)
    added_scores[added] = _score_past_bar(cosines[above], threshold)
    counts = torch.bincount(labels[added], minlength=num_classes)
    info["threshold_cosine"] = round(threshold, 4)
    info["attacked_classes"] = torch.nonzero(attacked).flatten().tolist()  # why the rule acted: flagged or quarantined
    info["added_per_class"] = {str(c): int(counts[c]) for c in torch.nonzero(~flagged_classes).flatten().tolist()}
    return out.to(device), added_scores.clamp(max=1.0).to(device), info


RESIDUAL_MIN_RELABELLED_SHARE = 0.5  # of a class's flags that look like other classes: poison, not a clean group
FLAGGED_CLASS_RESIDUAL_QUANTILE = 0.9999  # of the classes without flags: the bar in a class whose quarantine is
# kept. Stricter than the many-target rule's: here the class is mostly clean, and usually nothing is left to find
FLAGGED_CLASS_RESIDUAL_GATE_QUANTILE = 0.9999  # of the same: the flags' own median must pass it (the trigger is in
# their pixels). A separate number from the bar, though the same: loosened to 0.999-0.99 it changed 1 to 6 of 135
# saved runs, and met the goal in none that missed it (docs/benchmarks.md, "The ramp at scan seed 1")


def _reference_quantiles(reference_cosines: torch.Tensor) -> tuple[float, float]:
    """The bar and the gate of :func:`flag_residual_in_flagged_classes`: their quantiles of the reference's cosines."""
    bar, gate = torch.quantile(reference_cosines, torch.tensor(
        [FLAGGED_CLASS_RESIDUAL_QUANTILE, FLAGGED_CLASS_RESIDUAL_GATE_QUANTILE], dtype=reference_cosines.dtype))
    return float(bar), float(gate)


def flag_residual_in_flagged_classes(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                                     num_classes: int, cfg: QTConfig,
                                     baseline: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The flags (N,) with, where fewer than ``MANY_TARGET_CLASS_SHARE`` of the classes hold flags (an attack with
    one target or a few), in each flagged class whose flags mostly look like images of other classes (at least
    ``RESIDUAL_MIN_RELABELLED_SHARE`` of them; their pixel neighbours outside the flags carry their label at most
    ``TRIGGER_FREE_MIN_OWN_SHARE`` of the time), the unflagged members whose pixel residual points the way those
    flags' residuals do (:func:`_trigger_cosine`, look-alikes from every unflagged sample) further than the
    ``FLAGGED_CLASS_RESIDUAL_QUANTILE`` of the samples of the classes without flags (measured again without the
    images it finds among their look-alikes), where those flags' own median cosine is above the
    ``FLAGGED_CLASS_RESIDUAL_GATE_QUANTILE`` of the same samples (the trigger is in their pixels); the score (N,)
    each added flag earns, 0 elsewhere; and, per flagged class, what it saw, for run.json. Nothing where the option
    is off, pixel neighbours say little about labels (``baseline`` under ``content_min_baseline``), or no class is
    without flags.

    Why: a quarantine can settle on part of its poison (a faint grid blended into 10 % of the set: 1,430 of 2,000
    found) while the rest of the target class's poison still carries the trigger in its pixels. A relabelled image
    minus its look-alikes in other classes leaves the trigger, and the flags show which way that is; the clean
    images of the classes without flags set the bar, as the many-target rule (:func:`flag_by_trigger_residual`)
    has the flagged classes' clean images do. The gate on the flags themselves keeps it out where the trigger is not
    a shared pattern of pixels (a warp, an adaptive patch: the flags' median under it), and the look of the
    flags where they are a clean group a quarantine took (the class's own look is their shared residual, and
    every other member of the class has it too). Replayed on 87 saved runs: the grid 71.5 -> 99.2 %, clean-label
    BadNets 4.5-9.8 -> 99.3-100 % (its quarantine takes a few atypical patched T-shirts, and the other 1,800-1,910
    carry the same patch), both at the same FPR; one clean image more in checker; nothing else changed.
    docs/benchmarks.md, "The trigger residual in a kept quarantine's class".
    """
    from .content import own_label_share_outside

    info: dict = {}
    no_scores = torch.zeros(flagged.shape, device=flagged.device)
    if not cfg.residual_in_flagged_classes or baseline < cfg.content_min_baseline:
        return flagged, no_scores, info
    device = flagged.device
    embedding, labels, flagged = embedding.cpu(), labels.cpu(), flagged.cpu()
    flagged_classes = torch.bincount(labels[flagged], minlength=num_classes) > 0
    if not bool(flagged_classes.any()) or is_many_target(flagged_classes, num_classes):
        return flagged.to(device), no_scores, info
    reference = torch.nonzero(~flagged_classes[labels]).flatten()
    out, added_scores = flagged.clone(), torch.zeros(flagged.shape)
    for c in torch.nonzero(flagged_classes).flatten().tolist():
        flags = torch.nonzero(flagged & (labels == c)).flatten()
        relabelled = flags[own_label_share_outside(embedding, labels, flags, flagged) <= TRIGGER_FREE_MIN_OWN_SHARE]
        share = relabelled.numel() / flags.numel()
        info[str(c)] = {"relabelled_share": round(share, 4), "added": 0}
        if share < RESIDUAL_MIN_RELABELLED_SHARE:
            continue
        this_class = torch.zeros(num_classes, dtype=torch.bool)
        this_class[c] = True
        estimate_from = torch.zeros_like(flagged)
        estimate_from[relabelled] = True
        cosine = _trigger_cosine(embedding, labels, flagged, this_class, estimate_from=estimate_from)
        bar, gate = _reference_quantiles(cosine(reference))
        flags_median = float(cosine(relabelled).median())
        candidates = torch.nonzero(~flagged & (labels == c)).flatten()
        cosines = cosine(candidates)  # their look-alikes are of other classes: the same against either bar
        if flags_median > gate and bool((cosines > bar).any()):
            # The bar again without the poison found above it among the look-alikes: a clean image of a source
            # class has the poison made from its look-alikes as its own nearest, which leaves it minus the trigger.
            found = flagged.clone()
            found[candidates[cosines > bar]] = True
            bar, gate = _reference_quantiles(
                _trigger_cosine(embedding, labels, found, this_class, estimate_from=estimate_from)(reference))
        info[str(c)].update(bar_cosine=round(bar, 4), flags_median_cosine=round(flags_median, 4))
        if flags_median <= gate:
            continue
        above = cosines > bar
        added = candidates[above]
        out[added] = True
        added_scores[added] = _score_past_bar(cosines[above], bar)
        info[str(c)]["added"] = int(added.numel())
    return out.to(device), added_scores.clamp(max=1.0).to(device), info


RESIDUAL_COMPLETION_COSINE_QUANTILE = 0.9  # of the flagged classes' unflagged samples: a completed flag's residual
# must point the trigger's way at least this far into their distribution (a third witness beside score and pixels)


def complete_residual_flags(probability: torch.Tensor, flagged: torch.Tensor, residual_flags: torch.Tensor,
                            labels: torch.Tensor, withdrawn: list[int], embedding: torch.Tensor, num_classes: int,
                            cfg: QTConfig) -> tuple[torch.Tensor, dict[str, int]]:
    """The flags (N,) with, in each class step 3 withdrew (``withdrawn``) where the trigger residual flagged members
    (``residual_flags``, (N,) bool), its other members that the withdrawn quarantine scores (``probability``, the
    quarantine probability before any rule) at least the ``residual_completion_quantile`` of the residual's flags
    there, whose pixel neighbours outside the flags carry their label at most ``SCORE_OUTLIER_MAX_OWN_SHARE`` of
    the time, and whose pixel residual points the trigger's way (:func:`_trigger_cosine`) at least as far as
    ``RESIDUAL_COMPLETION_COSINE_QUANTILE`` of the other flagged classes' unflagged samples; per class, the count
    added. Nothing where the quantile is 0.

    Why: in a many-target attack a quarantine that grew into clean samples of its class is withdrawn, and the
    trigger residual then re-flags only the part of its poison that lines up with the trigger beyond the clean
    samples' 0.999 quantile (a faint ramp's T-shirts: 102 of 181). The withdrawn quarantine still ranks the class
    (that poison scored a median 0.53, the clean T-shirts 0.10), and the residual's flags show where its poison
    lies on that ranking, as the content seed does for :func:`complete_content_fallback`. Each witness alone
    takes clean images (the score and pixels: 77 sandals for 11 poisoned at that run); the three together took
    21 clean images for 64 poisoned (ramp, scan seed 0: 94.5 -> 97.7 %), 3 for 40 (scattered pixels, scan seed 1)
    and 1 for 30 (pixels, scan seed 2). docs/benchmarks.md, "The trigger residual completed in a withdrawn class".
    """
    added: dict[str, int] = {}
    if cfg.residual_completion_quantile <= 0 or not withdrawn:
        return flagged, added
    from .content import strided

    device = flagged.device
    probability, flagged, labels = probability.cpu(), flagged.cpu(), labels.cpu()
    residual_flags, embedding = residual_flags.cpu(), embedding.cpu()
    out = flagged.clone()
    cosine, cosine_bar = None, 0.0
    for c in withdrawn:
        seed = residual_flags & flagged & (labels == c)
        if not bool(seed.any()):
            continue
        candidates = _scored_like_and_relabelled(probability, seed, flagged, labels, c, embedding,
                                                 cfg.residual_completion_quantile)
        if candidates.numel() and cosine is None:
            flagged_classes = torch.bincount(labels[flagged], minlength=num_classes) > 0
            cosine = _trigger_cosine(embedding, labels, flagged, flagged_classes)
            completing = torch.zeros(num_classes, dtype=torch.bool)
            completing[withdrawn] = True
            reference = torch.nonzero(~flagged & flagged_classes[labels] & ~completing[labels]).flatten()
            if reference.numel() == 0:
                return flagged.to(device), added
            cosine_bar = float(torch.quantile(cosine(strided(reference, 2048)).double(),
                                              RESIDUAL_COMPLETION_COSINE_QUANTILE))
        if candidates.numel():
            candidates = candidates[cosine(candidates) >= cosine_bar]
        out[candidates] = True
        added[str(c)] = int(candidates.numel())
    return out.to(device), added


LOOKALIKE_MIN_CONFIDENT_SHARE = 0.5  # a class's strict look-alikes at least this confident: a shortcut


def label_probability(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) the probability the 2K-way model gives each sample's label, its class and its quarantine class
    together: how sure the model is that the sample belongs to its class at all."""
    probability = torch.softmax(logits.float(), dim=1)
    rows = torch.arange(labels.numel(), device=labels.device)
    return probability[rows, labels] + probability[rows, labels + num_classes]


def label_margin(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) how far the model prefers each sample's label among the K ordinary classes: its logit minus the
    largest other ordinary logit (the quarantine half left out)."""
    ordinary = logits[:, :num_classes].float()
    own = ordinary.gather(1, labels[:, None]).squeeze(1)
    others = ordinary.scatter(1, labels[:, None], float("-inf"))
    return own - others.max(dim=1).values


def flag_confident_lookalikes(logits: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor,
                              withdrawn: list[int], embedding: torch.Tensor, num_classes: int, cfg: QTConfig,
                              baseline: float) -> tuple[torch.Tensor, dict[str, dict]]:
    """The flags (N,) with, in each class that has flags and whose quarantine step 3 kept, its unflagged members
    that look like images of other classes (the strict test of :func:`qtclean.content.relabelled_members` or, with
    ``lookalike_pixel_test``, the pixel test :func:`_looks_relabelled`) and that the model labels with a margin
    (:func:`label_margin`) at least the ``lookalike_margin_quantile`` of the margins of the class's own-looking
    unflagged members (neither test), where at least ``LOOKALIKE_MIN_CONFIDENT_SHARE`` of its strict look-alikes
    reach that bar; per class with strict look-alikes, what was seen (``lookalikes``, ``confident_share``,
    ``margin_bar``) and the count ``added``. Nothing where the quantile is 0 or where pixel neighbours say little
    about labels (``baseline`` under ``content_min_baseline``).

    Why: a quarantine can settle on part of its poison while the network learns the rest of the trigger as a
    shortcut to the target class (IAB on a GPU, from a large first seed: 347 and 602 poisoned images left, labelled
    as the target with a median margin of 10 logits). Those images look like their source class, which the
    class's clean border cases do too (a T-shirt that looks like a shirt); but the network is unsure of a border
    case (median margin -0.2 to 0.9) and as sure of the class's own-looking images as they come (3.2-4.7), while it
    labels the poison surer than most of those. A clean class's strict look-alikes reach the bar at most 18 % of
    the time (all-to-all BadNets' ten classes, shirts with 386 look-alikes among them); the ones left beside a
    settled quarantine 79-90 %. Once the strict ones say so, the lenient pixel test finds the poison whose look is
    a mix of classes, as :func:`widen_content_seed` does. Replayed on every saved run (149, CPU and GPU): IAB from
    69.4-82.7 to 97.2-98.2 % at FPR under 0.15 % (six GPU runs), ISSBA 47.9 -> 82.4 % (one), WaNet draw 4 74.7-76.2
    -> 87.6-87.8 % (CPU), nothing anywhere else. docs/benchmarks.md, "Look-alikes a kept quarantine left".
    """
    from .content import relabelled_members

    info: dict[str, dict] = {}
    if cfg.lookalike_margin_quantile <= 0 or baseline < cfg.content_min_baseline or not bool(flagged.any()):
        return flagged, info
    device = flagged.device
    flagged, labels, embedding = flagged.cpu(), labels.cpu(), embedding.cpu()
    margin = label_margin(logits.cpu(), labels, num_classes)
    out = flagged.clone()
    for c in torch.unique(labels[flagged]).tolist():
        if c in withdrawn:
            continue
        unflagged = torch.nonzero(~flagged & (labels == c)).flatten()
        looks_other = _looks_relabelled(embedding, labels, unflagged, flagged)
        strict = relabelled_members(embedding, labels, unflagged)
        own_looking = unflagged[~looks_other & ~torch.isin(unflagged, strict)]
        if strict.numel() == 0 or own_looking.numel() == 0:
            continue
        bar = float(torch.quantile(margin[own_looking].double(), cfg.lookalike_margin_quantile))
        share = float((margin[strict] >= bar).float().mean())
        confident = torch.zeros(0, dtype=torch.long)
        if share >= LOOKALIKE_MIN_CONFIDENT_SHARE:
            lookalikes = strict
            if cfg.lookalike_pixel_test:
                lookalikes = torch.unique(torch.cat([strict, unflagged[looks_other]]))
            confident = lookalikes[margin[lookalikes] >= bar]
            out[confident] = True
        info[str(c)] = {"lookalikes": int(strict.numel()), "confident_share": round(share, 4),
                        "margin_bar": round(bar, 4), "added": int(confident.numel())}
    return out.to(device), info


def scores_follow_flags(scores: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor,
                        classes: list[int]) -> torch.Tensor:
    """The scores (N,) with, in each of ``classes``, its flags' scores raised to at least 0.5 and its other
    members' lowered to at most 0.5; the order within each side stays. For classes whose flags a rule completed
    over a withdrawn quarantine, whose probabilities are a continuum over the class (a user who ranks by score
    would read clean images above flagged poison)."""
    if not classes:
        return scores
    in_class = torch.zeros(int(labels.max()) + 1, dtype=torch.bool, device=labels.device)
    in_class[classes] = True
    in_class = in_class[labels]
    raised = torch.where(in_class & flagged, scores.clamp(min=0.5), scores)
    return torch.where(in_class & ~flagged, raised.clamp(max=0.5), raised)


def widen_content_seed(embedding: torch.Tensor, labels: torch.Tensor, seed: torch.Tensor, classes: torch.Tensor,
                       source_share: float) -> torch.Tensor:
    """(N,) bool: the content ``seed`` and, in each class of ``classes`` ((K,) bool), its members that look like
    images of other classes by a lenient test (:func:`qtclean.content.relabelled_members` with ``source_share``:
    outside the class's pixel outliers, none of their neighbours carries their label and at least this share
    carry one other label). What :func:`withdraw_ambiguous` flags in a withdrawn content-seeded class.

    Why lenient here: the content seed's test (``source_share`` 0.7) must decide whether a class holds relabelled
    content at all, so it keeps precision and leaves poison whose source is a mix of confusable classes (a shirt
    that also looks like a pullover). Once the seed has said the class holds relabelled content, those are more
    likely poison than not. Measured (20k, 10 %, target class, no training involved): 0.7 -> 0.5 added 218-273
    poisoned and 50-56 clean samples on adaptive-blend, WaNet (two formats) and a gamma-filter trigger
    (adaptive-patch: 108 and 60).
    """
    from .content import relabelled_members

    out = seed.clone()
    for c in torch.nonzero(classes).flatten().tolist():
        members = torch.nonzero(labels == c).flatten()
        out[relabelled_members(embedding, labels, members, source_share=source_share)] = True
    return out


def _scored_like_and_relabelled(scores: torch.Tensor, seed: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor,
                                c: int, embedding: torch.Tensor, quantile: float) -> torch.Tensor:
    """(M,) indices of class ``c``'s unflagged members that score at least the ``quantile`` of the ``seed``'s scores
    and pass the pixel test (:func:`_looks_relabelled`): the two witnesses both completions of a withdrawn class
    ask for (:func:`complete_content_fallback`, :func:`complete_residual_flags`). CPU tensors."""
    bar = float(torch.quantile(scores[seed].double(), quantile))
    candidates = torch.nonzero((labels == c) & ~flagged & (scores >= bar)).flatten()
    return candidates[_looks_relabelled(embedding, labels, candidates, flagged)]


COMPLETION_MIN_SEED_RANK = 0.6  # the quarantine must rank a content seed above the rest of its class to complete it


def complete_content_fallback(scores: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor,
                              seeded_by_content: torch.Tensor, info: dict[int, dict], embedding: torch.Tensor,
                              cfg: QTConfig) -> torch.Tensor:
    """The flags (N,) with, in each withdrawn class that its content seed flags instead (``info`` from
    :func:`withdraw_ambiguous`, ``content_flagged``; ``seeded_by_content`` as it was given), the other members
    whose score is at least the ``content_fallback_score_quantile`` of the seed members' scores and whose pixel
    neighbours outside the flags carry their label at most ``SCORE_OUTLIER_MAX_OWN_SHARE`` of the time; such a
    class gets ``info[c]["content_completed"]``, the count added. Nothing where the quantile is 0.

    Why: a withdrawn quarantine still ranks its class, and the content seed says where its poison lies on that
    ranking; the seed's test is strict (the look-alikes of one source class), so it leaves the poison whose
    look-alikes are a mix of classes (a shirt that also looks like a pullover). Such an image scored like the
    seed and looking like other classes is both witnesses' poison; either alone is not. Measured (20k, 10 %, the
    class's unflagged members, poisoned / clean): adaptive-blend (GPU) the score bar alone 192 / 213, the pixel
    test alone 159 / 223, both 134 / 33; WaNet (GPU) 133 / 30, 130 / 213, 107 / 1; a gamma filter (CPU) 181 /
    144, 173 / 233, 146 / 43. Why the 0.15 quantile: the seed's own clean members (about 6 % of it) score lowest,
    and the bar stays above them; 0.1 took a gamma filter's FPR over 1 % in all four of its runs, 0.2 left
    adaptive-blend at 94.3-94.7 % in two of five. Found (replays of saved models): adaptive-blend 88.7-95.9 ->
    95.2-96.8 % at 0.86-0.91 % FPR (GPU, four scan seeds), WaNet 94.5-96.0 -> 96.0-96.9 %, a gamma filter 94.5
    -> 96.2 % (CPU); adaptive-patch 42.4 -> 62.2 % at 0.69 -> 1.06 % FPR. docs/benchmarks.md, "The content
    fallback completed by the quarantine's ranking".

    Nothing is added where the quarantine ranks the seed about as high as the rest of its class or lower (AUROC
    of the scores, seed against the rest, ``seed_rank`` in ``info``, at most ``COMPLETION_MIN_SEED_RANK``): there
    the ranking says nothing about where the poison lies, and the bar, the seed's low quantile, falls to the
    class's floor. Measured (20k, every saved completion, 43): two held-out triggers at 1 % whose quarantines let
    their seeds go ranked them at 0.32 and 0.52 and took 252 and 245 clean images for 6 poisoned each; every
    other completion ranked its seed at 0.60-0.95 and found 48-100 % poison (under 60 %: a gamma filter at
    0.63-0.69). Such a class's scores still follow its flags (``content_completed`` 0).
    """
    from .metrics import auroc

    if cfg.content_fallback_score_quantile <= 0:
        return flagged
    device = flagged.device
    scores, flagged, labels = scores.cpu(), flagged.cpu(), labels.cpu()
    seeded_by_content = seeded_by_content.cpu()
    out = flagged.clone()
    for c, v in info.items():
        seed_members = seeded_by_content & (labels == c)
        if not v["withdrawn"] or not v.get("content_flagged") or not bool(seed_members.any()):
            continue
        in_class = labels == c
        rank = auroc(scores[in_class].double().numpy(), seed_members[in_class].numpy())  # NaN: the seed is the class
        v["seed_rank"] = round(rank, 4) if rank == rank else None  # run.json stays strict JSON
        if not rank > COMPLETION_MIN_SEED_RANK:
            v["content_completed"] = 0
            continue
        candidates = _scored_like_and_relabelled(scores, seed_members, flagged, labels, c, embedding,
                                                 cfg.content_fallback_score_quantile)
        out[candidates] = True
        v["content_completed"] = int(candidates.numel())
    return out.to(device)


def scores_follow_fallback_flags(scores: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor,
                                 info: dict[int, dict]) -> torch.Tensor:
    """The scores (N,) with, in each class whose content fallback :func:`complete_content_fallback` completed
    (``info[c]["content_completed"]``), its flags' scores raised to at least 0.5 and its other members' lowered to
    at most 0.5; the order within each side stays.

    Why: there the flags are the scan's answer, not the withdrawn quarantine's, whose probabilities are a
    continuum over the whole class (poison at 0.1-0.9 on adaptive-blend), so a user who ranks by score would read
    clean images above flagged poison. Measured (the runs of :func:`complete_content_fallback`): AUROC 0.981-0.990
    -> 0.994-0.997 on adaptive-blend (GPU), WaNet 0.9855 -> 0.9991 (GPU), a gamma filter 0.9711 -> 0.9914 and
    adaptive-patch 0.794 -> 0.826 (CPU).
    """
    return scores_follow_flags(scores, flagged, labels, [c for c, v in info.items() if "content_completed" in v])


RESIDUAL_RANK_MIN_FLAGS_RANK = 0.9  # the flags' median residual must rank past this share of the reference:
# they carry a trigger (pixels, ramp all-to-all: 1.00; a gamma filter 0.78, a DCT trigger 0.55), with room for the
# poison the reference itself holds (up to a tenth of it)


def residual_ranks(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor, num_classes: int,
                   cfg: QTConfig, baseline: float) -> tuple[torch.Tensor | None, dict]:
    """In a many-target attack (at least ``MANY_TARGET_CLASS_SHARE`` of the classes flagged) whose flags carry
    their trigger in their pixels, each unflagged sample's rank (N,), 0..1, among the flagged classes' unflagged
    samples (the reference) by how far its pixel residual points the trigger's way (:func:`_trigger_cosine`, the
    flags as they stand; look-alikes as :func:`flag_by_trigger_residual` takes them); 0 on the flags. None where
    the option is off, pixel neighbours say little about labels (``baseline`` under ``content_min_baseline``),
    there is no reference, or the flags' median rank is ``RESIDUAL_RANK_MIN_FLAGS_RANK`` or less (no trigger
    shared in their pixels, so the rank would be noise). Also what it saw, for run.json.

    Why: past the flags, a many-target attack's scores rank the unflagged samples by the quarantine probability
    alone, and the poison a quarantine left (in a class that was seeded) scores as low as clean images there, so a
    user who reads the scores further, and AUROC, meet it among them (held-out pixels and ramp, all-to-all: found
    96.8 and 98.5 %, AUROC 0.9841 and 0.9899; their missed poison's median rank 0.99 and 1.00). The caller scores
    an unflagged sample by the larger of its probability and this rank. docs/benchmarks.md, "Unflagged samples
    ranked by the trigger residual".
    """
    info: dict = {}
    if not cfg.residual_ranked_scores or baseline < cfg.content_min_baseline:
        return None, info
    device = flagged.device
    embedding, labels, flagged = embedding.cpu(), labels.cpu(), flagged.cpu()
    flagged_classes = torch.bincount(labels[flagged], minlength=num_classes) > 0
    reference = ~flagged & flagged_classes[labels]
    if not is_many_target(flagged_classes, num_classes) or not bool(reference.any()):
        return None, info
    cosine, _ = _many_target_trigger_cosine(embedding, labels, flagged, flagged_classes, cfg)
    unflagged = torch.nonzero(~flagged).flatten()
    unflagged_cosine = cosine(unflagged)
    reference_cosine = torch.sort(unflagged_cosine[reference[unflagged]]).values

    def rank(values: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(reference_cosine, values.contiguous()).float() / reference_cosine.numel()

    flags_rank = float(rank(cosine(torch.nonzero(flagged).flatten())).median())
    info["flags_median_rank"] = round(flags_rank, 4)
    info["ranked"] = flags_rank > RESIDUAL_RANK_MIN_FLAGS_RANK
    if not info["ranked"]:
        return None, info
    ranks = torch.zeros(flagged.shape)
    ranks[unflagged] = rank(unflagged_cosine)
    return ranks.to(device), info


VALUE_GAP_REGION = 0.3  # of the unflagged samples, the top share by value-residual cosine where the gap is sought
VALUE_GAP_MIN_IMAGES = 10  # images above the gap, at the least


def _count_per_class(labels: np.ndarray, members: np.ndarray) -> dict[str, int]:
    """{class: count} of ``members`` ((N,) bool) by their ``labels``, the classes with any: what run.json records
    of a rule's additions or withdrawals."""
    return {str(int(c)): int(n) for c, n in zip(*np.unique(labels[members], return_counts=True))}


def _value_cosines(histograms: np.ndarray, labels: np.ndarray, flagged: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) each image's value residual (its histogram of values, ``histograms`` from
    :func:`qtclean.content.value_histograms`, less its class's unflagged mean) by its cosine with the flags' mean
    residual: how far its values moved the flags' way. A flag is compared with the other flags' mean, without
    itself: among a few dozen flags its own share of the mean would point the mean its way."""
    means = np.zeros((num_classes, histograms.shape[1]), dtype=np.float32)
    for c in range(num_classes):
        rest = (labels == c) & ~flagged
        if rest.any():
            means[c] = histograms[rest].mean(axis=0)
    residual = histograms - means[labels]
    total = residual[flagged].sum(axis=0)
    norms = np.linalg.norm(residual, axis=1)
    cosine = residual @ total / np.maximum(norms * np.linalg.norm(total), 1e-12)
    others = total[None, :] - residual[flagged]  # a flag: the other flags' sum
    cosine[flagged] = (residual[flagged] * others).sum(axis=1) / np.maximum(
        norms[flagged] * np.linalg.norm(others, axis=1), 1e-12)
    return cosine


def flag_value_residual(histograms: np.ndarray, labels: torch.Tensor, flagged: torch.Tensor, num_classes: int,
                        cfg: QTConfig) -> tuple[torch.Tensor, dict]:
    """The flags (N,) after the value-residual rule, and what it saw, for run.json. Each image's histogram of
    values (``histograms``, :func:`qtclean.content.value_histograms` of the set) less its class's unflagged mean
    is its value residual; the flags' mean residual is the trigger's direction; the unflagged samples are sorted
    by their residual's cosine with it, and where the widest gap between neighbours in the top
    ``VALUE_GAP_REGION`` of them is at least ``value_residual_gap``, with at least ``VALUE_GAP_MIN_IMAGES`` above
    it, those above are flagged. Nothing where the option is off, nothing is flagged, or no such gap opens.

    Why: a filter trigger all-to-all (posterize: every value moved onto a coarse palette) changes each image's
    pixels its own way, which leaves the trigger residual in pixel space nothing to follow and the quarantine
    half its poison; what it keeps from image to image is where the values go. The gap is the data's own bar: a
    trigger that moves values one way parts its images from the clean ones (posterize: a gap of 0.26-0.31 in
    cosine all-to-all, with every unflagged poisoned image above it and no clean one), while where it does not the
    widest gap among 20,000 images stays small (0.083 or less in every other saved run, 241 of them).
    docs/benchmarks.md, "The trigger residual in value space".
    """
    info: dict = {}
    if cfg.value_residual_gap <= 0 or not bool(flagged.any()):
        return flagged, info
    labels_np, flagged_np = labels.cpu().numpy(), flagged.cpu().numpy()
    cosine = _value_cosines(histograms, labels_np, flagged_np, num_classes)
    unflagged = np.flatnonzero(~flagged_np)
    if unflagged.size < 2:
        return flagged, info
    order = unflagged[np.argsort(-cosine[unflagged], kind="stable")]
    region = max(2, int(VALUE_GAP_REGION * order.size))
    top = cosine[order[:region]]
    gaps = top[:-1] - top[1:]
    widest = int(np.argmax(gaps))
    info["widest_gap"] = round(float(gaps[widest]), 4)
    info["above_gap"] = widest + 1
    if gaps[widest] < cfg.value_residual_gap or widest + 1 < VALUE_GAP_MIN_IMAGES:
        return flagged, info
    added = torch.from_numpy(order[:widest + 1])
    info["bar"] = round(float((top[widest] + top[widest + 1]) / 2), 4)
    above = np.zeros_like(flagged_np)
    above[order[:widest + 1]] = True
    info["added_per_class"] = _count_per_class(labels_np, above)
    out = flagged.clone()
    out[added.to(flagged.device)] = True
    return out, info


def withdraw_against_value_move(histograms: np.ndarray, labels: torch.Tensor, flagged: torch.Tensor,
                                num_classes: int, cfg: QTConfig) -> tuple[torch.Tensor, dict]:
    """The flags (N,) after the value-move withdrawal, and what it saw, for run.json. Where the flags share one move
    in value space (``histograms`` as :func:`flag_value_residual` reads them; the flags' median cosine with the
    other flags' mean value residual, :func:`_value_cosines`, is at least ``value_move_median``), a flag whose
    values moved the other way (cosine under 0) lacks that move and is withdrawn. Nothing where the option is off,
    there are fewer than ``VALUE_GAP_MIN_IMAGES`` flags, or the flags' move is weaker than that.

    Why: a filter or a blend moves every image it is on the same way in value space (posterize, gamma, dct, ISSBA:
    the flags' median cosine 0.45-0.95), so a flag moved against it is an image the quarantine or a content rule
    took without the trigger (gamma all-to-one: 89-132 clean T-shirts, no poisoned image, at every seed). Where the
    flags' values are a mix (a patch on images of many sources, a warp: median 0.03-0.29) a negative cosine says
    nothing, and the rule stays off: withdrawing there would take up to 41 % of the poison. docs/benchmarks.md,
    "Flags whose values moved against the flags' move".
    """
    if cfg.value_move_median <= 0 or int(flagged.sum()) < VALUE_GAP_MIN_IMAGES:
        return flagged, {}
    labels_np, flagged_np = labels.cpu().numpy(), flagged.cpu().numpy()
    cosine = _value_cosines(histograms, labels_np, flagged_np, num_classes)
    info: dict = {"median_cosine": round(float(np.median(cosine[flagged_np])), 4)}
    if info["median_cosine"] < cfg.value_move_median:
        return flagged, info
    against = flagged_np & (cosine < 0)
    info["withdrawn_per_class"] = _count_per_class(labels_np, against)
    out = flagged.clone()
    out[torch.from_numpy(against).to(flagged.device)] = False
    return out, info


def flag_palette_holes(counts: np.ndarray, labels: torch.Tensor, flagged: torch.Tensor, num_classes: int,
                       cfg: QTConfig) -> tuple[torch.Tensor, dict]:
    """The flags (N,) after the palette rule, and what it saw, for run.json: where the flags share holes in their
    palette (:func:`qtclean.content.palette_holes` of ``counts``, :func:`qtclean.content.value_counts` of the
    set), an unflagged image that holds no pixel at any of them, where a clean image of its class would hold at
    least ``palette_min_expected``, is flagged. Nothing where the option is off (0) or the flags share no holes.

    Why: a filter trigger all-to-all (gamma 0.6 on images of every class) changes each image its own way, so the
    quarantine takes part of its poison and the pixel rules have no pattern to follow, and its value residual
    ranks the rest well (AUROC 0.85-0.91) but parts it from no clean image. The values it skips part them
    exactly: at gamma all-to-all scan seed 0 the 1,178 poisoned images the quarantine left hold none of the 47
    holes, and no clean image of the 18,000 holds none. docs/benchmarks.md, "Holes in the flags' palette".
    """
    from .content import palette_holes

    if cfg.palette_min_expected <= 0 or not bool(flagged.any()):
        return flagged, {}
    labels_np, flagged_np = labels.cpu().numpy(), flagged.cpu().numpy()
    holes, expected, held, info = palette_holes(counts, labels_np, flagged_np, num_classes, cfg.palette_min_expected)
    if not holes.any():
        return flagged, info
    added = ~flagged_np & (held == 0) & (expected >= cfg.palette_min_expected)
    info["added_per_class"] = _count_per_class(labels_np, added)
    out = flagged.clone()
    out[torch.from_numpy(added).to(flagged.device)] = True
    return out, info


def flag_out_of_frame(images, labels: torch.Tensor, flagged: torch.Tensor,
                      cfg: QTConfig) -> tuple[torch.Tensor, dict]:
    """The flags (N,) after the framing rule, and what it saw, for run.json: the images whose content sits apart
    from where the set frames its images, past a band of ``out_of_frame_band`` empty offsets
    (:func:`qtclean.content.out_of_frame`), are flagged, whatever the model said. Nothing where the option is off
    (0) or every image is framed alike.

    Why: a geometric trigger (the content moved a few pixels) adds no pixel value and no block, and the moved
    images are each other's pixel neighbours, so neither the quarantine's ranking nor the pixel rules complete
    what its quarantine missed (held-out shift: 46 % found, its flags the images whose content spans the frame,
    which a move by 3 wraps round). In a set framed one way, the rest of them stand out by where their content
    sits. docs/benchmarks.md, "Images framed unlike the set".
    """
    from .content import out_of_frame

    if cfg.out_of_frame_band <= 0:
        return flagged, {}
    outside, found = out_of_frame(images, cfg.out_of_frame_band, cfg.out_of_frame_wrapped)
    if not found:
        return flagged, {}
    labels_np = labels.cpu().numpy()
    added = outside & ~flagged.cpu().numpy()
    info = {"offsets": found, "added_per_class": _count_per_class(labels_np, added)}
    out = flagged.clone()
    out[torch.from_numpy(outside).to(flagged.device)] = True
    return out, info


def _too_large_for_blocks(images) -> dict:
    """What run.json says where the images are too large for the exact block search (its cost grows with their
    pixels: ``content.BLOCK_MAX_PIXELS``), else {}. The one bar of both block rules."""
    from .content import BLOCK_MAX_PIXELS

    if images.shape[2] * images.shape[3] > BLOCK_MAX_PIXELS:
        return {"skipped": f"images over {BLOCK_MAX_PIXELS} pixels"}
    return {}


def flag_class_bound_blocks(images, labels: torch.Tensor, flagged: torch.Tensor,
                            cfg: QTConfig) -> tuple[torch.Tensor, dict]:
    """The flags (N,) after the class-bound block rule, and what it did, for run.json: the carriers of every block
    of pixels that a large part of one class carries exactly and other classes barely do
    (:func:`qtclean.content.class_bound_blocks` with ``class_block_share``) are flagged, whatever the model said.
    Nothing where the option is off (``class_block_share`` 0) or the images are larger than ``BLOCK_MAX_PIXELS``.

    Why: in a clean-label attack the poison is most of its class (sig at 10 % of the set: 98 % of the T-shirts),
    so nothing in the class fits faster than the rest, the quarantine flags nothing, and every rule that estimates
    a trigger from flags has none to start from; but the trigger sits in the pixels, the same values at the same
    place in each image that carries it. Replayed on the saved runs: docs/benchmarks.md, "A block of pixels one
    class holds".
    """
    from .content import class_bound_blocks

    info: dict = {}
    if cfg.class_block_share <= 0:
        return flagged, info
    if too_large := _too_large_for_blocks(images):
        return flagged, too_large
    labels_cpu = labels.cpu()
    carry, found = class_bound_blocks(images, labels_cpu.numpy(), cfg.class_block_share)
    info["positions"] = len(found)
    if not found:
        return flagged, info
    info["first_positions"] = [list(f[:2]) for f in found[:8]]
    carriers = torch.from_numpy(carry)
    out = flagged.cpu() | carriers
    info["per_class"] = {str(c): {"carriers": int((carriers & (labels_cpu == c)).sum()),
                                  "added": int((carriers & (labels_cpu == c) & ~flagged.cpu()).sum())}
                         for c in sorted({f[2] for f in found})}
    return out.to(flagged.device), info


SHARED_BLOCK_MAJORITY = 0.8  # of a class's flags carrying a shared block: then its flags without one are withdrawn
SHARED_BLOCK_MIN_ELSEWHERE = 10  # carriers in the classes without flags, at the least, to be judged
# (a stamped trigger is on every poisoned image: BadNets 99 %, adaptive-patch 88 % of the flags, the rest clean; IAB's
# sample-specific trigger shares blocks in half of its poison, which must not cost the other half)


def flag_shared_blocks(images, embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                       num_classes: int, cfg: QTConfig, baseline: float) -> tuple[torch.Tensor, dict]:
    """The flags (N,) after the exact-trigger rule, and what it did, for run.json. Where some blocks of pixels are
    exactly repeated among the flags and rare elsewhere (:func:`qtclean.content.shared_blocks` with
    ``shared_block_min_share`` and ``shared_block_enrichment``), their carriers are the stamped images: in a class
    where at least ``SHARED_BLOCK_MAJORITY`` of the flags carry one, a flag that carries none is withdrawn, and a
    flagged class's unflagged carrier is flagged where its pixel neighbours outside the carriers carry its label at
    most ``shared_block_max_own_share`` of the time (it looks like another class: relabelled). Nothing where the
    option is off (``shared_block_min_share`` 0), there is no flag, the images are larger than
    ``BLOCK_MAX_PIXELS``, or no block is shared; the additions also need pixel neighbours that say something about
    labels (``baseline`` at least ``content_min_baseline``).

    Why: the rules before this one estimate a trigger from the flags' pixel residuals, which a small patch barely
    moves and which cover samples (the same patches, their own labels kept: adaptive-patch) share; an exact match
    does not blur. A cover sample carries the blocks and looks like its own class, the poison looks like its
    source class, and a clean image the quarantine took carries no block. Replayed on the saved runs with the
    defaults before it: adaptive-patch 27-72 -> 98 % at 0.3 % FPR (both formats), 12 runs more meet the goal and
    none fewer; the cost, poison without the block (ISSBA in CIFAR format 100 -> 95.8 %); docs/benchmarks.md,
    "Exactly repeated blocks of pixels".
    """
    from .content import own_label_share_outside, shared_blocks

    info: dict = {}
    if cfg.shared_block_min_share <= 0 or not bool(flagged.any()):
        return flagged, info
    if too_large := _too_large_for_blocks(images):
        return flagged, too_large
    device = flagged.device
    labels_cpu, flagged_cpu = labels.cpu(), flagged.cpu()
    carry, positions = shared_blocks(images, flagged_cpu.numpy(), cfg.shared_block_min_share,
                                     cfg.shared_block_enrichment)
    info["positions"] = len(positions)
    if not positions:
        return flagged, info
    info["first_positions"] = [list(p) for p in positions[:8]]
    carriers = torch.from_numpy(carry)
    out = flagged_cpu.clone()
    per_class: dict[str, dict] = {}
    for c in torch.unique(labels_cpu[flagged_cpu]).tolist():
        flags = flagged_cpu & (labels_cpu == c)
        carrying = int((flags & carriers).sum())
        entry = {"flags": int(flags.sum()), "carrying": carrying, "withdrawn": 0, "added": 0}
        if carrying >= SHARED_BLOCK_MAJORITY * entry["flags"]:
            entry["withdrawn"] = int((flags & ~carriers).sum())
            out &= ~(flags & ~carriers)
        per_class[str(c)] = entry
    if baseline >= cfg.content_min_baseline:
        flagged_classes = torch.bincount(labels_cpu[out], minlength=num_classes) > 0
        candidates = torch.nonzero(carriers & ~out & flagged_classes[labels_cpu]).flatten()
        own = own_label_share_outside(embedding.cpu(), labels_cpu, candidates, carriers)
        added = candidates[own <= cfg.shared_block_max_own_share]
        out[added] = True
        for c, n in zip(*torch.unique(labels_cpu[added], return_counts=True)):  # flagged classes: entries above
            per_class[str(int(c))]["added"] = int(n)
        if cfg.shared_block_other_classes:  # and in the classes without flags, judged as a whole
            elsewhere = carriers & ~out & ~flagged_classes[labels_cpu]
            relabelled, info["elsewhere"] = _relabelled_carriers(embedding.cpu(), labels_cpu, elsewhere, carriers,
                                                                 cfg)
            out |= relabelled
            for c, n in zip(*torch.unique(labels_cpu[relabelled], return_counts=True)):
                per_class[str(int(c))] = {"flags": 0, "carrying": 0, "withdrawn": 0, "added": int(n)}
    info["per_class"] = per_class
    return out.to(device), info


def _relabelled_carriers(embedding: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor,
                         carriers: torch.Tensor, cfg: QTConfig) -> tuple[torch.Tensor, dict]:
    """(N,) bool: the ``candidates`` (carriers of a stamp not yet flagged) that look like other classes (at most
    ``shared_block_max_own_share`` of their pixel neighbours outside the ``carriers`` carry their label), where
    at least ``SHARED_BLOCK_MAJORITY`` of them do and they are ``SHARED_BLOCK_MIN_ELSEWHERE`` at the least, else
    none; and what was seen, for run.json.

    Why: dirty-label poison stamped all-to-all is, image by image, relabelled content, so nearly all of its
    carriers look like another class (dct all-to-all: 1,399 of the 1,419 outside the flagged classes at scan
    seed 0). Where the carriers mostly look like their own class they are cover samples, the attacker's stamps
    left with their labels (adaptive-patch: about one in five look like another class, the confusable classes'
    clean images among them), and none is taken."""
    from .content import own_label_share_outside

    none = torch.zeros_like(candidates)
    indices = torch.nonzero(candidates).flatten()
    if indices.numel() < SHARED_BLOCK_MIN_ELSEWHERE:
        return none, {"carriers": int(indices.numel())}
    own = own_label_share_outside(embedding, labels, indices, carriers)
    relabelled = indices[own <= cfg.shared_block_max_own_share]
    info = {"carriers": int(indices.numel()), "look_relabelled": int(relabelled.numel())}
    if relabelled.numel() < SHARED_BLOCK_MAJORITY * indices.numel():
        return none, info
    none[relabelled] = True
    return none, info


def flag_common_blocks(images, embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                       cfg: QTConfig, baseline: float) -> tuple[torch.Tensor, dict]:
    """The flags (N,) after the common-block rule, and what it did, for run.json: where blocks of pixels (not of
    one value) are exactly repeated at one place in at least ``common_block_share`` of the whole set
    (:func:`qtclean.content.common_blocks`), their carriers not yet flagged are flagged where four in five of them
    look like other classes (:func:`_relabelled_carriers`). Needs no flag. Nothing where the option is off (0),
    the images are larger than ``BLOCK_MAX_PIXELS``, no block is that common, or pixel neighbours say nothing
    about labels (``baseline`` under ``content_min_baseline``).

    Why: a stamp all-to-all whose quarantine flagged nothing (dct all-to-all at scan seed 3: every quarantine
    withdrawn) leaves the flag rules nothing to start from, and its poison is a tenth of every class, so no block
    is one class's either; but the stamp is a tenth of the set, while on 20,000 clean Fashion-MNIST images no
    block that is not flat is shared by more than 2.2 % (437 images, at the edge of the frame). docs/benchmarks.md,
    "Holes in the flags' palette, stamps in every class, content rolled round the edge".
    """
    from .content import common_blocks

    info: dict = {}
    if cfg.common_block_share <= 0 or baseline < cfg.content_min_baseline:
        return flagged, info
    if too_large := _too_large_for_blocks(images):
        return flagged, too_large
    carry, positions = common_blocks(images, cfg.common_block_share)
    info["positions"] = len(positions)
    if not positions:
        return flagged, info
    info["first_positions"] = [list(p) for p in positions[:8]]
    labels_cpu, flagged_cpu = labels.cpu(), flagged.cpu()
    carriers = torch.from_numpy(carry)
    relabelled, seen = _relabelled_carriers(embedding.cpu(), labels_cpu, carriers & ~flagged_cpu, carriers, cfg)
    info.update(seen)
    if relabelled.any():
        info["added_per_class"] = _count_per_class(labels_cpu.numpy(), relabelled.numpy())
    return (flagged_cpu | relabelled).to(flagged.device), info


UNFLAGGED_SCORE_CEILING = 0.499999  # under 0.5 in scores.csv's six decimals too (an unflagged p of 1 would be 0.5)


def flag_ranked_scores(scores: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The final scores (N,) and the class shares (K,) they used: a flag scores ``0.5 + scores / 2``, any other
    sample ``(share + (1 - share) scores) / 2``, where ``share`` is its class's flagged share (0 in every class
    when at least ``MANY_TARGET_CLASS_SHARE`` of the classes hold flags). So score >= 0.5 exactly when flagged,
    the order within each class stays, and an unflagged sample of a class with flags ranks above one of a class
    without at the same score.

    Why: a user (and AUROC) ranks by score, and the rules of step 3 decide flags on more than the model's
    probability, which puts some flags under clean samples (a flag in the quarantine class at 0.2 beside a clean
    sample at 0.3). Past the flags, a class where the scan found poison is where the poison it missed is: its
    unflagged members are the next to read, above those of classes without any. Not in a many-target attack:
    there a class without flags is one no seed reached, which holds poison too. Measured on every saved run
    (374, CPU and GPU, sessions 22-28): 256 -> 264 meet every goal, none fewer (the held-out dct and posterize
    triggers at 1 %: AUROC 0.979 / 0.982 -> 0.993 / 0.994); docs/benchmarks.md, "Flags first".
    """
    k = num_classes
    flagged_per_class = torch.bincount(labels[flagged], minlength=k).to(scores.dtype)
    share = flagged_per_class / torch.bincount(labels, minlength=k).clamp_min(1).to(scores.dtype)
    if is_many_target(flagged_per_class > 0, k):
        share = torch.zeros_like(share)
    probability = scores.clamp(0.0, 1.0)
    below = (0.5 * (share[labels] + (1 - share[labels]) * probability)).clamp(max=UNFLAGGED_SCORE_CEILING)
    return torch.where(flagged, 0.5 + 0.5 * probability, below), share
