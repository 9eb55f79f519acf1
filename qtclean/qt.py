"""Quarantine Training (QT; Yu & Zhang, IEEE Access 2024), as pure tensor algorithm.

N = number of samples, K = number of classes. Class y's quarantine class is y + K (paper Sec. III-B).
Each sample has a backdoor strength ``eps`` in [eps_min, eps_max]; its soft target puts 1 - eps on y and eps on
y + K (paper Eq. 3). Nothing here reads files, prints, or knows the training loop.

Deviations from the paper, each measured on Fashion-MNIST (docs/benchmarks.md):
- membership (``is_quarantined``) comes from an eval pass at the end of each epoch, not from the training
  forward pass of a batch whose weights have since changed;
- the release rule (a quarantine class holding over ``release_threshold`` of its source class) does not free the
  whole class by default: ``release="split"`` splits the class by its quarantine probability (Otsu's threshold
  on the logit of q) and frees only the lower group; ``release="all"`` is the paper's rule;
- the quarantine is seeded by the pre-quarantine set: a class holding less than ``min_pre_share`` of that set
  has no quarantine (its samples never gain eps). Measured on the 2,000-image demo: without it, three clean
  classes drifted into quarantine (27.7 % of the set flagged, 200 of them poison).
- after the dynamic epochs, unquarantined eps decays by a step per epoch (``final_eps="decay"``) instead of
  dropping to eps_min at once, so poison that is still on its way into quarantine is not memorised as clean;
- the pre-quarantine set is ranked by loss relative to the class median over every pre-quarantine epoch
  (``pre_selection="relative"``), a class the loss rule leaves empty may be seeded from its features
  (``feature_seed``), a loss seed too small to trust alone is expanded to the feature group it points at when
  that group stands apart (``expand_seed``), and a small seed is weighted in the loss (``seed_weights``) so the
  unseeded poison that shares its trigger does not outvote it;
- a quarantine that ends unsettled after growing past its seed runs a second time, seeded with its own flags
  (``needs_second_pass``);
- the images themselves are a second witness, independent of what one training run fitted first: a class no loss
  seed reached is seeded with a feature cluster whose pixel neighbours carry other labels, spread over every
  other class (``content_seed``: relabelled content, as an all-to-one attack makes), and an expanded seed must be
  relabelled content too (``expand_seed`` with a pixel embedding from :mod:`qtclean.content`);
- after training, the flags are checked: a class whose quarantine is a continuum of scores is withdrawn
  (``withdraw_ambiguous``), so are flags unlike an all-to-one target's beside it (``withdraw_unlike_target``), a
  withdrawn class that nothing vouches for is scored down (``demote_withdrawn_scores``), and a flagged class's
  unflagged samples with outlying scores and relabelled-looking pixels are flagged too (``flag_score_outliers``);
- the final score ranks the flags first (0.5-1) and, below them, a class with flags before one without
  (``flag_ranked_scores``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .clustering import class_indices, principal_components, smaller_cluster


@dataclass(frozen=True)
class QTConfig:
    """Every hyperparameter of the algorithm, with the paper's value where it has one.

    epochs_pre : int, paper 4            K-way pre-quarantine training epochs (no augmentation).
    pre_min_steps : int                  ... and at least this many SGD steps (more epochs on a small set; 0 =
                                         exactly epochs_pre, the paper). A backdoor is fitted in steps, not
                                         passes: the 2,000-image demo gets 64 steps in 4 epochs and its seed held
                                         12 of 200 poisoned samples (none found); 192 steps: 138 (all found).
                                         The paper's 4 CIFAR-10 epochs are 1,560 steps.
    pre_fraction : float, paper 0.1      cap on the pre-quarantine set, fraction of the largest class count.
                                         Default 0.5: with the relative threshold guarding purity, a larger
                                         seed keeps a 10 %-rate trigger from stalling half-way (measured).
    epochs_quarantine : int, paper 20    2K-way quarantine training epochs.
    epochs_dynamic : int, paper 6        epochs during which eps of quarantined samples grows by eps_step.
                                         Default 10: with evidence-based growth (grow_threshold) poison that
                                         joins late needs the extra epochs (checker 10 %, 10k: TPR 88 % -> 100 %).
    eps_init, eps_step, eps_min, eps_max : paper 0.4, 0.1, 0.1, 0.9.
    release_threshold : float, paper 0.9 fraction of a class in quarantine that triggers a release.
    release : "split" (default) or "all" (paper).
    split_separation : float             Otsu's between-group variance share a class must reach to be split;
                                         below it the class has no second mode and is released whole.
    quarantine_bias : float              nats subtracted from the copied quarantine-half bias (head init).
    final_eps : "decay" (default) or "jump" (paper): after the dynamic epochs, eps of unquarantined samples
                                         falls by eps_step per epoch instead of dropping to eps_min at once.
    min_pre_share : float                a class takes part in quarantine only if it holds at least this share
                                         of the pre-quarantine set (0 = every class, the paper).
    min_seed_share : float               ... and at least this share of its own samples in that set. Not 0.01:
                                         with seed weighting, BadNets 0.5 % then seeded a class with 26 clean
                                         samples, weighted it ~40x, and 5.6 % of the clean set was flagged. A
                                         smaller loss seed may still seed its class through ``expand_seed``.
    pre_selection : "relative" (default) or "loss" (paper)
                                         how the pre-quarantine set is ranked: "loss" = lowest loss after the
                                         last pre-quarantine epoch; "relative" = lowest log-loss relative to the
                                         sample's class median, averaged over every pre-quarantine epoch (see
                                         :func:`relative_log_loss`).
    pre_threshold : float                "relative" only: a sample joins the pre-quarantine set only if its
                                         averaged relative log-loss is at least this many nats below its class
                                         median (0 = no threshold, always take the full set).
    early_stop_patience : int            stop quarantine training once membership has been stable this many
                                         epochs in a row (0 = always run every epoch, the paper); see
                                         :func:`is_stable`.
    early_stop_tolerance : float         share of the samples whose membership may change in a "stable" epoch.
    readout_epochs : int                 step 3 reads the quarantine model's predicted probabilities averaged over
                                         the eval passes of its last this many epochs (the seeded classes'; the
                                         other classes the final model's) instead of the final model's alone (1,
                                         the paper). Training is the same either way. Why: a quarantine can swing
                                         in its last epoch (a held-out frequency trigger, all-to-all: 590 held at
                                         epoch 18, 1 at epoch 20); over three CPU scan seeds the average of 3
                                         met the goal in every cell the final model did and in two more.
                                         docs/benchmarks.md, "Reading out the last epochs' average" and "The last
                                         epochs' average as the default".
    feature_seed_share : float           a class the loss rule seeds nothing in gets its features' smaller
                                         2-means cluster (top-10 principal components of the penultimate features)
                                         as its seed when that cluster is under this share of the class (0 = off,
                                         the paper). Clean classes split 31-50 / 69-50 (Fashion-MNIST 20k); a
                                         triggered minority forms its own cluster (all-to-all: 9-11 %, pure poison;
                                         BadNets 0.5 %: 4 %, 92 of 93 poisoned). See :func:`feature_seed`.
    shared_trigger_seed : bool           where at least half of the classes hold a seed (a trigger relabelled
                                         into most classes: all-to-all), a class without one is seeded with its
                                         samples along the seeds' shared feature direction, when Otsu's split
                                         of it separates (``split_separation``) and that side is under
                                         ``feature_seed_share`` of the class (False = off, the paper). Measured
                                         (badnets-a2a, CPU): scan seeds 1 and 2 had left the bags unseeded (and
                                         the ankle boots); see :func:`shared_trigger_seed`.
    grow_threshold : float               eps of a quarantined sample grows only while the model puts at least
                                         this probability on its quarantine class, and after the dynamic epochs
                                         only samples whose eps grew (or the pre-quarantine set) are held at
                                         eps_max; 0 = the paper (any sample predicted in quarantine grows and
                                         is held). See :func:`update_eps`.
    seed_weight_share : float            in a seeded class whose pre-quarantine set is small, weight the set's
                                         samples in the quarantine loss so that together they count at least this
                                         share of the rest of the class (0 = off, every sample weight 1). A
                                         trigger shared by a small seed and many unseeded poisoned samples is
                                         otherwise pulled to the majority's target; see :func:`seed_weights`.
                                         Loss-seeded classes only: a feature seed is a whole cluster. With 0.5
                                         IAB meets issue 6's goal on 3 of 3 draws (TPR 38-56 % -> 98 % on the two
                                         it missed); ISSBA's seeds (1.6 %, 0.5 % of the class) are under
                                         min_seed_share.
    seed_weight_until : float            ... and only until the class's quarantine holds this many times its
                                         seed (0 = for the whole run): the weight starts the growth, the grown
                                         members then carry it on their own (see :func:`release_seed_weights`).
    expand_min_bimodality : float        a class whose loss seed is under min_seed_share (too few to trust alone)
                                         is seeded with the group its seed points at: the class's features are
                                         projected on the direction from the rest of the class to the seed and
                                         split by Otsu's threshold; the seed's side becomes the seed when the
                                         projection is bimodal, Sarle's bimodality coefficient at least this
                                         (default 5/9, the textbook bound: a uniform distribution's value; 0 =
                                         off, the paper). A clean class's fast-fitted outliers point into one mode
                                         (0.34-0.50 in every clean class measured); a trigger's few fastest
                                         samples point at the rest of its poison (0.57-0.75, each group 97-100 %
                                         poison); docs/benchmarks.md, "Seed expansion". See :func:`expand_seed`.
    weight_expanded : bool               a seed from :func:`expand_seed` is weighted like a loss seed
                                         (``seed_weight_share``); False = like a feature seed, not weighted.
                                         Measured: ISSBA (20k, draw 2; the seed holds 836 of 2,000 poisoned)
                                         TPR 62.9 -> 85.7 %, WaNet 97.8 -> 98.1 % (FPR 0.14 -> 0.22 %).
    second_pass_epochs : int             when the quarantine has not settled by its last epoch (membership still
                                         changing by more than early_stop_tolerance), run it again from the K-way
                                         model for at most this many epochs, seeded with what the first pass
                                         flagged (0 = off, the paper). A small seed grows into most of its
                                         trigger's poison but the membership keeps swinging; a seed that large and
                                         pure converges, as BadNets' does. Measured (20k, 10 %): ISSBA draw 2
                                         TPR 85.7 -> 99.6 %, WaNet draw 3 86.6 -> 98.4 % (FPR <= 0.14 %). See
                                         :func:`needs_second_pass`.
    second_pass_min_growth : float       ... and only when some class's quarantine holds at least this many times
                                         its seed at the end of the first pass (see :func:`needs_second_pass`).
    second_pass_peak_growth : bool       ... or when the whole quarantine held that many times its whole seed at
                                         any epoch after the dynamic ones (:func:`peak_growth`): one that grew and
                                         shrank back is as unsettled as one still large.
    second_pass_after_residual : bool    ... and when step 3, read on the first pass, flags by the trigger residual
                                         enough of a class the quarantine never seeded to seed it
                                         (:func:`seeded_classes`): the first pass never learned those classes'
                                         poison, so their scores, and AUROC, stay low though they are flagged;
                                         a pass seeded with them learns it. See :func:`flag_by_trigger_residual`.
    residual_seed_by_own_share : bool    ... where such a class is judged, and in that second pass, a class is
                                         seeded by ``min_seed_share`` of its own samples alone, not
                                         ``min_pre_share`` of the whole seed: in a many-target attack the
                                         other classes' seeds are large, and a faint trigger's class whose
                                         residual flags fall under 5 % of them was never learned (see
                                         :func:`residual_seed_config`).
    second_pass_dynamic : int            epochs_dynamic of the second pass. Its seed is most of the poison
                                         already: with the first pass's schedule (10 dynamic of 20 epochs) ISSBA
                                         draw 2 / WaNet draw 3 reached TPR 99.8 / 99.2 % at FPR 0.12 / 0.39 %
                                         after 19-20 more epochs; with 4 of at most 10: 99.6 / 98.4 % at 0.06 /
                                         0.14 %, in half the time.
    second_pass_seed_max_own_share : float  the second pass's seed keeps only the first pass's flags whose pixel
                                         neighbours carry their label at most this share (1 = every flag): a
                                         quarantine that grew into clean samples of its class passes them on
                                         otherwise. Measured (CPU, 20k, the six runs that take a second pass):
                                         IAB 0 flagged -> 94.7 %, WaNet draw 3 0 -> 99.8 %, ISSBA draw 4 70.6 ->
                                         100 % (FPR <= 0.73 %); a pure quarantine loses a little (ISSBA draw 3
                                         100 -> 96.3 %); 0.6 and 0.7 kept enough clean samples in WaNet draw 3's
                                         seed to be withdrawn again. See :func:`relabelled_flags`.
    second_pass_seed_trigger_out : bool  judge those neighbours with a pattern of a class's flags' own (their
                                         pixel residuals' direction, which the rest of the class does not share)
                                         projected out (:func:`qtclean.content.without_shared_residual`): a
                                         trigger that dominates the pixels made the unflagged poison vouch for
                                         the flagged otherwise (frame, GPU scan seeds 0 and 2: the seed cut from
                                         about 1,500 poisoned flags to none, 0 flagged in the end).
    max_ambiguous_share : float          the flags of a class are withdrawn when more than this share of the
                                         class has an ambiguous final score (quarantine probability inside
                                         AMBIGUOUS_BAND, 0.3..0.7); 1 = never (the paper). A trigger is a crisp
                                         feature: the classes it seeds split into near 0 and near 1 (0-7.9 % of a
                                         class ambiguous, every detection measured). A quarantine grown into a
                                         clean class's subgroup is often a continuum (16.9 and 23.6 %, two of
                                         the four false alarms measured; the other two, half of a clean class
                                         with a crisp edge, 5.5-8.0 %, are not caught here: the expansion's
                                         content check stops their seed, see :func:`expand_seed`). A quarantine
                                         that holds its poison but grew into clean samples too can be a
                                         continuum (session 12's machine: four, 13.4-19.2 %, withdrawn).
                                         run.json's ``quarantine_ambiguity`` says what was withdrawn. See
                                         :func:`withdraw_ambiguous`.
    min_class_remainder : float          a seed group or a class's flags must leave at least this share of the
                                         median class size outside them in their class (0 = no such bound, the
                                         paper): an attack adds its poison to its target, whose own samples stay
                                         (measured, 20k: flags leave 1.04-1.53 times the median, BadNets 10-30 %;
                                         accepted seed expansions 1.07-1.87); a group that is the class itself is
                                         a clean class taken whole (grid and ramp all-to-all, scan seed 1:
                                         expansions leaving 0.09-0.13, flags 0.09-0.10). An expansion that does not
                                         is rejected (:func:`expand_seed`); flags that do not are withdrawn
                                         (:func:`withdraw_ambiguous`).
    content_seed_min_held : float        a class that a content seed started is withdrawn (and so flagged by that
                                         seed, ``content_fallback``) when its final quarantine holds less than
                                         this share of the seed (0 = never, the paper): the seed is evidence of
                                         its own, and a quarantine that let most of it go did not learn the
                                         trigger, even where it ends crisp. Measured (20k, replays): a held-out
                                         invisible frequency trigger whose quarantine swung to 3 % of its seed in
                                         the last epoch, 3.3 -> 97.4 %. Why a quarter: a seed at 0.5 % poison is
                                         half clean pixel outliers, which a sound quarantine leaves (BadNets 0.5
                                         %: 46 % held; at 0.5 its FPR 0.26 -> 1.56 %). See
                                         :func:`withdraw_ambiguous`.
    keep_relabelled_quarantine : bool    ... except a class without content-seed members whose flags, as a group,
                                         look like images relabelled from every other class (the content seed's
                                         test; at least ``CONTENT_MIN_CLASS_SHARE`` of the class): the continuum
                                         can lie in the class's clean part alone while the quarantine holds the
                                         poison. Measured (20k, a held-out stripes blend): 0 flagged -> 99.2 % at
                                         0.63 % FPR; no run that met the goal changes. See
                                         :func:`withdraw_ambiguous`.
    withdraw_unlike_target : bool        withdraw a class's flags when they do not look like relabelled images
                                         (pixel neighbours spread over every other class) while another class's
                                         do: a false quarantine beside an all-to-one attack's target. See
                                         :func:`withdraw_unlike_target`.
    withdrawn_score_scale : float        a withdrawn class that nothing vouches for (no content seed in it,
                                         flags in other classes) keeps this share of its unflagged samples'
                                         scores (1 = the model's quarantine probability as it is), so that a
                                         withdrawn false quarantine no longer ranks its clean samples above the
                                         poison of a quarantine that stood. See :func:`demote_withdrawn_scores`.
    score_outlier_quantile : float       in a class with flags, an unflagged sample whose score stands out from
                                         its class as far as only 1 - this share of the samples of the classes
                                         without flags do, and whose pixel neighbours outside the flags mostly
                                         carry other labels, is flagged too (0 = off, the paper): a quarantine
                                         that learned the trigger on most of its poison leaves the rest with
                                         raised scores, not flags. Measured (GPU, four scan seeds, and CPU, 20k):
                                         5 runs from misses into hits (WaNet 90.7 / 94.3 -> 96.8 / 96.2 %, a
                                         scattered-pixels trigger 92.7 -> 97.0 %, BadNets 0.5 % 93 -> 100 %,
                                         adaptive-blend 88.6 -> 95.7 %), none the other way; FPR +0.05 % (median
                                         of 105 saved runs; at most +0.41 %). See :func:`flag_score_outliers`.
    own_looking_flag_z : float           in a class whose quarantine stood, a sample whose pixel neighbours outside
                                         the flags mostly carry its own label is flagged exactly when its score
                                         stands out from its class's unflagged samples by more than this many
                                         times the z a clean sample of a class without flags reaches (its 0.99
                                         quantile; 0 = off, the paper): a quarantine grown into clean samples of
                                         its own class keeps them at scores their class reaches, poison that
                                         looks like its target stands far above them. Measured (20k,
                                         replayed on every saved run: 30 CPU, 108 GPU): three misses into hits
                                         (IAB 94.7 -> 95.5 %, WaNet FPR 1.15 -> 0.56 % CPU and 1.52 -> 0.87 %
                                         GPU), none the other way; at 3 IAB loses 71 poisoned flags, at 1
                                         WaNet keeps 75 of its 107 clean ones. See :func:`own_looking_by_score`.
    any_quarantine_class : bool          in the classes that quarantine (some sample predicted in its own
                                         quarantine class), a sample predicted in any of their quarantine classes
                                         is flagged, and such a sample scores their mass together (False = its
                                         own quarantine class only, the paper). Why: an all-to-all trigger is
                                         learned as one feature, and the model routes part of the poison into a
                                         neighbour's quarantine class (badnets-a2a, CPU: 85 of the 93 poisoned
                                         samples left unflagged, no clean sample). Measured (20k, CPU): all-to-all
                                         0.9895 / 95.3 % -> 0.9983 / 99.6 % at 0.00 % FPR; a one-target attack has one
                                         class that quarantines, and nothing changes. See :func:`is_quarantined`.
    trigger_residual_quantile : float    in a many-target attack (half of the classes flagged or more), a sample
                                         of a class without flags is flagged when its pixels minus those of its
                                         look-alikes in other classes point the way the flags' do, further than
                                         this quantile of the flagged classes' unflagged samples (0 = off, the
                                         paper): the trigger, estimated from the poison that was found, finds it
                                         in the classes no seed reached. See :func:`flag_by_trigger_residual`.
    residual_untriggered_lookalikes : bool  ... and its look-alikes leave out the images of classes without flags
                                         that carry a large trigger themselves (further along the flags' plain
                                         pixel direction from their class's median than the same quantile of the
                                         reference; False = any unflagged image): under a frame, the poison of
                                         such classes are each other's nearest images and leave no trigger.
    residual_in_flagged_classes : bool   with flags in fewer than half of the classes, a flagged class's unflagged
                                         member whose residual points the way its flags' do, further than 99.99 %
                                         of the classes without flags, is flagged, where the flags look like other
                                         classes and carry the trigger in their pixels (False = not, the paper):
                                         poison a settled quarantine left, clean-label poison beside its few
                                         flags. See :func:`flag_residual_in_flagged_classes`.
    trigger_free_quantile : float        in a many-target attack whose flags carry their trigger in their pixels, a
                                         flag that looks like its own class and whose pixels point the trigger's
                                         way less than this quantile of the flagged classes' unflagged samples is
                                         withdrawn (0 = off, the paper): a clean sample a target's quarantine
                                         took. See :func:`withdraw_trigger_free_flags`.
    residual_completion_quantile : float in a many-target attack, a withdrawn class the trigger residual
                                         re-flagged also flags its members that the withdrawn quarantine scores at
                                         least this quantile of the residual's flags there, that look like images
                                         of other classes and whose pixels point the trigger's way (0 = off, the
                                         paper). See :func:`complete_residual_flags`.
    lookalike_margin_quantile : float    in a class whose quarantine step 3 kept, its unflagged members that look
                                         like images of other classes and that the model labels with a margin at
                                         least this quantile of the class's own-looking members' margins are
                                         flagged, where most of its strict look-alikes are that sure (0 = off, the
                                         paper): poison the model learned by its trigger. Measured (replays of six
                                         GPU IAB runs whose quarantine settled short): 69.4-82.7 -> 97.2-98.2 %.
                                         See :func:`flag_confident_lookalikes`.
    lookalike_pixel_test : bool          ... its look-alikes by the strict test or the score rules' pixel test
                                         (False = the strict test alone: IAB 92.3-94.9 %, fewer clean added).
    content_fallback : bool              a withdrawn class that the content seed seeded (``content_max_agreement``)
                                         is flagged by that seed instead: its members whose pixels look like
                                         images of other classes (False = nothing, as before). Measured:
                                         withdrawn classes went from nothing to 76-78 % of their poison found at
                                         0.3-0.4 % FPR (adaptive-blend, WaNet draw 4, a gamma-filter trigger;
                                         adaptive-patch 37 %, all its seed holds). See :func:`withdraw_ambiguous`.
    content_fallback_source_share : float  ... together with the class's other members that look like images
                                         of other classes by a lenient test: outside its pixel outliers, none of
                                         their neighbours carries its label and at least this share carry one
                                         other label (0.7 = the content seed's own test). Measured: 0.5 found
                                         another 11-14 % of the poison (adaptive-patch: 5 %) for 0.3 % more
                                         FPR. See :func:`widen_content_seed`.
    content_fallback_score_quantile : float  ... and with its other members scored at least this quantile of
                                         the seed's scores whose pixel neighbours are mostly other classes (0 =
                                         off, the paper): the poison the seed's strict test left, as the
                                         withdrawn quarantine still ranks it; the class's scores then follow its
                                         flags. Measured (GPU, adaptive-blend and WaNet): 88.7-96.0 -> 95.2-96.9
                                         % found at 0.69-0.91 % FPR. See :func:`complete_content_fallback`.
    flag_ranked_scores : bool            the final scores rank every flag above every other sample: a flag scores
                                         0.5-1, any other sample 0-0.5, each half in the order of the score the
                                         rules above leave (the model's probability); and, outside a many-target
                                         attack, an unflagged sample of a class with flags ranks above its
                                         class's flagged share (False = that score as it is, the paper). See
                                         :func:`flag_ranked_scores`.
    content_max_agreement : float        a class no loss or expanded seed reached is seeded with a group of it
                                         whose images are relabelled content: at most this share of their
                                         pixel-space neighbours carry the class's label (0 = off, the paper).
                                         The groups: either half of the class's 2-means split of its features,
                                         and its members that look like typical images of another class in
                                         pixel space. See :func:`content_seed`.
    content_min_diversity : float        ... and those neighbours' other labels spread over the other classes
                                         (normalised entropy, 1 = evenly over all of them): an all-to-one attack
                                         relabels every class (its groups 0.97-1.00: blends, BadNets, ISSBA,
                                         WaNet, IAB, the adaptive attacks); a clean group's neighbours sit in one
                                         or two confusable classes. Of 660 clean feature clusters (Fashion-MNIST,
                                         2k-20k, 39 runs) none reached 0.9 (at most 0.87); clean pixel groups
                                         reach 0.92 (bags, 1-2 % of their class, under CONTENT_MIN_CLASS_SHARE;
                                         at most 0.67 at 5 % or more; 9 clean sets, 2k-60k). 0.95 until session
                                         18: ISSBA's pixel group at 0.914 (draw 2, scan seeds 1, 2) was left out.
                                         docs/benchmarks.md, "Content seed", "Pixel outliers", "Content seed
                                         at diversity 0.9".
    content_min_baseline : float         ... and only where pixel neighbours carry labels at all: the share of a
                                         sample's neighbours with its label, over the whole set, is at least this
                                         (Fashion-MNIST 0.66-0.83; natural photos much less, and there the rule
                                         stays off rather than guess).
    """

    epochs_pre: int = 4
    pre_min_steps: int = 200
    pre_fraction: float = 0.5
    epochs_quarantine: int = 20
    epochs_dynamic: int = 10
    eps_init: float = 0.4
    eps_step: float = 0.1
    eps_min: float = 0.1
    eps_max: float = 0.9
    release_threshold: float = 0.9
    release: str = "split"
    split_separation: float = 0.5
    quarantine_bias: float = 4.0
    final_eps: str = "decay"
    min_pre_share: float = 0.05
    min_seed_share: float = 0.02
    pre_selection: str = "relative"
    pre_threshold: float = 5.0
    early_stop_patience: int = 3
    readout_epochs: int = 3
    early_stop_tolerance: float = 0.0005
    grow_threshold: float = 0.55
    feature_seed_share: float = 0.2
    shared_trigger_seed: bool = True
    seed_weight_share: float = 0.5
    seed_weight_until: float = 0.0
    expand_min_bimodality: float = 5 / 9
    weight_expanded: bool = True
    second_pass_epochs: int = 10
    second_pass_min_growth: float = 1.5
    second_pass_peak_growth: bool = True
    second_pass_after_residual: bool = True
    residual_seed_by_own_share: bool = True
    second_pass_dynamic: int = 4
    second_pass_seed_max_own_share: float = 0.5
    second_pass_seed_trigger_out: bool = True
    max_ambiguous_share: float = 0.12
    min_class_remainder: float = 0.5
    content_seed_min_held: float = 0.25
    keep_relabelled_quarantine: bool = True
    withdraw_unlike_target: bool = True
    withdrawn_score_scale: float = 0.5
    score_outlier_quantile: float = 0.99
    own_looking_flag_z: float = 2.0
    any_quarantine_class: bool = True
    trigger_residual_quantile: float = 0.999
    residual_untriggered_lookalikes: bool = True
    residual_in_flagged_classes: bool = True
    trigger_free_quantile: float = 0.99
    residual_completion_quantile: float = 0.15
    lookalike_margin_quantile: float = 0.5
    lookalike_pixel_test: bool = True
    content_fallback: bool = True
    content_fallback_source_share: float = 0.5
    content_fallback_score_quantile: float = 0.15
    flag_ranked_scores: bool = True
    content_max_agreement: float = 0.15
    content_min_diversity: float = 0.9
    content_min_baseline: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def paper(cls, **overrides) -> "QTConfig":
        """The published algorithm's settings where qtclean changed a default (Yu & Zhang 2024, Sec. IV).

        Two deviations are not switchable: the 2K head starts as a copy of the K head (``quarantine_bias``), and
        membership is read from an eval pass at the end of each epoch.
        """
        paper = dict(pre_fraction=0.1, pre_selection="loss", pre_threshold=0.0, release="all", final_eps="jump",
                     min_pre_share=0.0, min_seed_share=0.0, early_stop_patience=0, grow_threshold=0.0,
                     epochs_dynamic=6, pre_min_steps=0, feature_seed_share=0.0, shared_trigger_seed=False,
                     seed_weight_share=0.0, seed_weight_until=0.0, expand_min_bimodality=0.0, second_pass_epochs=0,
                     second_pass_seed_max_own_share=1.0, second_pass_seed_trigger_out=False,
                     max_ambiguous_share=1.0, withdraw_unlike_target=False, withdrawn_score_scale=1.0,
                     score_outlier_quantile=0.0, own_looking_flag_z=0.0,
                     any_quarantine_class=False, content_fallback=False, content_fallback_score_quantile=0.0,
                     content_max_agreement=0.0, content_seed_min_held=0.0, readout_epochs=1,
                     keep_relabelled_quarantine=False, trigger_residual_quantile=0.0, min_class_remainder=0.0,
                     residual_in_flagged_classes=False, residual_untriggered_lookalikes=False,
                     second_pass_after_residual=False, residual_seed_by_own_share=False, second_pass_peak_growth=False,
                     trigger_free_quantile=0.0, residual_completion_quantile=0.0, lookalike_margin_quantile=0.0,
                     flag_ranked_scores=False)
        return cls(**{**paper, **overrides})


def pre_quarantine_epochs(cfg: QTConfig, num_samples: int, batch_size: int) -> int:
    """Epochs of the pre-quarantine phase: ``epochs_pre``, or more when that is under ``pre_min_steps`` steps."""
    steps_per_epoch = max(1, -(-num_samples // batch_size))
    return max(cfg.epochs_pre, -(-cfg.pre_min_steps // steps_per_epoch))


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) hard-label cross-entropy, no reduction."""
    return F.cross_entropy(logits, labels, reduction="none")


def select_pre_quarantine(losses: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          fraction: float) -> torch.Tensor:
    """Bool mask (N,) of the pre-quarantine set: the lowest-loss samples, ``fraction`` x largest class count.

    Backdoor samples are fitted fastest (paper Sec. III-A), so lowest loss = most suspect; this internal
    ranking runs "lower is worse" and never leaves this module.
    """
    counts = torch.bincount(labels, minlength=num_classes)
    size = max(1, int(round(fraction * int(counts.max()))))
    size = min(size, losses.numel())
    chosen = torch.argsort(losses, stable=True)[:size]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[chosen] = True
    return mask


def relative_log_loss(log_losses: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) log-loss minus the median log-loss of the sample's class, averaged over epochs (nats; negative = fitted
    faster than its class). ``log_losses`` is (E, N), one row per pre-quarantine epoch; ``exclude`` (N,) bool
    leaves samples out of the class medians (the reference), not out of the result.

    Why: a backdoor is fitted within the first epoch, so poisoned samples sit far below their (target) class's
    median, while an easy clean class is low as a whole and does not stand out from its own median. Ranking on the
    raw loss instead fills the pre-quarantine set with the easiest clean class whenever the backdoor's loss is
    not yet the lowest (measured on Fashion-MNIST 20k: 0-100 % poison depending on the epoch; relative and averaged
    over epochs 1-4: 100 % poison for BadNets/checker at 5-10 %, none on clean data).
    """
    log_losses = log_losses.float().reshape(-1, labels.numel())
    reference = torch.ones_like(labels, dtype=torch.bool) if exclude is None else ~exclude
    out = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    for c in range(num_classes):
        members = labels == c
        ref = members & reference
        if not bool(ref.any()):
            ref = members
        if bool(members.any()):
            medians = log_losses[:, ref].median(dim=1).values  # (E,)
            out[members] = (log_losses[:, members] - medians[:, None]).mean(dim=0)
    return out


def select_pre_quarantine_relative(log_losses: torch.Tensor, labels: torch.Tensor, num_classes: int,
                                   fraction: float, threshold: float, max_rounds: int = 10) -> torch.Tensor:
    """Bool mask (N,) of the pre-quarantine set from per-epoch log-losses (E, N): samples at least ``threshold``
    nats below their class median (averaged over epochs), at most ``fraction`` x the largest class, lowest first.

    The class median is taken over the samples not selected, repeated until the set stops changing: when poison
    is half of its target class (10 % all-to-one poison, 10 classes) the plain median sits between poison and clean
    and the poison is only a few nats below it. Measured on Fashion-MNIST 20k (checker 10 %): 762 of 2,000 poison
    with the plain median, 1,197 (8 clean) with the trimmed one; clean data: 12 samples either way.
    On clean data this set is (nearly) empty, so no class gets a quarantine.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for _ in range(max_rounds if threshold > 0 else 1):
        score = relative_log_loss(log_losses, labels, num_classes, exclude=mask)
        new = select_pre_quarantine(score, labels, num_classes, fraction)
        if threshold > 0:
            new &= score <= -threshold
        if torch.equal(new, mask):
            break
        mask = new
    return mask


