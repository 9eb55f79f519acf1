"""The `qtclean` command: thin Typer commands over the library (qtclean.runs, qtclean.export).

Exit codes: 0 success, 1 runtime failure, 2 usage or input error. Data goes to stdout only when asked (`--csv -`,
`--flagged -` reads stdin); everything else goes to stderr.
"""

from __future__ import annotations

import functools
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import QtcleanError
from .progress import Reporter, export_table, make_console, summary_table

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, no_args_is_help=True,
                  help="Find backdoor-poisoned samples in an image training set (Quarantine Training).")


class Format(str, Enum):
    auto = "auto"
    folder = "folder"
    cifar = "cifar"


class Model(str, Enum):
    cnn = "cnn"
    preact_resnet18 = "preact-resnet18"


class Precision(str, Enum):
    bf16 = "bf16"
    fp32 = "fp32"


class Release(str, Enum):
    split = "split"
    all = "all"


class Method(str, Enum):
    qt = "qt"
    loss = "loss"
    ss = "ss"
    ac = "ac"


class Variant(str, Enum):
    qtclean = "qtclean"
    paper = "paper"


class PreSelection(str, Enum):
    relative = "relative"
    loss = "loss"


class FinalEps(str, Enum):
    decay = "decay"
    jump = "jump"


def handle_errors(fn):
    """One place turns library errors into one line on stderr and the contract's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        console = make_console()
        try:
            return fn(*args, **kwargs)
        except QtcleanError as exc:
            console.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("interrupted; finished epochs are kept, continue with --resume", markup=False)
            raise typer.Exit(code=130) from None

    return wrapper


def parse_image_size(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.lower().replace("x", " ").split()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1 or max(parts) > 4096:
        raise typer.BadParameter("use N or HxW with sizes 1..4096, e.g. 32 or 28x28", param_hint="--image-size")
    return parts[0], parts[1]


# `qtclean scan --help` groups its options as README's "The algorithm and its options" does.
TRAINING = "Training"
STEP1 = "Step 1: pre-quarantine (which samples seed the quarantine)"
STEP2 = "Step 2: quarantine training"
STEP3 = "Step 3: from the quarantine model to flags"
BASELINES = "Baseline detectors (for comparison)"


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"qtclean {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """qtclean: scan a dataset, then export it without the poisoned samples."""


@app.command()
@handle_errors
def scan(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help="Image folder (DATA/CLASS/img.png) or folder of CIFAR batches."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="RUN folder \\[default: ./qtclean-<DATA name>]."),
    format: Format = typer.Option(Format.auto, "--format", help="Input format."),
    model: Model = typer.Option(Model.cnn, "--model", help="Network to train."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N|mps (auto = cuda if present)."),
    seed: int = typer.Option(0, "--seed",
                             help="Same seed and --threads give identical scores on the same CPU (not on a GPU)."),
    csv: Optional[str] = typer.Option(None, "--csv", help="'-' also writes flagged.csv's rows to stdout."),
    force: bool = typer.Option(False, "--force", help="Start over in an existing RUN folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN from its last finished epoch."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Force image size: N or HxW (folders)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads \\[default: cores available].",
                                          rich_help_panel=TRAINING),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs",
                                     help="On CUDA, replay each training step as a CUDA graph (same arithmetic, "
                                          "fewer launches); off = eager steps.", rich_help_panel=TRAINING),
    precision: Precision = typer.Option(Precision.bf16, "--precision",
                                        help="CUDA arithmetic: bf16 autocast or full fp32 (CPU: always fp32).",
                                        rich_help_panel=TRAINING),
    epochs_pre: int = typer.Option(4, "--epochs-pre", min=1, help="Pre-quarantine epochs (paper: 4).",
                                   rich_help_panel=STEP1),
    pre_min_steps: int = typer.Option(200, "--pre-min-steps", min=0, help="... and at least this many SGD steps: "
                                      "more epochs on a small set (0 = exactly --epochs-pre, the paper).",
                                      rich_help_panel=STEP1),
    pre_fraction: float = typer.Option(0.5, "--pre-fraction", min=0.0, max=1.0,
                                       help="Pre-quarantine set size, fraction of the largest class (paper: 0.1).",
                                       rich_help_panel=STEP1),
    pre_selection: PreSelection = typer.Option(PreSelection.relative, "--pre-selection",
                                               help="relative: lowest log-loss relative to the class median, "
                                                    "averaged over the pre-quarantine epochs; loss: lowest loss "
                                                    "after the last one (paper).", rich_help_panel=STEP1),
    pre_threshold: float = typer.Option(5.0, "--pre-threshold", min=0.0,
                                        help="relative only: nats below the class median a sample needs to join "
                                             "the pre-quarantine set (0 = take the full set).", rich_help_panel=STEP1),
    epochs_quarantine: int = typer.Option(20, "--epochs-quarantine", min=1, help="Quarantine epochs (paper: 20).",
                                          rich_help_panel=STEP2),
    epochs_dynamic: int = typer.Option(10, "--epochs-dynamic", min=0, help="Epochs eps grows (paper: 6).",
                                       rich_help_panel=STEP2),
    feature_seed_share: float = typer.Option(0.2, "--feature-seed-share", min=0.0, max=1.0,
                                             help="A class the loss rule seeds nothing in is seeded with its "
                                                  "features' smaller 2-means cluster when under this share of "
                                                  "the class (0 = off, the paper).", rich_help_panel=STEP1),
    shared_trigger_seed: bool = typer.Option(True, "--shared-trigger-seed/--no-shared-trigger-seed",
                                             help="Where at least half of the classes hold a seed (all-to-all), "
                                                  "seed a class without one with its samples along the seeds' "
                                                  "shared feature direction (off: the paper).", rich_help_panel=STEP1),
    content_max_agreement: float = typer.Option(0.15, "--content-max-agreement", min=0.0, max=1.0,
                                                help="A class no loss seed reached is seeded with a group of "
                                                     "it (a 2-means half of its features, or its members that look "
                                                     "like another class) whose images are relabelled: at most this "
                                                     "share of their pixel-space neighbours carry the class's "
                                                     "label (0 = off, the paper).", rich_help_panel=STEP1),
    content_min_diversity: float = typer.Option(0.9, "--content-min-diversity", min=0.0, max=1.0,
                                                help="... and their other labels spread over the other classes "
                                                     "(normalised entropy; 1 = evenly, as an all-to-one attack).",
                                                rich_help_panel=STEP1),
    content_min_baseline: float = typer.Option(0.5, "--content-min-baseline", min=0.0, max=1.0,
                                               help="... only where pixel neighbours carry labels at all: this "
                                                    "share of a sample's neighbours share its label, over the set.",
                                               rich_help_panel=STEP1),
    seed_weight_share: float = typer.Option(0.5, "--seed-weight-share", min=0.0,
                                            help="A small pre-quarantine set counts, in the quarantine loss, at "
                                                 "least this share of the rest of its class (0 = off, the "
                                                 "paper).", rich_help_panel=STEP2),
    seed_weight_until: float = typer.Option(0.0, "--seed-weight-until", min=0.0,
                                            help="... until the class's quarantine holds this many times its "
                                                 "pre-quarantine set (0 = the whole run).", rich_help_panel=STEP2),
    expand_min_bimodality: float = typer.Option(5 / 9, "--expand-min-bimodality", min=0.0, max=1.0,
                                                help="A class whose loss seed is under --min-seed-share is seeded "
                                                     "with the feature group the seed points at, when the class is "
                                                     "bimodal along the seed's direction (Sarle's coefficient at "
                                                     "least this; 0 = off, the paper).", rich_help_panel=STEP1),
    second_pass_epochs: int = typer.Option(10, "--second-pass-epochs", min=0,
                                           help="When the quarantine has not settled by its last epoch, run it "
                                                "again from the K-way model, seeded with its flags, for at most "
                                                "this many epochs (0 = off, the paper).", rich_help_panel=STEP2),
    second_pass_min_growth: float = typer.Option(1.5, "--second-pass-min-growth", min=0.0,
                                                 help="... and only when some class's quarantine holds at least "
                                                      "this many times its seed.", rich_help_panel=STEP2),
    second_pass_peak_growth: bool = typer.Option(
        True, "--second-pass-peak-growth/--second-pass-final-growth",
        help="... counting the whole quarantine's largest size after the dynamic epochs against the whole seed too: "
             "one that grew and shrank back has not settled either (--second-pass-final-growth: its size at the "
             "end only).", rich_help_panel=STEP2),
    second_pass_after_residual: bool = typer.Option(
        True, "--second-pass-after-residual/--no-second-pass-after-residual",
        help="Run the second pass too when step 3's trigger residual flags enough of a class the quarantine never "
             "seeded to seed it: the first pass never learned that class's poison.", rich_help_panel=STEP2),
    residual_seed_by_own_share: bool = typer.Option(
        True, "--residual-seed-by-own-share/--no-residual-seed-by-own-share",
        help="... judging those classes, and that second pass's, by --min-seed-share of their own samples alone, "
             "not --min-pre-share of the whole seed.", rich_help_panel=STEP2),
    second_pass_dynamic: int = typer.Option(4, "--second-pass-dynamic", min=0,
                                            help="Dynamic epochs (eps grows) of the second pass.",
                                            rich_help_panel=STEP2),
    second_pass_seed_max_own_share: float = typer.Option(
        0.5, "--second-pass-seed-max-own-share", min=0.0, max=1.0,
        help="The second pass's seed keeps only the first pass's flags whose pixel neighbours carry their label "
             "at most this share (1 = every flag).", rich_help_panel=STEP2),
    second_pass_seed_trigger_out: bool = typer.Option(
        True, "--second-pass-seed-trigger-out/--second-pass-seed-plain-pixels",
        help="Judge those neighbours with a pattern of a class's flags' own (one the rest of the class lacks) "
             "taken out of their pixels: a trigger that dominates the pixels makes the poison the quarantine "
             "missed vouch for the poison it took.",
        rich_help_panel=STEP2),
    max_ambiguous_share: float = typer.Option(0.12, "--max-ambiguous-share", min=0.0, max=1.0,
                                              help="Withdraw a class's flags when more than this share of it "
                                                   "scores 0.3-0.7 (1 = never, the paper).", rich_help_panel=STEP3),
    content_seed_min_held: float = typer.Option(0.25, "--content-seed-min-held", min=0.0, max=1.0,
                                                help="Withdraw a class its content seed started (flag that seed "
                                                     "instead) when its quarantine ends holding less than this "
                                                     "share of the seed (0 = never, the paper).",
                                                rich_help_panel=STEP3),
    min_class_remainder: float = typer.Option(0.5, "--min-class-remainder", min=0.0,
                                              help="A seed expansion, or a class's flags, must leave at least "
                                                   "this share of the median class size outside them in their "
                                                   "class, or they are the class itself: the expansion is "
                                                   "rejected, the flags withdrawn (0 = no bound, the paper).",
                                              rich_help_panel=STEP3),
    keep_relabelled_quarantine: bool = typer.Option(True, "--keep-relabelled-quarantine/--withdraw-any-ambiguous",
                                                    help="Keep such a class's flags when, as a group, their pixels "
                                                         "look like images relabelled from every other class.",
                                                    rich_help_panel=STEP3),
    withdraw_unlike_target: bool = typer.Option(True, "--withdraw-unlike-target/--keep-unlike-target",
                                                help="Withdraw a class's flags when their pixels do not look like "
                                                     "relabelled images of other classes while another class's "
                                                     "do (a false alarm beside an all-to-one target).",
                                                rich_help_panel=STEP3),
    withdraw_off_trigger: bool = typer.Option(True, "--withdraw-off-trigger/--keep-off-trigger",
                                              help="In a many-target attack, withdraw a class's flags when their "
                                                   "pixels carry the trigger the other classes' flags share no "
                                                   "more than the rest of their class does.",
                                              rich_help_panel=STEP3),
    withdrawn_score_scale: float = typer.Option(0.5, "--withdrawn-score-scale", min=0.0, max=1.0,
                                                help="A withdrawn class's unflagged samples keep this share of "
                                                     "their score (1 = the model's probability as it is).",
                                                rich_help_panel=STEP3),
    score_outlier_quantile: float = typer.Option(0.99, "--score-outlier-quantile", min=0.0, max=1.0,
                                                 help="In a class with flags, also flag the samples whose score "
                                                      "stands out from their class as far as only 1 - this share "
                                                      "of the classes without flags do, when their pixels look "
                                                      "like other classes (0 = off, the paper).",
                                                 rich_help_panel=STEP3),
    own_looking_flag_z: float = typer.Option(2.0, "--own-looking-flag-z", min=0.0,
                                             help="Where a class's quarantine stood, flag a sample whose pixels "
                                                  "look like its own class exactly when its score stands out "
                                                  "from the class by more than this many times what a clean "
                                                  "score strays by chance (0 = off, the paper).",
                                             rich_help_panel=STEP3),
    any_quarantine_class: bool = typer.Option(True, "--any-quarantine-class/--own-quarantine-class",
                                              help="In the classes that quarantine, flag a sample predicted in any "
                                                   "of their quarantine classes, scored by their mass together "
                                                   "(--own-quarantine-class: its own only, the paper).",
                                              rich_help_panel=STEP3),
    trigger_residual_quantile: float = typer.Option(0.999, "--trigger-residual-quantile", min=0.0, max=1.0,
                                                    help="With half of the classes flagged or more, also flag a "
                                                         "sample of a class without flags whose pixels, minus its "
                                                         "look-alikes', point the way the flags' do, beyond this "
                                                         "quantile of the flagged classes' unflagged samples (0 = "
                                                         "off, the paper).", rich_help_panel=STEP3),
    residual_untriggered_lookalikes: bool = typer.Option(
        True, "--residual-untriggered-lookalikes/--residual-any-lookalikes",
        help="... those look-alikes without the images of classes without flags that carry a large trigger "
             "themselves (--residual-any-lookalikes: any unflagged image).", rich_help_panel=STEP3),
    residual_by_quarantined_classes: bool = typer.Option(
        True, "--residual-by-quarantined-classes/--residual-by-flagged-classes",
        help="... and count the classes the quarantine flagged before any withdrawal (but those withdrawn as "
             "unlike the target or without the trigger) when deciding that half of the classes or more are "
             "attacked (--residual-by-flagged-classes: only the classes still flagged).",
        rich_help_panel=STEP3),
    residual_in_flagged_classes: bool = typer.Option(
        True, "--residual-in-flagged-classes/--no-residual-in-flagged-classes",
        help="With flags in fewer than half of the classes, also flag a flagged class's unflagged members whose "
             "pixels, minus their look-alikes', point the way its flags' do, beyond 99.99 % of the classes without "
             "flags, where most flags look like other classes and carry the trigger "
             "(--no-residual-in-flagged-classes: not, the paper).", rich_help_panel=STEP3),
    trigger_free_quantile: float = typer.Option(0.99, "--trigger-free-quantile", min=0.0, max=1.0,
                                                help="Where the flags share a trigger in their pixels, withdraw "
                                                     "a flag that looks like its own class and points the "
                                                     "trigger's way less than this quantile of the flagged "
                                                     "classes' unflagged samples (0 = off, the paper).",
                                                rich_help_panel=STEP3),
    trigger_free_any_target: bool = typer.Option(
        True, "--trigger-free-any-target/--trigger-free-many-target-only",
        help="... in any attack, an all-to-one attack's quarantine that took clean images of its target too "
             "(--trigger-free-many-target-only: only with half of the classes flagged or more, as before).",
        rich_help_panel=STEP3),
    trigger_free_confidence_quantile: float = typer.Option(
        0.01, "--trigger-free-confidence-quantile", min=0.0, max=1.0,
        help="... and withdraw a flag that looks like another class and points the trigger's way less than that "
             "quantile where the model gives its label a probability under this quantile of the flags that carry "
             "the trigger (0 = off, the paper).", rich_help_panel=STEP3),
    residual_completion_quantile: float = typer.Option(
        0.15, "--residual-completion-quantile", min=0.0, max=1.0,
        help="In a withdrawn class the trigger residual flagged, also flag its members scored at least this quantile "
             "of the residual's flags there that look like other classes and point the trigger's way (0 = off, the "
             "paper).", rich_help_panel=STEP3),
    lookalike_margin_quantile: float = typer.Option(
        0.5, "--lookalike-margin-quantile", min=0.0, max=1.0,
        help="In a class whose quarantine is kept, also flag its unflagged members that look like images of other "
             "classes yet are labelled with a margin at least this quantile of its own-looking members' margins, "
             "where most of its strict look-alikes are (0 = off, the paper).", rich_help_panel=STEP3),
    lookalike_pixel_test: bool = typer.Option(
        True, "--lookalike-pixel-test/--lookalike-strict-only",
        help="... those look-alikes by the content seed's strict test or the score rules' pixel test (strict only: "
             "fewer found, fewer clean).", rich_help_panel=STEP3),
    content_fallback: bool = typer.Option(True, "--content-fallback/--no-content-fallback",
                                          help="Flag a withdrawn class's content seed (its members that look like "
                                               "images of other classes) instead of nothing.", rich_help_panel=STEP3),
    content_fallback_source_share: float = typer.Option(0.5, "--content-fallback-source-share", min=0.0, max=1.0,
                                                        help="... with the class's other members whose pixel "
                                                             "neighbours outside its outliers carry none of its "
                                                             "label and at least this share one other label (0.7 = "
                                                             "the content seed's own test).", rich_help_panel=STEP3),
    content_fallback_score_quantile: float = typer.Option(0.15, "--content-fallback-score-quantile", min=0.0,
                                                          max=1.0,
                                                          help="... and with its other members scored at least this "
                                                               "quantile of the seed's scores whose pixel neighbours "
                                                               "are mostly other classes (0 = off, the paper).",
                                                          rich_help_panel=STEP3),
    shared_block_min_share: float = typer.Option(
        0.2, "--shared-block-share", min=0.0, max=1.0,
        help="Where a 3x3 block of pixels is exactly repeated at one place in at least this share "
             "of the flags (images up to 64x64), its carriers are the stamped images: withdraw a class's flags "
             "without one where four in five carry one, and flag a flagged class's other carriers that look like "
             "other classes (0 = off, the paper).", rich_help_panel=STEP3),
    shared_block_enrichment: float = typer.Option(
        4.0, "--shared-block-enrichment", min=1.0,
        help="... a block at least this many times as common among the flags as in the whole set.",
        rich_help_panel=STEP3),
    shared_block_max_own_share: float = typer.Option(
        0.5, "--shared-block-max-own-share", min=0.0, max=1.0,
        help="... and an unflagged carrier is flagged where at most this share of its pixel neighbours outside the "
             "carriers carry its label.", rich_help_panel=STEP3),
    shared_block_other_classes: bool = typer.Option(
        True, "--shared-blocks-other-classes/--shared-blocks-flagged-classes",
        help="... in the classes without flags too, where four in five of the carriers there look like other "
             "classes: a stamp all-to-all whose quarantine reached a few classes (the paper: flagged classes).",
        rich_help_panel=STEP3),
    common_block_share: float = typer.Option(
        0.05, "--common-block-share", min=0.0, max=1.0,
        help="Flag the images that carry a 3x3 block of pixels (not of one value) exactly repeated at one place in "
             "at least this share of the whole set, where four in five of its unflagged carriers look like other "
             "classes: a stamp all-to-all, found without a flag (images up to 64x64; 0 = off, the paper).",
        rich_help_panel=STEP3),
    class_block_share: float = typer.Option(
        0.2, "--class-block-share", min=0.0, max=1.0,
        help="Flag, whatever the model says, the images that carry a 3x3 block of pixels (not of one value) exactly "
             "repeated at one place in at least this share of a class's images, where nine in ten of its carriers "
             "are that class's: a trigger written onto one class, as clean-label attacks do (images up to 64x64; "
             "0 = off, the paper).", rich_help_panel=STEP3),
    value_residual_gap: float = typer.Option(
        0.15, "--value-residual-gap", min=0.0, max=2.0,
        help="Flag the unflagged images whose histogram of pixel values points the flags' way past a gap at least "
             "this wide in cosine (among the top 30 %, ten images at the least): a filter trigger that moves "
             "values, not pixels (0 = off, the paper).",
        rich_help_panel=STEP3),
    value_move_median: float = typer.Option(
        0.35, "--value-move-median", min=0.0, max=1.0,
        help="Where the flags' histograms of pixel values moved one way (their median cosine with the flags' mean "
             "move at least this: a filter, a blend), withdraw the flags whose values moved the other way (0 = off, "
             "the paper).", rich_help_panel=STEP3),
    palette_min_expected: float = typer.Option(
        5.0, "--palette-min-expected", min=0.0,
        help="Where the flags share holes in their palette (pixel values a filter skips), flag the images that hold "
             "no pixel there, where a clean image of their class would hold at least this many (0 = off, the "
             "paper).", rich_help_panel=STEP3),
    out_of_frame_band: int = typer.Option(
        2, "--out-of-frame-band", min=0,
        help="Flag, whatever the model says, the images whose content sits apart from where the set frames its "
             "images, past at least this many offsets (in pixels) in a row that no image has: a trigger that moves "
             "the content, in a set framed one way (0 = off, the paper).", rich_help_panel=STEP3),
    out_of_frame_wrapped: bool = typer.Option(
        True, "--out-of-frame-wrapped/--out-of-frame-plain",
        help="... reading content that touches both edges with an empty line inside as rolled round the edge (a "
             "shift that wraps a wide item), or by its plain margins (the paper).", rich_help_panel=STEP3),
    flag_ranked_scores: bool = typer.Option(
        True, "--flag-ranked-scores/--model-scores",
        help="Score every flag 0.5-1 and every other sample 0-0.5, an unflagged sample of a class with flags raised "
             "by its class's flagged share unless half of the classes hold flags (--model-scores: the model's "
             "probability as step 3 leaves it, the paper).", rich_help_panel=STEP3),
    residual_ranked_scores: bool = typer.Option(
        True, "--residual-ranked-scores/--no-residual-ranked-scores",
        help="... with half of the classes flagged or more and a trigger their pixels share, rank an unflagged sample "
             "by the larger of that probability and how far its pixels, minus its look-alikes', point the trigger's "
             "way among the flagged classes' unflagged samples (--no-residual-ranked-scores: the probability alone, "
             "the paper).", rich_help_panel=STEP3),
    grow_threshold: float = typer.Option(0.55, "--grow-threshold", min=0.0, max=1.0,
                                         help="Quarantine probability a sample needs for its eps to grow; after "
                                              "the dynamic epochs only grown samples are held (0 = any sample "
                                              "predicted in quarantine, the paper).", rich_help_panel=STEP2),
    eps_init: float = typer.Option(0.4, "--eps-init", min=0.0, max=1.0, help="Starting eps (paper: 0.4).",
                                   rich_help_panel=STEP2),
    eps_step: float = typer.Option(0.1, "--eps-step", min=0.0, max=1.0, help="eps step per epoch (paper: 0.1).",
                                   rich_help_panel=STEP2),
    eps_min: float = typer.Option(0.1, "--eps-min", min=0.0, max=1.0, help="eps floor (paper: 0.1).",
                                  rich_help_panel=STEP2),
    eps_max: float = typer.Option(0.9, "--eps-max", min=0.0, max=1.0, help="eps ceiling (paper: 0.9).",
                                  rich_help_panel=STEP2),
    release_threshold: float = typer.Option(0.9, "--release-threshold", min=0.0, max=1.0,
                                            help="Quarantined share of a class that triggers a release (paper: 0.9).",
                                            rich_help_panel=STEP2),
    release: Release = typer.Option(Release.split, "--release",
                                    help="split: free only the lower mode of the class; all: the paper's rule.",
                                    rich_help_panel=STEP2),
    split_separation: float = typer.Option(0.5, "--split-separation", min=0.0, max=1.0,
                                           help="Otsu variance share needed to split a class instead of freeing it.",
                                           rich_help_panel=STEP2),
    final_eps: FinalEps = typer.Option(FinalEps.decay, "--final-eps",
                                       help="After the dynamic epochs, unquarantined eps: decay by a step per "
                                            "epoch, or jump to the minimum (paper).", rich_help_panel=STEP2),
    min_pre_share: float = typer.Option(0.05, "--min-pre-share", min=0.0, max=1.0,
                                        help="Share of the pre-quarantine set a class needs to get a quarantine "
                                             "(0 with --min-seed-share 0 = every class, the paper).",
                                        rich_help_panel=STEP2),
    min_seed_share: float = typer.Option(0.02, "--min-seed-share", min=0.0, max=1.0,
                                         help="Share of its own samples a class needs in the pre-quarantine set to "
                                              "get a quarantine.", rich_help_panel=STEP2),
    method: Method = typer.Option(Method.qt, "--method", help="qt: Quarantine Training. Baselines, for comparison "
                                  "(README): loss (lowest loss, ABL-style), ss (spectral signatures), ac "
                                  "(activation clustering).", rich_help_panel=BASELINES),
    baseline_epochs: Optional[int] = typer.Option(None, "--baseline-epochs", min=1,
                                                  help="Baselines: K-way training epochs \\[default: 4 for loss, 12 "
                                                       "for ss/ac].", rich_help_panel=BASELINES),
    poison_rate: float = typer.Option(0.1, "--poison-rate", min=0.0, max=1.0,
                                      help="Baselines loss/ss: the poison share their removal rule assumes.",
                                      rich_help_panel=BASELINES),
    variant: Variant = typer.Option(Variant.qtclean, "--variant", help="paper: the published algorithm's "
                                    "settings for every option below that you do not give (see README)."),
    clean_out: Optional[Path] = typer.Option(None, "--clean-out", help="After the scan, export the dataset "
                                             "without the flagged samples here (as `qtclean export`)."),
    quarantine_out: Optional[Path] = typer.Option(None, "--quarantine-out", help="After the scan, export the "
                                                  "flagged samples here."),
    readout_epochs: int = typer.Option(3, "--readout-epochs", min=1,
                                       help="Read the seeded classes out from the quarantine model's probabilities "
                                            "averaged over its last this many epochs (1 = the final model, as the "
                                            "paper).", rich_help_panel=STEP3),
    early_stop_patience: int = typer.Option(3, "--early-stop-patience", min=0,
                                            help="Stop quarantine training after this many stable epochs (past "
                                                 "the dynamic epochs, eps settled, membership changing by at most "
                                                 "--early-stop-tolerance); 0 = run every epoch (paper).",
                                            rich_help_panel=STEP2),
    early_stop_tolerance: float = typer.Option(0.0005, "--early-stop-tolerance", min=0.0, max=1.0,
                                               help="Share of samples whose membership may change in a stable "
                                                    "epoch.", rich_help_panel=STEP2),
    quarantine_bias: float = typer.Option(4.0, "--quarantine-bias", help="Nats below the source logit that the "
                                                                          "quarantine half of the head starts at.",
                                          rich_help_panel=STEP2),
    batch_size: int = typer.Option(128, "--batch-size", min=2, help="Samples per step.", rich_help_panel=TRAINING),
    lr: float = typer.Option(0.05, "--lr", min=0.0, help="SGD learning rate, pre-quarantine.",
                             rich_help_panel=TRAINING),
    lr_quarantine: float = typer.Option(0.01, "--lr-quarantine", min=0.0, help="SGD learning rate, quarantine.",
                                        rich_help_panel=TRAINING),
    momentum: float = typer.Option(0.9, "--momentum", min=0.0, max=1.0, rich_help_panel=TRAINING),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", min=0.0, rich_help_panel=TRAINING),
) -> None:
    """Train the quarantine model on DATA and write scores, flags, model and run.json to RUN."""
    from .baselines import BaselineConfig
    from .qt import QTConfig
    from .runs import scan_to_run
    from .scan import TrainConfig

    if csv is not None and csv != "-":
        raise typer.BadParameter("only '-' (stdout) is supported; the files are always in RUN", param_hint="--csv")
    if force and resume:
        raise typer.BadParameter("choose one of --force (start over) and --resume (continue)",
                                 param_hint="--force/--resume")
    if eps_min > eps_max:
        raise typer.BadParameter(f"--eps-min {eps_min} is above --eps-max {eps_max}", param_hint="--eps-min")
    qt_options = dict(
        epochs_pre=epochs_pre, pre_min_steps=pre_min_steps, pre_fraction=pre_fraction,
        epochs_quarantine=epochs_quarantine,
        epochs_dynamic=epochs_dynamic, eps_init=eps_init, eps_step=eps_step, eps_min=eps_min, eps_max=eps_max,
        release_threshold=release_threshold, release=release.value, split_separation=split_separation,
        quarantine_bias=quarantine_bias, final_eps=final_eps.value, min_pre_share=min_pre_share,
        min_seed_share=min_seed_share, pre_selection=pre_selection.value, pre_threshold=pre_threshold,
        early_stop_patience=early_stop_patience, early_stop_tolerance=early_stop_tolerance,
        readout_epochs=readout_epochs,
        grow_threshold=grow_threshold, feature_seed_share=feature_seed_share, shared_trigger_seed=shared_trigger_seed,
        seed_weight_share=seed_weight_share,
        seed_weight_until=seed_weight_until, expand_min_bimodality=expand_min_bimodality,
        second_pass_epochs=second_pass_epochs, second_pass_min_growth=second_pass_min_growth,
        second_pass_peak_growth=second_pass_peak_growth,
        second_pass_after_residual=second_pass_after_residual, residual_seed_by_own_share=residual_seed_by_own_share,
        second_pass_dynamic=second_pass_dynamic, second_pass_seed_max_own_share=second_pass_seed_max_own_share,
        second_pass_seed_trigger_out=second_pass_seed_trigger_out,
        max_ambiguous_share=max_ambiguous_share, min_class_remainder=min_class_remainder,
        content_seed_min_held=content_seed_min_held, keep_relabelled_quarantine=keep_relabelled_quarantine,
        withdraw_unlike_target=withdraw_unlike_target, withdraw_off_trigger=withdraw_off_trigger,
        withdrawn_score_scale=withdrawn_score_scale,
        score_outlier_quantile=score_outlier_quantile, own_looking_flag_z=own_looking_flag_z,
        any_quarantine_class=any_quarantine_class, trigger_residual_quantile=trigger_residual_quantile,
        residual_untriggered_lookalikes=residual_untriggered_lookalikes,
        residual_by_quarantined_classes=residual_by_quarantined_classes,
        residual_in_flagged_classes=residual_in_flagged_classes,
        trigger_free_quantile=trigger_free_quantile, trigger_free_any_target=trigger_free_any_target,
        trigger_free_confidence_quantile=trigger_free_confidence_quantile,
        residual_completion_quantile=residual_completion_quantile,
        lookalike_margin_quantile=lookalike_margin_quantile, lookalike_pixel_test=lookalike_pixel_test,
        content_fallback=content_fallback,
        content_fallback_source_share=content_fallback_source_share,
        content_fallback_score_quantile=content_fallback_score_quantile, flag_ranked_scores=flag_ranked_scores,
        residual_ranked_scores=residual_ranked_scores, shared_block_min_share=shared_block_min_share,
        shared_block_enrichment=shared_block_enrichment, shared_block_max_own_share=shared_block_max_own_share,
        shared_block_other_classes=shared_block_other_classes, common_block_share=common_block_share,
        class_block_share=class_block_share,
        value_residual_gap=value_residual_gap, value_move_median=value_move_median,
        palette_min_expected=palette_min_expected, out_of_frame_band=out_of_frame_band,
        out_of_frame_wrapped=out_of_frame_wrapped,
        content_max_agreement=content_max_agreement, content_min_diversity=content_min_diversity,
        content_min_baseline=content_min_baseline)
    if variant == Variant.paper:  # the paper's values, except where the user gave an option explicitly
        def given_explicitly(name: str) -> bool:  # by the enum's name: typer may vendor click's ParameterSource
            source = ctx.get_parameter_source(name)
            return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

        given = {k: v for k, v in qt_options.items() if given_explicitly(k)}
        qt_config = QTConfig.paper(**given)
    else:
        qt_config = QTConfig(**qt_options)
    train_config = TrainConfig(model=model.value, batch_size=batch_size, lr=lr, lr_quarantine=lr_quarantine,
                               momentum=momentum, weight_decay=weight_decay, device=device, threads=threads,
                               cuda_graphs=cuda_graphs, precision=precision.value)
    console = make_console()
    if clean_out is not None or quarantine_out is not None:
        _check_export_destinations(data, out, clean_out, quarantine_out, force)
    reporter = Reporter(console)
    try:
        run = scan_to_run(data, out=out, format=format.value, image_size=parse_image_size(image_size),
                          qt_config=qt_config, train_config=train_config, seed=seed, force=force, resume=resume,
                          command=["qtclean", *sys.argv[1:]], progress=reporter, method=method.value,
                          baseline_config=BaselineConfig(epochs=baseline_epochs, poison_rate=poison_rate))
    finally:
        reporter.close()
    if csv == "-":
        from .outputs import csv_text

        sys.stdout.write(csv_text(run.flagged_rows))
        sys.stdout.flush()
    console.print(summary_table(run))
    console.print(f"run folder: {run.run_dir}", markup=False)
    if clean_out is None and quarantine_out is None:
        if int(run.result.flagged.sum()):
            console.print(f"next: qtclean export {shlex.quote(str(run.run_dir))} --clean-out CLEAN_DIR", markup=False)
    else:
        from .export import export as export_run

        result = export_run(run.run_dir, clean_out=clean_out, quarantine_out=quarantine_out, force=force,
                            dataset=run.dataset, progress=reporter)
        console.print(export_table(result))


def _check_export_destinations(data: Path, out: Optional[Path], clean_out: Optional[Path],
                               quarantine_out: Optional[Path], force: bool) -> None:
    """Refuse bad --clean-out/--quarantine-out before training, not after minutes of it."""
    from .export import check_destination
    from .runs import default_run_dir

    run_dir = out if out is not None else default_run_dir(data)
    for option, dest in (("--clean-out", clean_out), ("--quarantine-out", quarantine_out)):
        if dest is not None:
            check_destination(dest, data=data, run_dir=run_dir, force=force, option=option)


@app.command()
@handle_errors
def export(
    run: Path = typer.Argument(..., help="RUN folder written by `qtclean scan`."),
    clean_out: Optional[Path] = typer.Option(None, "--clean-out", help="Write the dataset without the flagged "
                                             "samples here, in the input's format."),
    quarantine_out: Optional[Path] = typer.Option(None, "--quarantine-out", help="Write the flagged samples "
                                                  "here, same layout."),
    flagged: Optional[str] = typer.Option(None, "--flagged", help="Remove these instead of RUN/flagged.csv: a CSV "
                                          "with an 'index' column or one index per line; '-' reads stdin."),
    min_score: Optional[float] = typer.Option(None, "--min-score", min=0.0, max=1.0,
                                              help="Remove every sample scoring at least this in RUN/scores.csv "
                                                   "instead: the flags score 0.5 and above, so a lower bar also "
                                                   "removes the unflagged samples ranked next."),
    data: Optional[Path] = typer.Option(None, "--data", help="The input dataset, if it moved since the scan."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be kept and removed; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace existing output folders."),
) -> None:
    """Write DATA without the flagged samples (and/or only them), in the input's own format."""
    from .export import export as export_run, read_flagged_list

    console = make_console()
    indices = None
    if flagged is not None:
        # Read the list first: in `qtclean scan ... --csv - | qtclean export RUN --flagged -` the scan is still
        # running, and RUN is complete only when the pipe closes.
        if flagged == "-":
            text, source = sys.stdin.read(), "stdin (--flagged -)"
        else:
            try:
                text, source = Path(flagged).read_text(encoding="utf-8"), flagged
            except (OSError, UnicodeDecodeError) as exc:
                raise typer.BadParameter(f"{flagged}: cannot read ({exc})", param_hint="--flagged") from None
        indices = read_flagged_list(text, source=source, num_total=_run_size(run))
    if clean_out is None and quarantine_out is None and not dry_run:
        raise typer.BadParameter("pass --clean-out DIR and/or --quarantine-out DIR, or --dry-run",
                                 param_hint="--clean-out")
    reporter = Reporter(console)
    try:
        result = export_run(run, clean_out=clean_out, quarantine_out=quarantine_out, flagged=indices,
                            min_score=min_score, data=data, dry_run=dry_run, force=force, progress=reporter)
    finally:
        reporter.close()
    console.print(export_table(result))


