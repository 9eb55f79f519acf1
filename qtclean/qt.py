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
- after training, step 3 reads the model out: it checks the flags (withdraws a quarantine that is a continuum of
  scores, completes one that stopped short) and ranks the scores, flags first. Those rules live in
  :mod:`qtclean.readout`; this module keeps steps 1 and 2 and the settings of all three (``QTConfig``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

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
                                         a pass seeded with them learns it. See ``readout.flag_by_trigger_residual``.
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
                                         ``readout.withdraw_ambiguous``.
    min_class_remainder : float          a seed group or a class's flags must leave at least this share of the
                                         median class size outside them in their class (0 = no such bound, the
                                         paper): an attack adds its poison to its target, whose own samples stay
                                         (measured, 20k: flags leave 1.04-1.53 times the median, BadNets 10-30 %;
                                         accepted seed expansions 1.07-1.87); a group that is the class itself is
                                         a clean class taken whole (grid and ramp all-to-all, scan seed 1:
                                         expansions leaving 0.09-0.13, flags 0.09-0.10). An expansion that does not
                                         is rejected (:func:`expand_seed`); flags that do not are withdrawn
                                         (``readout.withdraw_ambiguous``).
    content_seed_min_held : float        a class that a content seed started is withdrawn (and so flagged by that
                                         seed, ``content_fallback``) when its final quarantine holds less than
                                         this share of the seed (0 = never, the paper): the seed is evidence of
                                         its own, and a quarantine that let most of it go did not learn the
                                         trigger, even where it ends crisp. Measured (20k, replays): a held-out
                                         invisible frequency trigger whose quarantine swung to 3 % of its seed in
                                         the last epoch, 3.3 -> 97.4 %. Why a quarter: a seed at 0.5 % poison is
                                         half clean pixel outliers, which a sound quarantine leaves (BadNets 0.5
                                         %: 46 % held; at 0.5 its FPR 0.26 -> 1.56 %). See
                                         ``readout.withdraw_ambiguous``.
    keep_relabelled_quarantine : bool    ... except a class without content-seed members whose flags, as a group,
                                         look like images relabelled from every other class (the content seed's
                                         test; at least ``CONTENT_MIN_CLASS_SHARE`` of the class): the continuum
                                         can lie in the class's clean part alone while the quarantine holds the
                                         poison. Measured (20k, a held-out stripes blend): 0 flagged -> 99.2 % at
                                         0.63 % FPR; no run that met the goal changes. See
                                         ``readout.withdraw_ambiguous``.
    withdraw_unlike_target : bool        withdraw a class's flags when they do not look like relabelled images
                                         (pixel neighbours spread over every other class) while another class's
                                         do: a false quarantine beside an all-to-one attack's target. See
                                         ``readout.withdraw_unlike_target``.
    withdraw_off_trigger : bool          in a many-target attack whose classes' flags mostly carry one trigger,
                                         withdraw a class whose flags carry it no more than the rest of the class:
                                         a false quarantine among the targets. Measured (20k, a faint grid
                                         all-to-all): 63.3 % found at 4.03 % FPR -> 98.9 % at 0.96 %. See
                                         ``readout.withdraw_off_trigger_classes``.
    withdrawn_score_scale : float        a withdrawn class that nothing vouches for (no content seed in it,
                                         flags in other classes) keeps this share of its unflagged samples'
                                         scores (1 = the model's quarantine probability as it is), so that a
                                         withdrawn false quarantine no longer ranks its clean samples above the
                                         poison of a quarantine that stood. See ``readout.demote_withdrawn_scores``.
    score_outlier_quantile : float       in a class with flags, an unflagged sample whose score stands out from
                                         its class as far as only 1 - this share of the samples of the classes
                                         without flags do, and whose pixel neighbours outside the flags mostly
                                         carry other labels, is flagged too (0 = off, the paper): a quarantine
                                         that learned the trigger on most of its poison leaves the rest with
                                         raised scores, not flags. Measured (GPU, four scan seeds, and CPU, 20k):
                                         5 runs from misses into hits (WaNet 90.7 / 94.3 -> 96.8 / 96.2 %, a
                                         scattered-pixels trigger 92.7 -> 97.0 %, BadNets 0.5 % 93 -> 100 %,
                                         adaptive-blend 88.6 -> 95.7 %), none the other way; FPR +0.05 % (median
                                         of 105 saved runs; at most +0.41 %). See ``readout.flag_score_outliers``.
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
                                         WaNet keeps 75 of its 107 clean ones. See ``readout.own_looking_by_score``.
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
                                         in the classes no seed reached. See ``readout.flag_by_trigger_residual``.
    residual_untriggered_lookalikes : bool  ... and its look-alikes leave out the images of classes without flags
                                         that carry a large trigger themselves (further along the flags' plain
                                         pixel direction from their class's median than the same quantile of the
                                         reference; False = any unflagged image): under a frame, the poison of
                                         such classes are each other's nearest images and leave no trigger.
    residual_by_quarantined_classes : bool  ... and counts as a many-target attack one whose quarantine flagged
                                         half of the classes or more before step 3 withdrew any, less those it
                                         judged false quarantines (unlike the target, without the trigger;
                                         False = by the flags left, as before session 34): withdrawals can leave
                                         under half flagged (a faint stripes blend at scan seed 3: 18.9 -> 99.7 %
                                         at 0.54 % FPR; of 50 all-to-all scans, five others change, all missing
                                         the goal either way, two with more FPR).
    residual_in_flagged_classes : bool   with flags in fewer than half of the classes, a flagged class's unflagged
                                         member whose residual points the way its flags' do, further than 99.99 %
                                         of the classes without flags, is flagged, where the flags look like other
                                         classes and carry the trigger in their pixels (False = not, the paper):
                                         poison a settled quarantine left, clean-label poison beside its few
                                         flags. See ``readout.flag_residual_in_flagged_classes``.
    trigger_free_quantile : float        where the flags carry their trigger in their pixels, a flag that looks
                                         like its own class and whose pixels point the trigger's way less than
                                         this quantile of the flagged classes' unflagged samples is withdrawn (0 =
                                         off, the paper): a clean sample a target's quarantine took. See
                                         ``readout.withdraw_trigger_free_flags``.
    trigger_free_any_target : bool       the trigger-free rule in any attack (False = only where half of the
                                         classes or more are flagged, a many-target attack, as before session 35):
                                         an all-to-one quarantine grows into clean images of its target too.
    trigger_free_confidence_quantile :   ... and a flag that looks like another class and points the trigger's way
        float                            less than that quantile is withdrawn where the model gives its label
                                         (its class and quarantine class) a probability under this quantile of
                                         the flags that carry the trigger (0 = off, the paper): a clean image of
                                         the target that looks like another class.
    residual_completion_quantile : float in a many-target attack, a withdrawn class the trigger residual
                                         re-flagged also flags its members that the withdrawn quarantine scores at
                                         least this quantile of the residual's flags there, that look like images
                                         of other classes and whose pixels point the trigger's way (0 = off, the
                                         paper). See ``readout.complete_residual_flags``.
    lookalike_margin_quantile : float    in a class whose quarantine step 3 kept, its unflagged members that look
                                         like images of other classes and that the model labels with a margin at
                                         least this quantile of the class's own-looking members' margins are
                                         flagged, where most of its strict look-alikes are that sure (0 = off, the
                                         paper): poison the model learned by its trigger. Measured (replays of six
                                         GPU IAB runs whose quarantine settled short): 69.4-82.7 -> 97.2-98.2 %.
                                         See ``readout.flag_confident_lookalikes``.
    lookalike_pixel_test : bool          ... its look-alikes by the strict test or the score rules' pixel test
                                         (False = the strict test alone: IAB 92.3-94.9 %, fewer clean added).
    content_fallback : bool              a withdrawn class that the content seed seeded (``content_max_agreement``)
                                         is flagged by that seed instead: its members whose pixels look like
                                         images of other classes (False = nothing, as before). Measured:
                                         withdrawn classes went from nothing to 76-78 % of their poison found at
                                         0.3-0.4 % FPR (adaptive-blend, WaNet draw 4, a gamma-filter trigger;
                                         adaptive-patch 37 %, all its seed holds). See ``readout.withdraw_ambiguous``.
    content_fallback_source_share : float  ... together with the class's other members that look like images
                                         of other classes by a lenient test: outside its pixel outliers, none of
                                         their neighbours carries its label and at least this share carry one
                                         other label (0.7 = the content seed's own test). Measured: 0.5 found
                                         another 11-14 % of the poison (adaptive-patch: 5 %) for 0.3 % more
                                         FPR. See ``readout.widen_content_seed``.
    content_fallback_score_quantile : float  ... and with its other members scored at least this quantile of
                                         the seed's scores whose pixel neighbours are mostly other classes (0 =
                                         off, the paper): the poison the seed's strict test left, as the
                                         withdrawn quarantine still ranks it; the class's scores then follow its
                                         flags. Measured (GPU, adaptive-blend and WaNet): 88.7-96.0 -> 95.2-96.9
                                         % found at 0.69-0.91 % FPR. See ``readout.complete_content_fallback``.
    flag_ranked_scores : bool            the final scores rank every flag above every other sample: a flag scores
                                         0.5-1, any other sample 0-0.5, each half in the order of the score the
                                         rules above leave (the model's probability); and, outside a many-target
                                         attack, an unflagged sample of a class with flags ranks above its
                                         class's flagged share (False = that score as it is, the paper). See
                                         ``readout.flag_ranked_scores``.
    residual_ranked_scores : bool        ... and in a many-target attack whose flags carry their trigger in their
                                         pixels, an unflagged sample ranks by the larger of that score and its
                                         residual's rank among the flagged classes' unflagged samples by how far
                                         it points the trigger's way (False = that score alone, the paper): the
                                         poison a seeded class's quarantine left. Measured (held-out pixels and
                                         ramp, all-to-all): AUROC 0.9841 / 0.9899 -> 0.9989 / 0.9986. See
                                         ``readout.residual_ranks``.
    shared_block_min_share : float       a late step 3 flag rule: where a 3x3 block of pixels is exactly
                                         repeated, at one position, in at least this share of the flags, its
                                         carriers are the stamped images: a class's flags without one are
                                         withdrawn where four in five of its flags carry one, and a flagged
                                         class's unflagged carriers that look like other classes are flagged (0 =
                                         off, the paper). Images up to 64x64 pixels. Measured: adaptive-patch
                                         27-72 -> 98 % found at 0.3 % FPR; 12 more saved runs meet the goal,
                                         none fewer. See ``readout.flag_shared_blocks``.
    shared_block_enrichment : float      ... and at least this many times as common among the flags as in the
                                         whole set (the trigger, not a detail of the class the flags are in).
    shared_block_max_own_share : float   ... and an unflagged carrier is flagged where at most this share of its
                                         pixel neighbours outside the carriers carry its label (a cover sample,
                                         stamped but keeping its label, looks like its own class).
    shared_block_other_classes : bool    ... and the carriers in classes without flags too, where four in five of
                                         them look like other classes (False = the flagged classes only, the
                                         paper): a stamp all-to-all whose quarantine reached a few classes.
                                         Measured: dct all-to-all 29 -> 99 % found at scan seed 0. See
                                         ``readout.flag_shared_blocks``.
    common_block_share : float           a step 3 flag rule that needs no flag, just after the one above: where a
                                         3x3 block of pixels (not of one value) is exactly repeated, at one
                                         position, in at least this share of the whole set's images, its
                                         carriers not yet flagged are flagged where four in five of them look
                                         like other classes (0 = off, the paper): a stamp all-to-all whose
                                         quarantine flagged nothing. Clean Fashion-MNIST: no such block past
                                         2.2 %. See ``readout.flag_common_blocks``.
    class_block_share : float            a step 3 flag rule that needs no flag, run just before the exact-block
                                         rule above: where a 3x3 block of pixels (not of one value) is exactly
                                         repeated, at one position, in at least this share of a class's images
                                         and at least 90 % of its carriers are that class's, those carriers are
                                         flagged (0 = off, the paper): a trigger written onto one class
                                         (clean-label: sig, a patch). Images up to 64x64 pixels. Measured: sig
                                         0 -> 99.9-100 % found, clean-label BadNets 0-1 -> 100 % where it
                                         missed; 12 more saved runs meet issue 6's goal, none fewer; clean sets:
                                         no block past 3.7 % of a class. See ``readout.flag_class_bound_blocks``.
    value_residual_gap : float           the unflagged samples whose histogram of pixel values points the flags'
                                         way past a gap at least this wide (in cosine, among the top 30 % of
                                         them, 10 images at the least) are flagged (0 = off, the paper): a filter
                                         trigger that moves values, not pixels (posterize all-to-all). See
                                         ``readout.flag_value_residual``.
    value_move_median : float            ... then, where the flags' median cosine with their own mean value residual
                                         is at least this (one move shared: a filter, a blend), the flags whose
                                         values moved the other way (cosine under 0) are withdrawn (0 = off, the
                                         paper). Measured: gamma all-to-one 89-132 clean flags withdrawn, no
                                         poison; see ``readout.withdraw_against_value_move``.
    palette_min_expected : float         ... then, where the flags share holes in their palette (at least 16 values
                                         that most flags hold none of, where their classes' other images hold
                                         them: a filter that skips values), the unflagged images holding no
                                         pixel there, where a clean image of their class would hold at least
                                         this many, are flagged (0 = off, the paper). Measured: gamma all-to-all
                                         24-41 -> 100 % found at every scan seed. See
                                         ``readout.flag_palette_holes``.
    out_of_frame_band : int              last of step 3's flag rules, needing no flag: where this many offsets in a
                                         row, past where the set frames its images, hold (almost) no image, the
                                         images past them are flagged (0 = off, the paper): a geometric trigger
                                         that moves the content (held-out shift) in a set framed one way.
                                         Measured: shift all-to-one 46 -> 98 % found at every seed, no other
                                         saved run with an image out of frame. See ``readout.flag_out_of_frame``.
    out_of_frame_wrapped : bool          ... where content that touches both edges of an axis with an empty line
                                         inside is read as rolled round the edge, its offset counted past it
                                         (False = plain margins, the paper's value): a shift that wraps a wide
                                         item round. Measured: shift all-to-all 87-89 -> 97-99 % found at
                                         scan seeds 0-2.
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
    withdraw_off_trigger: bool = True
    withdrawn_score_scale: float = 0.5
    score_outlier_quantile: float = 0.99
    own_looking_flag_z: float = 2.0
    any_quarantine_class: bool = True
    trigger_residual_quantile: float = 0.999
    residual_untriggered_lookalikes: bool = True
    residual_by_quarantined_classes: bool = True
    residual_in_flagged_classes: bool = True
    trigger_free_quantile: float = 0.99
    trigger_free_any_target: bool = True
    trigger_free_confidence_quantile: float = 0.01
    residual_completion_quantile: float = 0.15
    lookalike_margin_quantile: float = 0.5
    lookalike_pixel_test: bool = True
    content_fallback: bool = True
    content_fallback_source_share: float = 0.5
    content_fallback_score_quantile: float = 0.15
    flag_ranked_scores: bool = True
    residual_ranked_scores: bool = True
    shared_block_min_share: float = 0.2
    shared_block_enrichment: float = 4.0
    shared_block_max_own_share: float = 0.5
    shared_block_other_classes: bool = True
    common_block_share: float = 0.05
    class_block_share: float = 0.2
    value_residual_gap: float = 0.15
    value_move_median: float = 0.35
    palette_min_expected: float = 5.0
    out_of_frame_band: int = 2
    out_of_frame_wrapped: bool = True
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
                     max_ambiguous_share=1.0, withdraw_unlike_target=False, withdraw_off_trigger=False,
                     withdrawn_score_scale=1.0,
                     score_outlier_quantile=0.0, own_looking_flag_z=0.0,
                     any_quarantine_class=False, content_fallback=False, content_fallback_score_quantile=0.0,
                     content_max_agreement=0.0, content_seed_min_held=0.0, readout_epochs=1,
                     keep_relabelled_quarantine=False, trigger_residual_quantile=0.0, min_class_remainder=0.0,
                     residual_in_flagged_classes=False, residual_untriggered_lookalikes=False,
                     residual_by_quarantined_classes=False,
                     second_pass_after_residual=False, residual_seed_by_own_share=False, second_pass_peak_growth=False,
                     trigger_free_quantile=0.0, trigger_free_any_target=False, trigger_free_confidence_quantile=0.0,
                     residual_completion_quantile=0.0, lookalike_margin_quantile=0.0,
                     flag_ranked_scores=False, residual_ranked_scores=False, shared_block_min_share=0.0,
                     shared_block_other_classes=False, common_block_share=0.0,
                     class_block_share=0.0, value_residual_gap=0.0, value_move_median=0.0,
                     palette_min_expected=0.0, out_of_frame_band=0, out_of_frame_wrapped=False)
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


def is_many_target(classes: torch.Tensor | int, num_classes: int) -> bool:
    """Whether ``classes`` (a (K,) bool mask of the classes holding a seed or a flag, or their count) marks a
    many-target attack: at least ``MANY_TARGET_CLASS_SHARE`` of the classes. One trigger relabelled into most
    classes (all-to-all) seeds and flags most of them; an all-to-one attack one or two. Every rule that acts on one
    kind only (step 2's shared-trigger seed and second-pass seeding, step 3's read-out) asks here, so the bar is one
    number."""
    count = int(classes.sum()) if isinstance(classes, torch.Tensor) else int(classes)
    return count >= MANY_TARGET_CLASS_SHARE * num_classes


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
    if not cfg.shared_trigger_seed or not is_many_target(seeded, num_classes):
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