def feature_seed(features: torch.Tensor, labels: torch.Tensor, num_classes: int, share: float,
                 skip: torch.Tensor | None = None, dims: int = 10) -> torch.Tensor:
    """Bool mask (N,): in each class (except ``skip``, (K,) bool), the smaller cluster of a 2-means split of the
    features when it holds under ``share`` of the class.

    Why: a trigger the network learns slowly (all-to-all, a patch on 0.5 % of the set) is not fitted faster than
    its class, so the loss rule seeds nothing; but the triggered samples of a class share a feature the clean ones
    lack and split off as a small cluster, while a clean class splits into two large halves.
    """
    mask = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    if share <= 0:
        return mask
    for c, idx in class_indices(labels, num_classes, min_size=3):
        if skip is not None and bool(skip[c]):
            continue
        _, in_small = smaller_cluster(features[idx], dims)
        if float(in_small.sum()) < share * idx.numel():
            mask[idx[in_small]] = True
    return mask


MANY_TARGET_CLASS_SHARE = 0.5  # this share of the classes seeded (or flagged) marks a many-target attack


def group_gap_direction(points: torch.Tensor, labels: torch.Tensor, group: torch.Tensor,
                        classes: torch.Tensor) -> torch.Tensor | None:
    """(D,) of length 1: the mean over ``classes`` ((K,) bool) holding members of ``group`` ((N,) bool) and others of
    (the group's mean minus the others' mean) in ``points`` (N, D); None where no class has both or the mean is 0.
    Under a many-target attack the group (a seed, the flags) comes from every class and is labelled every class, so
    the classes' own looks cancel and the trigger's direction is left."""
    from .content import mean_direction

    gaps = []
    for c in torch.nonzero(classes).flatten().tolist():
        inside, rest = group & (labels == c), ~group & (labels == c)
        if bool(inside.any()) and bool(rest.any()):
            gaps.append(points[inside].mean(dim=0) - points[rest].mean(dim=0))
    if not gaps or float(torch.stack(gaps).mean(dim=0).norm()) <= 1e-12:
        return None
    return mean_direction(torch.stack(gaps))