def _run_size(run: Path) -> int:
    from .runs import load_run_info

    return int(load_run_info(run)["dataset"]["count"])


@app.command()
@handle_errors
def evaluate(
    run: Path = typer.Argument(..., help="RUN folder written by `qtclean scan`."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Truth CSV of the scanned dataset: columns index, "
                                         "poisoned."),
    test: Optional[Path] = typer.Option(None, "--test", help="A test set with triggered samples (e.g. from `qtclean "
                                        "poison TEST --rate 1`): report the model's ACC and ASR on it."),
    test_truth: Optional[Path] = typer.Option(None, "--test-truth", help="The test set's truth CSV "
                                              "\\[default: TEST.truth.csv beside it]."),
    json_out: Optional[str] = typer.Option(None, "--json", help="'-' writes the figures as JSON to stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the ROC curve to this image (needs "
                                        "matplotlib: pip install 'qtclean\\[plot]')."),
) -> None:
    """Score RUN against the truth (AUROC, TPR, FPR, precision, per class) and/or its model on a triggered test
    set (clean accuracy, attack success rate)."""
    import json

    from .evaluate import evaluate_run, evaluate_test_set, plot_roc
    from .progress import evaluation_table, test_table

    if json_out is not None and json_out != "-":
        raise typer.BadParameter("only '-' (stdout) is supported", param_hint="--json")
    if truth is None and test is None:
        raise typer.BadParameter("give --truth (detection figures), --test (ACC/ASR of the model), or both",
                                 param_hint="--truth/--test")
    if plot is not None and truth is None:
        raise typer.BadParameter("the ROC curve needs --truth", param_hint="--plot")
    result: dict = {}
    console = make_console()
    if truth is not None:
        result = evaluate_run(run, truth)
        if plot is not None:
            plot_roc(result, plot)
        console.print(evaluation_table(result))
    if test is not None:
        result["test"] = evaluate_test_set(run, test, test_truth)
        console.print(test_table(result["test"]))
    if json_out == "-":
        sys.stdout.write(json.dumps(result, indent=2, allow_nan=True) + "\n")