def shared_trigger_seed(features: torch.Tensor, labels: torch.Tensor, pre_mask: torch.Tensor, num_classes: int,
                        cfg: QTConfig) -> tuple[torch.Tensor, dict]:
    """Bool mask (N,): where at least ``MANY_TARGET_CLASS_SHARE`` of the classes hold a seed
    (``pre_mask``, as :func:`seeded_classes` counts them), in each class without one, the samples on the seeds'
    side of Otsu's split of the class's features along the seeds' shared direction (the mean over seeded classes
    of seed mean minus rest mean), when the split separates (``split_separation``) and that side is under
    ``feature_seed_share`` of the class; and what it measured per class, for run.json.

    Why: an attack that relabels into most classes (all-to-all) uses one trigger, which the network encodes as one
    direction of its features in every class; a class whose own split missed it (Fashion-MNIST's bags vary more
    than the trigger does, so their 2-means split halves the class) still has its poison along that direction.
    Measured (20k, badnets-a2a, CPU, scan seeds 1 and 2): the unseeded bags' poison AUROC 1.0000 and 0.9998 along
    it, Otsu's upper side 235 and 228 samples holding 197 and 196 of the 197 poisoned; the ankle boots 199, all
    poisoned. An all-to-one attack seeds one class (a false quarantine beside it, two), so nothing changes there.
    """
    mask = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    info: dict = {}
    seeded = seeded_classes(labels, pre_mask, num_classes, cfg)
    if not cfg.shared_trigger_seed or int(seeded.sum()) < MANY_TARGET_CLASS_SHARE * num_classes:
        return mask, info
    feats = features.double()
    direction = group_gap_direction(feats, labels, pre_mask, seeded)
    if direction is None:
        return mask, info
    for c, idx in class_indices(labels, num_classes, min_size=4):
        if bool(seeded[c]):
            continue
        along = (feats[idx] - feats[idx].mean(dim=0)) @ direction
        threshold, separation = otsu_threshold(along)
        side = along > threshold
        share = float(side.float().mean())
        accepted = separation >= cfg.split_separation and share < cfg.feature_seed_share
        info[str(c)] = {"group": int(side.sum()), "share": round(share, 4), "separation": round(separation, 4),
                        "accepted": accepted}
        if accepted:
            mask[idx[side]] = True
    return mask, info

CONTENT_MAX_CLASS_SHARE = 0.7  # a content seed leaves this much of its class outside: the class's own reference
CONTENT_MIN_CLASS_SHARE = 0.05  # ... and is at least this much of it: a clean class's own odd images are fewer


def content_size_allowed(class_share: float) -> bool:
    """Whether a group holding ``class_share`` of its class is one the content seed looks at at all."""
    return CONTENT_MIN_CLASS_SHARE <= class_share <= CONTENT_MAX_CLASS_SHARE


def content_seed(embedding: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 cfg: QTConfig, skip: torch.Tensor | None = None, dims: int = 10,
                 baseline: float | None = None) -> tuple[torch.Tensor, dict]:
    """Bool mask (N,) of the candidate groups (:func:`content_candidates`) whose pixel content is relabelled: their
    nearest neighbours in pixel space (``embedding``, from :func:`qtclean.content.pixel_embedding`) rarely carry
    their label (agreement at most ``content_max_agreement``) and spread over the other classes (diversity at
    least ``content_min_diversity``); one group per class at most, classes in ``skip`` ((K,) bool) left out.
    Also returns the statistics behind it for run.json.

    Why: a trigger the network learns slowly is not fitted faster than its class, so the loss rule seeds nothing,
    and under an all-to-one attack at 5-20 % the poison is a third to two thirds of its target class, too large for
    :func:`feature_seed`. The network has often learned to tell it apart (the class's 2-means split is poison
    against clean); what tells which side is poison is the images themselves: relabelled from every other class.
    Where the network's features do not split it (a trigger built to hide in the features, ISSBA with some scan
    seeds), the class's pixel outliers are the poison themselves. Runs only where pixel neighbours carry
    information about labels at all (:func:`qtclean.content.label_agreement` at least ``content_min_baseline``;
    ``baseline``: that agreement, if the caller has it already).
    """
    from .content import group_content, label_agreement

    mask = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    info: dict = {}
    if cfg.content_max_agreement <= 0:
        return mask, info
    cpu_labels = labels.cpu()
    baseline = label_agreement(embedding, cpu_labels) if baseline is None else baseline
    info["pixel_label_agreement"] = round(baseline, 4)
    if baseline < cfg.content_min_baseline:
        return mask, info
    best: dict[int, tuple[torch.Tensor, dict]] = {}  # per class: the accepted group with the lowest agreement
    for c, members, kind in content_candidates(features, labels, num_classes, skip, dims, embedding):
        stats = {"group": kind, "size": members.numel(),
                 **group_content(embedding, cpu_labels, members, c, num_classes)}
        info.setdefault(str(c), []).append(stats)
        if content_accepted(stats, cfg) and (c not in best or stats["agreement"] < best[c][1]["agreement"]):
            best[c] = (members, stats)
    for members, _ in best.values():
        mask[members] = True
    return mask, info