@app.command()
@handle_errors
def poison(
    data: Path = typer.Argument(..., help="A clean image folder or CIFAR folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the poisoned copy (the truth goes to "
                             "OUT.truth.csv beside it)."),
    attack: str = typer.Option(..., "--attack", help="none, badnets, checker, trojan, blend-noise, blend-image, "
                               "sig, badnets-a2a, badnets-cl, wanet, adaptive-blend, adaptive-patch, iab, issba "
                               "(README: Attack lab)."),
    rate: float = typer.Option(0.1, "--rate", min=0.0, max=1.0, help="Poisoned share of the training set."),
    target: int = typer.Option(0, "--target", min=0, help="Target class (all-to-one and clean-label attacks)."),
    seed: int = typer.Option(0, "--seed", help="Which samples are poisoned (and, for iab/issba, the trigger "
                             "network's training)."),
    trigger: Optional[Path] = typer.Option(None, "--trigger", help="iab/issba: reuse the trigger network an "
                                           "earlier poisoning wrote (OUT.trigger.safetensors), e.g. to poison "
                                           "a test set with the same backdoor."),
    format: Format = typer.Option(Format.auto, "--format", help="Input format."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT."),
) -> None:
    """Write a poisoned copy of DATA in its own format, and the truth beside it (to measure detectors)."""
    from .attacks.writer import poison_dataset

    console = make_console()
    status = None

    def on_training(name: str) -> None:
        nonlocal status
        status = console.status(f"training the {name} trigger network on the data (about a minute on a CPU)")
        status.start()

    try:
        result = poison_dataset(data, out, attack=attack, rate=rate, target=target, seed=seed, format=format.value,
                                force=force, trigger=trigger, on_training=on_training)
    finally:
        if status is not None:
            status.stop()
    console.print(f"{result.attack}: {result.num_poisoned} of {result.num_samples} samples poisoned -> "
                  f"{result.out}; truth: {result.truth_path}", markup=False)
    if result.trigger_path is not None:
        info = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (result.trigger_info or {}).items())
        console.print(f"trigger network: {result.trigger_path} ({info})", markup=False)