def content_accepted(stats: dict, cfg: QTConfig) -> bool:
    """Whether a group's pixel statistics (:func:`qtclean.content.group_content`) make it relabelled content from
    every other class: few neighbours with its label, the others spread over the other classes."""
    return stats["agreement"] <= cfg.content_max_agreement and stats["diversity"] >= cfg.content_min_diversity


def content_candidates(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       skip: torch.Tensor | None = None, dims: int = 10, embedding: torch.Tensor | None = None):
    """Yield (class, member indices, kind) of the groups :func:`content_seed` looks at, classes in ``skip`` ((K,)
    bool) left out, a group outside ``CONTENT_MIN_CLASS_SHARE``..``CONTENT_MAX_CLASS_SHARE`` of its class too
    (clean Fashion-MNIST's relabelled-looking bags, 1-2 % of their class, reach diversity 0.92): both halves of
    each class's 2-means split of its features (``dims`` principal components; kind ``"features"``) and, with the
    pixel ``embedding``, the class's members that look like typical images of another class
    (:func:`qtclean.content.relabelled_members`; kind ``"pixels"``). The second needs no training, so it does not
    depend on how one run's features split."""
    from .content import relabelled_members

    if embedding is not None:  # the neighbour search against the whole set runs where training does (a GPU)
        embedding = embedding.to(labels.device)
    for c, idx in class_indices(labels, num_classes, min_size=4):
        if skip is not None and bool(skip[c]):
            continue
        _, in_small = smaller_cluster(features[idx], dims)
        parts = [(in_small, "features"), (~in_small, "features")]
        if embedding is not None:
            parts.append((torch.isin(idx, relabelled_members(embedding, labels, idx)), "pixels"))
        for part, kind in parts:
            if content_size_allowed(float(part.float().mean())):
                yield c, idx[part], kind


def bimodality_coefficient(values: torch.Tensor) -> float:
    """Sarle's bimodality coefficient of 1-D values, (skewness^2 + 1) / kurtosis: 1/3 for a normal distribution,
    5/9 for a uniform one, towards 1 for two separated modes (SAS manual; Pfister et al. 2013)."""
    v = values.double()
    std = v.std(unbiased=False)
    if v.numel() < 4 or float(std) <= 1e-12:
        return 0.0
    z = (v - v.mean()) / std
    return float(((z ** 3).mean() ** 2 + 1) / (z ** 4).mean())


def fewest_left_in_class(labels: torch.Tensor, num_classes: int, cfg: QTConfig) -> float:
    """The fewest samples a seed group or a class's flags may leave outside them in their class:
    ``min_class_remainder`` times the median class size (an attack adds its poison to its target's own samples;
    a group that leaves less is the class itself). 0 where the bound is off."""
    return cfg.min_class_remainder * float(torch.bincount(labels, minlength=num_classes).float().median())


def expand_seed(features: torch.Tensor, labels: torch.Tensor, pre_mask: torch.Tensor, classes: torch.Tensor,
                cfg: QTConfig, dims: int = 10, embedding: torch.Tensor | None = None,
                baseline: float | None = None) -> tuple[torch.Tensor, dict[int, dict]]:
    """Bool mask (N,) of the groups that the small loss seeds of ``classes`` ((K,) bool) point at, and per class
    the statistics the decision used (``bimodality``, the group's ``share`` and Otsu ``separation``, ``accepted``)
    for run.json.

    Why: a trigger's fastest-fitted samples are a pure but tiny seed (ISSBA: 4-48 of ~2,000 poisoned samples,
    under ``min_seed_share``); a clean class's fastest-fitted outliers are as many, and as far below their class
    median in loss (measured: no loss statistic tells them apart). Their features do: the direction from the rest
    of the class to the seed splits a poisoned class into the poison and the clean samples (two modes), while in a
    clean class it runs through one mode. So each class's features (top ``dims`` principal components of the
    penultimate layer) are projected on that direction, and when the projection is bimodal
    (:func:`bimodality_coefficient` at least ``expand_min_bimodality``) the seed's side of Otsu's split is taken.
    A threshold on the group's share alone was measured and dropped: a clean class's group can be 34 % of it
    (WaNet, draw 3: 589 clean samples seeded, 6 % of the clean set flagged).

    With the pixel ``embedding`` (:func:`qtclean.content.pixel_embedding`) a bimodal group must also be
    relabelled content: at most ``content_max_agreement`` of its pixel neighbours carry its label (where pixels
    carry labels at all, ``content_min_baseline``; ``baseline``: :func:`qtclean.content.label_agreement`, if the
    caller has it already). A clean class can be bimodal too: Fashion-MNIST's bags (0.49-0.58
    over seven runs) were expanded twice, and that half of the class was flagged; its pixel agreement was 0.69-0.78,
    the true expansions' 0.02-0.03.

    A group that leaves fewer than ``min_class_remainder`` times the median class size outside it
    (``left_outside``) is the class itself, not a trigger's poison, which an attack adds to its class's own samples
    (the accepted true groups left 1.07-1.87 median classes). Measured: at grid and ramp all-to-all (scan seed 1) a
    clean footwear class's 1-21 fastest samples pointed at 88-90 % of it; its pixel test passed, since a group that
    is most of its class has other classes as its neighbours, and the seed grew into the whole class.
    """
    mask = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    info: dict[int, dict] = {}
    if cfg.expand_min_bimodality <= 0:
        return mask, info
    check_content = embedding is not None and cfg.content_max_agreement > 0
    if check_content:
        from .content import label_agreement

        if baseline is None:
            baseline = label_agreement(embedding, labels.cpu())
        check_content = baseline >= cfg.content_min_baseline
    fewest_left = fewest_left_in_class(labels, classes.numel(), cfg)
    for c, idx in class_indices(labels, classes.numel(), min_size=4):
        seed = pre_mask[idx]
        if not bool(classes[c]) or not bool(seed.any()) or bool(seed.all()):
            continue
        reduced = principal_components(features[idx], dims)
        direction = reduced[seed].mean(dim=0) - reduced[~seed].mean(dim=0)
        norm = float(direction.norm())
        if norm <= 1e-12:
            continue
        along = reduced @ (direction / norm)
        threshold, separation = otsu_threshold(along)
        side = along > threshold  # the seed's side: the direction points from the rest towards it
        bimodality = bimodality_coefficient(along)
        accepted = bimodality >= cfg.expand_min_bimodality
        info[c] = {"seed": int(seed.sum()), "group": int(side.sum()), "share": round(float(side.float().mean()), 4),
                   "separation": round(separation, 4), "bimodality": round(bimodality, 4)}
        left = idx.numel() - int(side.sum())
        if accepted and left < fewest_left:  # the group is the class itself
            info[c]["left_outside"] = left
            accepted = False
        if accepted and check_content:
            from .content import group_content

            agreement = group_content(embedding, labels.cpu(), idx[side], c, classes.numel())["agreement"]
            info[c]["pixel_agreement"] = agreement
            accepted = agreement <= cfg.content_max_agreement
        info[c]["accepted"] = accepted
        if accepted:
            mask[idx[side]] = True
    return mask, info


MAX_SEED_WEIGHT = 100.0  # a one-sample seed (min_seed_share 0) must not dominate a batch's gradient


def seed_weights(labels: torch.Tensor, pre_mask: torch.Tensor, seeded: torch.Tensor, num_classes: int,
                 cfg: QTConfig) -> torch.Tensor:
    """(N,) loss weights: 1, except the pre-quarantine samples of a seeded class, which get
    ``seed_weight_share * (class size - seed size) / seed size`` clipped to 1..100. A large seed (patch triggers:
    most of the poison) keeps weight 1; a small pure seed is not outvoted by the unseeded poison that shares its
    trigger."""
    weights = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    if cfg.seed_weight_share <= 0:
        return weights
    counts = torch.bincount(labels, minlength=num_classes).float()
    seeds = torch.bincount(labels[pre_mask], minlength=num_classes).float()
    per_class = torch.clamp(cfg.seed_weight_share * (counts - seeds) / seeds.clamp(min=1), min=1.0,
                            max=MAX_SEED_WEIGHT)
    per_class[~seeded] = 1.0
    weights[pre_mask] = per_class[labels[pre_mask]]
    return weights


def release_seed_weights(weights: torch.Tensor, labels: torch.Tensor, pre_mask: torch.Tensor,
                         members: torch.Tensor, num_classes: int, cfg: QTConfig) -> torch.Tensor:
    """``weights`` with the seed of every class whose quarantine now holds over ``seed_weight_until`` x its seed
    back at 1 (the seed has started the growth; from here the class's members decide, not a heavy minority)."""
    if cfg.seed_weight_until <= 0:
        return weights
    seeds = torch.bincount(labels[pre_mask], minlength=num_classes)
    held = torch.bincount(labels[members], minlength=num_classes)
    done = (held > cfg.seed_weight_until * seeds) & (seeds > 0)
    out = weights.clone()
    out[pre_mask & done[labels]] = 1.0
    return out


def soft_target_loss(logits: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) cross-entropy against the soft target (1 - eps on y, eps on y + K), paper Eq. 3."""
    logp = F.log_softmax(logits, dim=1)
    lp_src = logp.gather(1, labels[:, None]).squeeze(1)
    lp_q = logp.gather(1, (labels + num_classes)[:, None]).squeeze(1)
    return -((1.0 - eps) * lp_src + eps * lp_q)


def quarantine_probability(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           any_class: bool = False) -> torch.Tensor:
    """(N,) probability mass on each sample's quarantine class y + K: the score, 0..1, higher = more suspect. With
    ``any_class``, a sample in another class's quarantine class (:func:`in_another_quarantine_class`) scores the
    mass on every quarantine class of the classes that quarantine. Why not every sample: each clean sample is
    trained with ``eps_min`` on its own quarantine class, so a clean image between two classes carries that share
    on its neighbour's too, and summing it for all raised clean scores above the poison of classes with no
    quarantine (badnets-a2a, scan seed 1: AUROC 0.9088 -> 0.8968)."""
    probs = F.softmax(logits.float(), dim=1)
    own = probs.gather(1, (labels + num_classes)[:, None]).squeeze(1)
    if not any_class:
        return own
    quarantining = quarantining_classes(logits, labels, num_classes)
    elsewhere = in_another_quarantine_class(logits, labels, num_classes)
    return torch.where(elsewhere, probs[:, num_classes:][:, quarantining].sum(dim=1), own)


def is_quarantined(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   any_class: bool = False) -> torch.Tensor:
    """(N,) bool: the model's prediction is the sample's quarantine class (the flag). With ``any_class``, a sample
    of a class that quarantines (:func:`quarantining_classes`) is flagged when predicted in any such class's
    quarantine class."""
    own = logits.argmax(dim=1) == labels + num_classes
    return own | in_another_quarantine_class(logits, labels, num_classes) if any_class else own


def in_another_quarantine_class(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) bool: samples of a class that quarantines (:func:`quarantining_classes`) predicted in another such
    class's quarantine class."""
    predicted = logits.argmax(dim=1)
    quarantining = quarantining_classes(logits, labels, num_classes)
    into = quarantining[(predicted - num_classes).clamp(min=0)] & (predicted >= num_classes)
    return quarantining[labels] & into & (predicted != labels + num_classes)


def quarantining_classes(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) bool: the classes with a sample predicted in its own quarantine class."""
    own = logits.argmax(dim=1) == labels + num_classes
    return torch.bincount(labels[own], minlength=num_classes) > 0


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
            or len(classes) >= MANY_TARGET_CLASS_SHARE * num_classes):
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


def demote_withdrawn_scores(scores: torch.Tensor, flagged: torch.Tensor, labels: torch.Tensor,
                            info: dict[int, dict], content_seeded: torch.Tensor, scale: float) -> torch.Tensor:
    """The scores (N,) with those of the unflagged samples of every withdrawn class (``info``, from
    :func:`withdraw_ambiguous` and :func:`withdraw_unlike_target`) that nothing vouches for multiplied by ``scale``
    (the order within the class stays); such a class gets ``info[c]["scores_scaled"] = True``. Nothing vouches for
    a withdrawn class when the content seed did not seed it (``content_seeded``, (K,) bool) and the final
    ``flagged`` lie in other classes.

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
            or int(flagged_classes.sum()) >= MANY_TARGET_CLASS_SHARE * num_classes):
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


TRIGGER_FREE_MIN_OWN_SHARE = 0.3  # a flag whose pixel neighbours outside the flags carry its label more than this
TRIGGER_FREE_RELABELLED_QUANTILE = 0.25  # ... and the bar for a flag that looks relabelled: poison looks so too


def withdraw_trigger_free_flags(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                                num_classes: int, cfg: QTConfig, baseline: float) -> tuple[torch.Tensor, dict]:
    """The flags (N,) without, in a many-target attack (at least ``MANY_TARGET_CLASS_SHARE`` of the classes
    flagged) whose flags carry the trigger in their pixels, those that look like images of their own class (their
    pixel neighbours outside the flags carry their label more than ``TRIGGER_FREE_MIN_OWN_SHARE`` of the time) and
    whose pixel residual points the trigger's way (:func:`_trigger_cosine`) less than the
    ``trigger_free_quantile`` of the flagged classes' unflagged samples does, and those that look relabelled whose
    residual points that way less than ``TRIGGER_FREE_RELABELLED_QUANTILE`` of them does (away from the trigger,
    more than most clean images); and what it did, for run.json. The flags carry the trigger when their median
    cosine is above the first bar: not so for a trigger that moves
    (a roaming patch) or that depends on the image (a gamma filter), whose flags are left as they are. Nothing
    either where pixel neighbours say little about labels (``baseline`` under ``content_min_baseline``), the
    quantile is 0, or the flagged classes have no unflagged sample.

    Why: in a many-target attack the quarantines of easy classes grow into their clean samples (trousers beside
    their poison), and the own-looking rule (:func:`own_looking_by_score`) cannot judge them there, having no clean
    classes to set its bar by. A relabelled image looks like its source class and, minus that content, leaves the
    trigger; a clean sample the quarantine took looks like its own class and leaves none. A flag that looks
    relabelled must point away from the trigger to go, since a faint trigger's poison may leave little of it
    (a ramp: 41 poisoned among the 99 such flags under the first bar). Measured (20k,
    all-to-all, faint triggers, CPU, 12 runs replayed): FPR 1.57 -> 0.71 % and 1.52 -> 0.63 % where it was over
    1 %, less elsewhere, at the cost of at most four poisoned images a run (a faint ramp's, the trigger whose
    residual separates least); docs/benchmarks.md, "Flags without the trigger in a many-target attack".
    """
    from .content import own_label_share_outside

    info: dict = {}
    if cfg.trigger_free_quantile <= 0 or baseline < cfg.content_min_baseline:
        return flagged, info
    device = flagged.device
    embedding, labels, flagged = embedding.cpu(), labels.cpu(), flagged.cpu()
    flagged_classes = torch.bincount(labels[flagged], minlength=num_classes) > 0
    reference = torch.nonzero(~flagged & flagged_classes[labels]).flatten()
    if int(flagged_classes.sum()) < MANY_TARGET_CLASS_SHARE * num_classes or reference.numel() == 0:
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
    gone = flags[((flag_cosine < bar) & own_looking[flags]) | (flag_cosine < relabelled_bar)]
    out = flagged.clone()
    out[gone] = False
    counts = torch.bincount(labels[gone], minlength=num_classes)
    info["withdrawn_per_class"] = {str(c): int(counts[c]) for c in torch.nonzero(flagged_classes).flatten().tolist()}
    return out.to(device), info


def flag_by_trigger_residual(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                             num_classes: int, cfg: QTConfig,
                             baseline: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The flags (N,) with, in a many-target attack (at least ``MANY_TARGET_CLASS_SHARE`` of the classes flagged,
    not all), the members of each class without flags whose pixel residual (:func:`qtclean.content.pixel_residuals`)
    points the way the flagged classes' residuals do: their cosine with the trigger's direction (the mean over
    flagged classes of their flags' mean residual, each scaled to length 1) above the ``trigger_residual_quantile``
    of the unflagged samples of the flagged classes; the score (N,) each added flag earns, 0 elsewhere; and what it
    did, for run.json. Nothing where pixel neighbours say little about labels (``baseline`` under
    ``content_min_baseline``), the quantile is 0, or the flagged classes have no unflagged sample.

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
    if int(flagged_classes.sum()) < MANY_TARGET_CLASS_SHARE * num_classes or bool(flagged_classes.all()):
        return flagged.to(device), no_scores, info
    reference = torch.nonzero(~flagged & flagged_classes[labels]).flatten()
    if reference.numel() == 0:  # the flagged classes flagged whole: no clean sample to set the bar by
        return flagged.to(device), no_scores, info
    not_lookalike = flagged
    if cfg.residual_untriggered_lookalikes:
        carriers = _large_trigger_carriers(embedding, labels, flagged, flagged_classes, cfg.trigger_residual_quantile)
        not_lookalike = flagged | carriers
        info["lookalikes_left_out"] = int(carriers.sum())
    cosine = _trigger_cosine(embedding, labels, flagged, flagged_classes, not_lookalike=not_lookalike)
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
    info["added_per_class"] = {str(c): int(counts[c]) for c in torch.nonzero(~flagged_classes).flatten().tolist()}
    return out.to(device), added_scores.clamp(max=1.0).to(device), info


RESIDUAL_MIN_RELABELLED_SHARE = 0.5  # of a class's flags that look like other classes: poison, not a clean group
FLAGGED_CLASS_RESIDUAL_QUANTILE = 0.9999  # of the classes without flags: the bar in a class whose quarantine is
# kept. Stricter than the many-target rule's: here the class is mostly clean, and usually nothing is left to find


def flag_residual_in_flagged_classes(embedding: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor,
                                     num_classes: int, cfg: QTConfig,
                                     baseline: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The flags (N,) with, where fewer than ``MANY_TARGET_CLASS_SHARE`` of the classes hold flags (an attack with
    one target or a few), in each flagged class whose flags mostly look like images of other classes (at least
    ``RESIDUAL_MIN_RELABELLED_SHARE`` of them; their pixel neighbours outside the flags carry their label at most
    ``TRIGGER_FREE_MIN_OWN_SHARE`` of the time), the unflagged members whose pixel residual points the way those
    flags' residuals do (:func:`_trigger_cosine`, look-alikes from every unflagged sample) further than the
    ``FLAGGED_CLASS_RESIDUAL_QUANTILE`` of the samples of the classes without flags (measured again without the
    images it finds among their look-alikes), where those flags' own median cosine is above that bar (the trigger
    is in their pixels); the score (N,) each added flag earns, 0 elsewhere; and, per flagged class, what it saw,
    for run.json. Nothing where the option is off, pixel neighbours say little about labels (``baseline`` under
    ``content_min_baseline``), or no class is without flags.

    Why: a quarantine can settle on part of its poison (a faint grid blended into 10 % of the set: 1,430 of 2,000
    found) while the rest of the target class's poison still carries the trigger in its pixels. A relabelled image
    minus its look-alikes in other classes leaves the trigger, and the flags show which way that is; the clean
    images of the classes without flags set the bar, as the many-target rule (:func:`flag_by_trigger_residual`)
    has the flagged classes' clean images do. The bar on the flags themselves keeps it out where the trigger is not
    a shared pattern of pixels (a warp, an adaptive patch: the flags' median under the bar), and the look of the
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
    if not bool(flagged_classes.any()) or int(flagged_classes.sum()) >= MANY_TARGET_CLASS_SHARE * num_classes:
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
        bar = float(torch.quantile(cosine(reference), FLAGGED_CLASS_RESIDUAL_QUANTILE))
        flags_median = float(cosine(relabelled).median())
        candidates = torch.nonzero(~flagged & (labels == c)).flatten()
        cosines = cosine(candidates)  # their look-alikes are of other classes: the same against either bar
        if flags_median > bar and bool((cosines > bar).any()):
            # The bar again without the poison found above it among the look-alikes: a clean image of a source
            # class has the poison made from its look-alikes as its own nearest, which leaves it minus the trigger.
            found = flagged.clone()
            found[candidates[cosines > bar]] = True
            bar = float(torch.quantile(
                _trigger_cosine(embedding, labels, found, this_class, estimate_from=estimate_from)(reference),
                FLAGGED_CLASS_RESIDUAL_QUANTILE))
        info[str(c)].update(bar_cosine=round(bar, 4), flags_median_cosine=round(flags_median, 4))
        if flags_median <= bar:
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
    if int((flagged_per_class > 0).sum()) >= MANY_TARGET_CLASS_SHARE * k:
        share = torch.zeros_like(share)
    probability = scores.clamp(0.0, 1.0)
    below = (0.5 * (share[labels] + (1 - share[labels]) * probability)).clamp(max=UNFLAGGED_SCORE_CEILING)
    return torch.where(flagged, 0.5 + 0.5 * probability, below), share


def otsu_threshold(values: torch.Tensor) -> tuple[float, float]:
    """Otsu's threshold on 1-D values and the share of variance it explains (0..1, 1 = two clean modes)."""
    v, _ = torch.sort(values.double())
    n = v.numel()
    if n < 2:
        return float("inf"), 0.0
    total_var = v.var(unbiased=False)
    if float(total_var) <= 1e-12:
        return float("inf"), 0.0
    csum = torch.cumsum(v, 0)
    k = torch.arange(1, n, device=v.device, dtype=v.dtype)  # size of the lower group
    mean_lo = csum[:-1] / k
    mean_hi = (csum[-1] - csum[:-1]) / (n - k)
    between = (k / n) * ((n - k) / n) * (mean_hi - mean_lo) ** 2
    best = int(torch.argmax(between))
    thr = float((v[best] + v[best + 1]) / 2)
    return thr, float(between[best] / total_var)


def init_eps(pre_mask: torch.Tensor, cfg: QTConfig, in_seeded_class: torch.Tensor | None = None) -> torch.Tensor:
    """Starting eps (N,): eps_max for pre-quarantine samples, eps_init for the rest of their classes, eps_min for
    classes without a quarantine (``in_seeded_class`` False; see :func:`seeded_classes`): their eps can never
    grow, and on clean data a few epochs at eps_init flagged ~9 % of a 1,000-image set by argmax (measured)."""
    eps = torch.full(pre_mask.shape, cfg.eps_init, dtype=torch.float32, device=pre_mask.device)
    if in_seeded_class is not None:
        eps[~in_seeded_class] = cfg.eps_min
    eps[pre_mask] = cfg.eps_max
    return eps


def membership(logits: torch.Tensor, labels: torch.Tensor, pre_mask: torch.Tensor, num_classes: int,
               cfg: QTConfig) -> torch.Tensor:
    """(N,) bool: in quarantine this epoch (predicted quarantine class, and the class is seeded)."""
    in_q = is_quarantined(logits, labels, num_classes)
    return in_q & seeded_classes(labels, pre_mask, num_classes, cfg)[labels]


def seeded_classes(labels: torch.Tensor, pre_mask: torch.Tensor, num_classes: int, cfg: QTConfig) -> torch.Tensor:
    """(K,) bool: classes that get a quarantine. A class needs ``min_pre_share`` of the pre-quarantine set and
    ``min_seed_share`` of its own samples in it: a handful of clean outliers (what a clean set's pre-quarantine
    set holds) must not start a quarantine that the feedback loop then grows into an easy class's core."""
    if cfg.min_pre_share <= 0 and cfg.min_seed_share <= 0:
        return torch.ones(num_classes, dtype=torch.bool, device=labels.device)  # the paper: every class
    pre_counts = torch.bincount(labels[pre_mask], minlength=num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    seeded = pre_counts >= max(cfg.min_pre_share * int(pre_mask.sum()), 1)
    return seeded & (pre_counts >= cfg.min_seed_share * counts)


def is_stable(*, epoch: int, changed: int, num_samples: int, released: bool, cfg: QTConfig,
              any_seeded: bool = True) -> bool:
    """Whether a quarantine epoch counts towards early stopping.

    Stable = past the dynamic epochs (members then sit at eps_max), no release this epoch, and at most
    ``early_stop_tolerance`` of the samples changed membership. After ``early_stop_patience`` such epochs in a row
    the flags are taken as final. Not required: that every non-member's eps has decayed to eps_min; on the demo
    that alone kept training 6 more epochs with membership unchanged. benchmarks/ measure flags with and without.
    """
    if (epoch <= cfg.epochs_dynamic and any_seeded) or released:  # no seeded class: no eps can grow
        return False
    return changed <= cfg.early_stop_tolerance * num_samples


def seed_growth(labels: torch.Tensor, seed: torch.Tensor, held: torch.Tensor, num_classes: int) -> float:
    """The largest ratio, over the classes with a seed, of the samples their quarantine holds (``held``) to their
    seed (``seed``); 0 when no class has a seed."""
    seeds = torch.bincount(labels[seed], minlength=num_classes).float()
    if not bool((seeds > 0).any()):
        return 0.0
    ratio = torch.bincount(labels[held], minlength=num_classes).float() / seeds.clamp(min=1)
    return float(ratio[seeds > 0].max())


def peak_growth(epochs: list[dict], seed_size: int, after_epoch: int) -> float:
    """The largest ratio of the whole quarantine (``quarantined``) to the whole seed (``seed_size``) over the
    quarantine ``epochs`` (one pass's per-epoch statistics) numbered above ``after_epoch``; 0 without a seed.

    Why the whole and not a class: a many-target attack seeds each class with a small cluster whose quarantine
    swings by a few times its size (all-to-all BadNets: one class at 2.3x its seed, the whole at 1.1x), which a
    second pass lowered (see :func:`needs_second_pass`)."""
    if seed_size <= 0:
        return 0.0
    sizes = [e["quarantined"] for e in epochs if e["epoch"] > after_epoch]
    return max(sizes, default=0) / seed_size


def needs_second_pass(*, last_changed: int, num_samples: int, growth: float, cfg: QTConfig) -> bool:
    """Whether the quarantine is run a second time (``second_pass_epochs``): its membership was still changing at
    the last epoch (more than ``early_stop_tolerance`` of the samples) and some class's quarantine had grown to at
    least ``second_pass_min_growth`` times its seed (:func:`seed_growth`; with ``second_pass_peak_growth``, or the
    whole quarantine at its largest after the dynamic epochs, :func:`peak_growth`: the caller passes the larger).

    Why: a quarantine that settles (every patch trigger, IAB, most ISSBA draws) has found its poison; one that
    still swings at its last epoch after growing far past its seed grew from a seed too small for the trigger
    (ISSBA draw 2: 846 seeds, 1,762 held, 53-180 samples changing per epoch at the end, 85.7 % of the poison). Its
    flags are a far larger and still pure seed, from which a fresh quarantine converges. A quarantine that swings
    without growing (all-to-all: its feature seeds are whole clusters already, 2,015 seeds, 1,910 held) has no
    better seed to offer: a second pass there lowered AUROC from 0.9905 to 0.9745 (measured).
    """
    if cfg.second_pass_epochs <= 0:
        return False
    return last_changed > cfg.early_stop_tolerance * num_samples and growth >= cfg.second_pass_min_growth


def relabelled_flags(embedding: torch.Tensor, labels: torch.Tensor, flags: torch.Tensor, seed: torch.Tensor,
                     num_classes: int, cfg: QTConfig, baseline: float) -> tuple[torch.Tensor, dict[str, dict]]:
    """The second pass's seed, and per class with flags what it saw: the ``flags`` (N,) bool whose pixel
    neighbours (``embedding``, among every other sample; with ``second_pass_seed_trigger_out``, with a pattern of
    the class's flags' own projected out: ``pattern_gap``) carry their label at most
    ``second_pass_seed_max_own_share`` of the time, except in a class whose flags look like relabelled images as a
    group (their neighbours outside it carry their label at most ``content_max_agreement`` of the time,
    :func:`qtclean.content.group_content`) where that leaves fewer than the first pass's ``seed`` (N,) bool held
    (its flags pass on whole: ``whole``); per class the group's content and the counts before and after. Every
    flag where pixel neighbours carry little about labels (``baseline`` under ``content_min_baseline``) or the
    share is 1.

    Why: a relabelled image's neighbours are its source class (and a few other poisoned copies), a clean sample's
    are its own class, so a quarantine that grew into clean samples of its class passes its poison on and leaves
    those behind. Measured (IAB, 20k, CPU): the first pass's 3,258 flags held 1,290 clean T-shirts; at most half
    the neighbours keeps 1,500 of the 1,968 poisoned and 68 of the clean. Poisoned images that look like their
    new class are cut too, so a pure quarantine's seed shrinks (ISSBA draw 3: TPR 100 -> 96.3 %). Why the
    exception: a trigger that dominates the pixels (a bright patch on small, plain images) makes the poisoned
    copies each other's neighbours, all with the target's label, so the cut would leave less than the first pass
    started from, while the group as a whole has other classes around it (the tests' 3-class set: agreement
    0.105). A false quarantine in a clean class (ISSBA draw 4: 512 trousers, agreement 0.48) or one grown into
    clean samples (IAB: 0.17) is cut all the same. Why the shared pattern goes first: when the quarantine has not
    taken all of such a trigger's poison, the poison left outside is each flag's neighbour, with the target's
    label, and the group looks like its class (frame, GPU: agreement 1.0, the seed cut to nothing).
    docs/benchmarks.md, "Second pass seeded by its relabelled flags" and "The second pass's seed without the
    flags' shared pattern".
    """
    from .content import group_content, own_label_share, without_shared_residual

    info: dict[str, dict] = {}
    if cfg.second_pass_seed_max_own_share >= 1 or baseline < cfg.content_min_baseline or not bool(flags.any()):
        return flags, info
    device = flags.device  # the neighbour searches run where the embedding is (the CPU), so their indices too
    embedding, labels, flags, seed = embedding.cpu(), labels.cpu(), flags.cpu(), seed.cpu()
    members = torch.nonzero(flags).flatten()
    out = torch.zeros_like(flags)
    for c in torch.unique(labels[flags]).tolist():
        in_class = members[labels[members] == c]
        # a class's flags are judged by their content: with a pixel pattern of their own taken out (a trigger that
        # dominates the pixels makes poisoned copies each other's neighbours, the unflagged ones vouching for the
        # flagged), or as they are with second_pass_seed_trigger_out off
        judged_on, gap = embedding, None
        if cfg.second_pass_seed_trigger_out:
            rest = torch.nonzero(~flags & (labels == c)).flatten()
            judged_on, gap = without_shared_residual(embedding, labels, in_class, flags, rest)
        share = own_label_share(judged_on, labels, in_class)
        out[in_class[share <= cfg.second_pass_seed_max_own_share]] = True
        stats = group_content(embedding, labels, in_class, c, num_classes)
        kept = int(out[in_class].sum())
        looks_relabelled = stats["agreement"] <= cfg.content_max_agreement  # its neighbours mostly other classes
        whole = looks_relabelled and kept < int((seed & (labels == c)).sum())
        if whole:
            out[in_class], kept = True, in_class.numel()
        info[str(c)] = {**stats, "flags": in_class.numel(), "seed": kept, "whole": whole,
                        **({} if gap is None else {"pattern_gap": round(gap, 4)})}
    return out.to(device), info


def second_pass_config(cfg: QTConfig, residual_seeded: bool = False) -> QTConfig:
    """The settings of the second quarantine pass: ``second_pass_epochs`` epochs, ``second_pass_dynamic`` of them
    dynamic, no further pass; where the trigger residual seeded it (``residual_seeded``), classes seeded as
    :func:`residual_seed_config` says."""
    second = replace(cfg, epochs_quarantine=cfg.second_pass_epochs, epochs_dynamic=cfg.second_pass_dynamic,
                     second_pass_epochs=0)
    return residual_seed_config(second) if residual_seeded else second


def residual_seed_config(cfg: QTConfig) -> QTConfig:
    """``cfg`` as :func:`seeded_classes` judges the classes of a second pass the trigger residual seeds: with
    ``residual_seed_by_own_share``, by ``min_seed_share`` of each class's own samples alone (``min_pre_share`` 0).

    Why: ``min_pre_share`` keeps a clean set's handful of outliers from starting a quarantine, measured against
    the whole seed; in a many-target attack the other classes' seeds hold most of the set's poison, so a faint
    trigger's class whose residual flags are a few percent of that whole (a brightness ramp all-to-all: 67 of the
    shirts' 205 poisoned images against a ~1,800-sample seed) was left out of the second pass, and its poison was
    never learned (AUROC 0.968-0.971 at scan seeds 1 and 2; with this rule 0.998-0.999, 99.9-100 % found, FPR
    unchanged; docs/benchmarks.md, "A class the trigger residual seeds, judged by its own share"). The residual's
    flags are trigger evidence, not a loss outlier, and 2 % of a class (``min_seed_share``) still bars a stray
    few."""
    return replace(cfg, min_pre_share=0.0) if cfg.residual_seed_by_own_share else cfg


def update_eps(eps: torch.Tensor, *, epoch: int, logits: torch.Tensor, labels: torch.Tensor,
               pre_mask: torch.Tensor, num_classes: int, cfg: QTConfig,
               members: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """New eps (N,) after quarantine epoch ``epoch`` (1-based), from the end-of-epoch eval logits.

    ``members``: this epoch's :func:`membership`, if the caller already has it (computed here otherwise).

    Returns the new eps and this epoch's statistics (quarantined count per class, releases).
    """
    k = num_classes
    q = quarantine_probability(logits, labels, k)
    in_q = membership(logits, labels, pre_mask, k, cfg) if members is None else members
    new = eps.clone()
    # Evidence: the model puts more on the quarantine class than the starting target asked for. A sample on the
    # y / y+K boundary (q ~ 0.5, what clean samples of a seeded class show) is a member but not evidence; letting
    # it grow is the feedback loop that swallowed a clean target class (measured, docs/benchmarks.md).
    evidence = in_q & (q >= cfg.grow_threshold) if cfg.grow_threshold > 0 else in_q
    dynamic = epoch <= cfg.epochs_dynamic
    if dynamic:
        new[evidence] = new[evidence] + cfg.eps_step
        new[pre_mask] = cfg.eps_max
    else:
        rest = torch.full_like(new, cfg.eps_min) if cfg.final_eps == "jump" else new - cfg.eps_step
        if cfg.grow_threshold > 0:  # hold only members whose eps grew; late evidence still grows
            held = in_q & (eps > cfg.eps_init + 1e-6)
            rest = torch.where(evidence, new + cfg.eps_step, rest)
        else:  # the paper: every member is held
            held = in_q
        new = torch.where(held, torch.full_like(new, cfg.eps_max), rest)
    counts = torch.bincount(labels, minlength=k)
    q_counts = torch.bincount(labels[in_q], minlength=k)
    releases = []
    for c in torch.nonzero(q_counts > cfg.release_threshold * counts).flatten().tolist():
        members = labels == c
        if cfg.release == "split":
            logit_q = torch.logit(q[members].clamp(1e-6, 1 - 1e-6))
            thr, separation = otsu_threshold(logit_q)
            if separation >= cfg.split_separation:
                low = members.clone()
                low[members] = logit_q <= thr
                new[low] = cfg.eps_min
                releases.append({"class": c, "rule": "split", "released": int(low.sum()),
                                 "kept": int((members & ~low).sum()), "separation": round(separation, 4)})
                continue
        released = members & in_q
        new[released] = cfg.eps_min
        releases.append({"class": c, "rule": "all", "released": int(released.sum()), "kept": 0})
    new = new.clamp(cfg.eps_min, cfg.eps_max)
    stats = {
        "quarantined": int(in_q.sum()),
        "quarantined_per_class": q_counts.tolist(),
        "evidence": int(evidence.sum()),  # members whose q reached grow_threshold: the ones whose eps may grow
        "releases": releases,
        "mean_eps": round(float(new.mean()), 4),
    }
    return new, stats
