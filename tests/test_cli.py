"""`qtclean scan` as a user runs it: files, columns, stdout, exit codes, determinism, resume."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import FAST_ARGS, framed, tree_hash, write_folder, synthetic
from qtclean import cli, readout
from qtclean.cli import app
from qtclean.metrics import auroc
from qtclean.outputs import COLUMNS

runner = CliRunner()


def scan(*args):
    return runner.invoke(app, ["scan", *FAST_ARGS, *map(str, args)])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_folder):
    root, ids, poisoned = tiny_folder
    before = tree_hash(root)
    out = tmp_path_factory.mktemp("runs") / "run"
    result = scan(root, "--out", out, "--csv", "-")
    assert result.exit_code == 0, result.stderr
    assert tree_hash(root) == before
    return root, ids, poisoned, out, result


@pytest.fixture(scope="module")
def finished_model_scores(tmp_path_factory, tiny_folder):
    """The default run with --model-scores: the scores as step 3's rules leave them, before the flags rank them
    (readout.flag_ranked_scores), for the wiring tests of those rules, which compare scores run against run."""
    out = tmp_path_factory.mktemp("runs") / "model-scores"
    result = scan(tiny_folder[0], "--out", out, "--model-scores")
    assert result.exit_code == 0, result.stderr
    return out


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_scan_writes_the_run_folder(finished):
    root, ids, poisoned, out, _ = finished
    assert {p.name for p in out.iterdir()} == {"scores.csv", "flagged.csv", "unreadable.csv",
                                               "model.safetensors", "run.json"}
    from qtclean.outputs import default_mode

    assert all(p.stat().st_mode & 0o777 == default_mode() for p in out.iterdir())  # not mkstemp's 0600
    scores = read_csv(out / "scores.csv")
    assert scores[0] == COLUMNS
    assert [int(r[0]) for r in scores[1:]] == list(range(len(ids)))
    assert [r[1] for r in scores[1:]] == ids
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["dataset"]["count"] == len(ids)
    assert info["class_to_idx"] == {"circle": 0, "cross": 1, "stripes": 2}
    q_epochs = [e for e in info["epochs"] if e["phase"] == "quarantine"]
    assert len(q_epochs) == 8 and all("quarantined_per_class" in e for e in q_epochs)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert json.loads(meta["head_layout"])["outputs"] == 6
        assert json.loads(meta["class_names"]) == ["circle", "cross", "stripes"]
        assert f.get_tensor("head.weight").shape[0] == 6


def test_planted_poison_gets_the_top_scores(finished):
    root, ids, poisoned, out, _ = finished
    rows = read_csv(out / "scores.csv")[1:]
    score = np.array([float(r[4]) for r in rows])
    truth = np.array([poisoned[int(r[1].split("/")[1][:4])] for r in rows])
    assert auroc(score, truth) >= 0.9
    top = np.argsort(-score, kind="stable")[: int(truth.sum())]
    assert truth[top].mean() >= 0.75  # the highest scores are the planted samples


def test_flagged_csv_and_stdout(finished):
    _, _, _, out, result = finished
    flagged = read_csv(out / "flagged.csv")
    assert flagged[0] == COLUMNS
    assert all(r[5] == "1" for r in flagged[1:])
    s = [float(r[4]) for r in flagged[1:]]
    assert s == sorted(s, reverse=True)
    # stdout carries exactly flagged.csv's rows, nothing of the progress or summary
    assert list(csv.reader(io.StringIO(result.stdout))) == flagged
    assert "quarantine" in result.stderr and "run folder" in result.stderr
    assert f"next: qtclean export {out} --clean-out CLEAN_DIR" in result.stderr  # what to do with the flags


def test_flags_score_above_every_other_sample(finished):
    """scores.csv's score is at least 0.5 exactly on the flagged rows (the default ``--flag-ranked-scores``), so
    a user who ranks by score reads every flag first; flagged.csv lists them highest score first."""
    _root, _ids, _poisoned, out, _ = finished
    rows = read_csv(out / "scores.csv")[1:]
    score = np.array([float(r[4]) for r in rows])
    flagged = np.array([r[5] == "1" for r in rows])
    labels = np.array([int(r[2]) for r in rows])
    assert flagged.any() and (~flagged).any()
    assert np.array_equal(score >= 0.5, flagged)
    listed = [float(r[4]) for r in read_csv(out / "flagged.csv")[1:]]
    assert listed == sorted(listed, reverse=True) and len(listed) == int(flagged.sum())
    share = json.loads((out / "run.json").read_text())["flag_ranked_scores"]["class_share"]
    per_class = np.bincount(labels[flagged], minlength=3) / np.bincount(labels, minlength=3)
    assert len(np.flatnonzero(per_class)) == 1  # the fixture's one target class: its share is its floor
    assert np.allclose(share, per_class, atol=1e-4)
    assert (score[~flagged] >= np.asarray(share)[labels[~flagged]] / 2 - 1e-6).all()  # the floor it sets


def test_same_seed_same_scores(finished, tmp_path):
    root, _, _, out, _ = finished
    again = tmp_path / "again"
    assert scan(root, "--out", again).exit_code == 0
    assert (again / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()


def test_existing_run_is_refused_without_force(finished):
    root, _, _, out, _ = finished
    result = scan(root, "--out", out)
    assert result.exit_code == 2
    assert "already holds a run" in result.stderr and "--force" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_equals_uninterrupted(finished, tmp_path, monkeypatch):
    root, _, _, out, _ = finished
    import qtclean.runs as runs

    calls = {"n": 0}
    real_scan = runs.scan

    def interrupted(*args, progress=None, **kwargs):
        def stop_after_epochs(event, **info):
            if event == "epoch_end":
                calls["n"] += 1
                if calls["n"] == 6:  # in the quarantine phase, checkpoint of epoch 2 already written
                    raise KeyboardInterrupt
        return real_scan(*args, progress=stop_after_epochs, **kwargs)

    monkeypatch.setattr(runs, "scan", interrupted)
    run = tmp_path / "r"
    result = scan(root, "--out", run)
    assert result.exit_code == 130 and "--resume" in result.stderr
    assert not (run / "scores.csv").exists()
    monkeypatch.setattr(runs, "scan", real_scan)
    result = scan(root, "--out", run, "--resume")
    assert result.exit_code == 0, result.stderr
    assert (run / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()


def test_resume_keeps_the_seed_weights_released_before_the_interruption(tiny_folder, tmp_path):
    """--seed-weight-until drops a seed's weight mid-quarantine; a resumed scan must not restore it."""
    from qtclean import QTConfig, TrainConfig, load_dataset
    from qtclean import scan as scan_library

    root, _, _ = tiny_folder
    dataset = load_dataset(root)
    cfg = QTConfig(epochs_pre=4, pre_min_steps=0, epochs_quarantine=6, epochs_dynamic=3, early_stop_patience=0,
                   max_ambiguous_share=1.0,
                   seed_weight_share=0.5, seed_weight_until=0.5)
    fast = dict(qt_config=cfg, train_config=TrainConfig(batch_size=32, threads=1))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = scan_library(dataset, checkpoint_dir=tmp_path / "a", **fast)
    assert max(whole.extra["seed_weight_per_class"]) > 1  # a weighted seed, else this test shows nothing
    q_epochs = {"n": 0}

    def stop_in_quarantine(event, **info):
        if event == "epoch_end" and info["phase"] == "quarantine":
            q_epochs["n"] += 1
            if q_epochs["n"] == 3:  # before epoch 3's checkpoint: the run resumes from quarantine epoch 2
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan_library(dataset, checkpoint_dir=tmp_path / "b", progress=stop_in_quarantine, **fast)
    with safe_open(str(tmp_path / "b" / "checkpoint.safetensors"), framework="pt") as f:
        saved = f.get_tensor("seed_weights")
    assert saved.max() == 1  # the weighted seed was released (quarantine over 0.5 x its seed) by then
    resumed = scan_library(dataset, checkpoint_dir=tmp_path / "b", resume=True, **fast)
    assert np.array_equal(resumed.scores, whole.scores)


def test_readout_epochs_reads_the_last_epochs_average_and_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    """--readout-epochs 3 (the default): step 3 reads the seeded classes from their probabilities averaged over
    the last three quarantine epochs' eval passes (the log of the mean softmax), the other classes from the final
    model, which trains as with 1 (the final model alone, the paper's read-out). A scan interrupted mid-quarantine
    resumes to the same read-out: the checkpoint carries the passes it averages."""
    import torch

    from qtclean import QTConfig, TrainConfig, load_dataset, qt
    from qtclean import scan as scan_library

    dataset = load_dataset(tiny_folder[0])
    settings = dict(epochs_pre=4, pre_min_steps=0, epochs_quarantine=5, early_stop_patience=0, second_pass_epochs=0)
    train = TrainConfig(batch_size=32, threads=1)
    passes = []
    real = qt.membership
    monkeypatch.setattr(qt, "membership", lambda logits, *rest: passes.append(logits.clone()) or real(logits, *rest))
    one = scan_library(dataset, qt_config=QTConfig(**settings, readout_epochs=1), train_config=train)
    passes.clear()
    cfg = QTConfig(**settings)
    assert cfg.readout_epochs == 3
    three = scan_library(dataset, qt_config=cfg, train_config=train, checkpoint_dir=tmp_path)
    labels, pre = torch.from_numpy(dataset.labels), torch.from_numpy(three.pre_quarantine)
    watched = qt.seeded_classes(labels, pre, dataset.num_classes, cfg)[labels].numpy()
    assert watched.any() and (~watched).any() and len(passes) == 5 and three.extra["readout_epochs"] == 3
    average = torch.stack([torch.softmax(p[watched], dim=1) for p in passes[-3:]]).mean(0).clamp_min(1e-12).log()
    assert np.allclose(three.readout_logits[watched], average.numpy(), atol=1e-5)
    assert np.array_equal(three.readout_logits[~watched], one.readout_logits[~watched])  # the same final model
    assert not np.allclose(three.readout_logits[watched], one.readout_logits[watched])
    assert "readout_epochs" not in one.extra

    def stop_in_quarantine(event, **info):
        if event == "epoch_end" and info["phase"] == "quarantine" and info["epoch"] == 4:
            raise KeyboardInterrupt  # before epoch 4's checkpoint: the run resumes from epoch 3's

    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        scan_library(dataset, qt_config=cfg, train_config=train, checkpoint_dir=tmp_path / "b",
                     progress=stop_in_quarantine)
    resumed = scan_library(dataset, qt_config=cfg, train_config=train, checkpoint_dir=tmp_path / "b", resume=True)
    assert np.array_equal(resumed.readout_logits, three.readout_logits)
    assert np.array_equal(resumed.scores, three.scores) and np.array_equal(resumed.flagged, three.flagged)


def test_exit_codes_for_bad_inputs(tmp_path):
    missing = scan(tmp_path / "nope")
    assert missing.exit_code == 2 and "no such file or directory" in missing.stderr
    (tmp_path / "empty" / "a").mkdir(parents=True)
    empty = scan(tmp_path / "empty")
    assert empty.exit_code == 2 and "no images found" in empty.stderr
    images, labels, _ = synthetic(n_per_class=3)
    write_folder(tmp_path / "one", images[:3], labels[:3], classes=["a"])
    one = scan(tmp_path / "one", "--out", tmp_path / "r1")
    assert one.exit_code == 2 and "only one class" in one.stderr
    for r in (missing, empty, one):
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0]
        assert "Traceback" not in r.stderr


def test_run_inside_data_is_refused(tiny_folder):
    root, _, _ = tiny_folder
    result = scan(root, "--out", root / "run")
    assert result.exit_code == 2 and "inside the dataset" in result.stderr
    assert not (root / "run").exists()


def test_unreadable_csv_lists_bad_files(tmp_path):
    images, labels, _ = synthetic(n_per_class=20)
    root = tmp_path / "d"
    ids = write_folder(root, images, labels)
    (root / ids[3]).write_bytes(b"\x89PNG\r\n")
    result = scan(root, "--out", tmp_path / "r", "--epochs-quarantine", "1", "--epochs-pre", "1")
    assert result.exit_code == 0, result.stderr
    rows = read_csv(tmp_path / "r" / "unreadable.csv")
    assert rows[0] == ["index", "id", "reason"] and rows[1][:2] == ["3", ids[3]]
    scores = read_csv(tmp_path / "r" / "scores.csv")
    assert "3" not in [r[0] for r in scores[1:]] and len(scores) == len(ids)


def test_cifar_scan(tmp_path, tiny):
    from conftest import write_cifar

    images, labels, _ = tiny
    write_cifar(tmp_path / "c", images[::4], labels[::4])
    result = scan(tmp_path / "c", "--out", tmp_path / "r", "--epochs-quarantine", "1", "--epochs-pre", "1")
    assert result.exit_code == 0, result.stderr
    rows = read_csv(tmp_path / "r" / "scores.csv")
    assert rows[1][1] == "data_batch_1:0"


def test_python_dash_m_and_usage_error_exit_code():
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "qtclean", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("qtclean ")
    bad = subprocess.run([sys.executable, "-m", "qtclean", "scan"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""


def test_early_stop_is_recorded_and_keeps_the_answer(tiny_folder, tmp_path):
    root, ids, poisoned = tiny_folder
    common = ["--epochs-quarantine", "16", "--early-stop-tolerance", "0", "--pre-fraction", "0.1"]
    assert scan(root, "--out", tmp_path / "early", *common, "--early-stop-patience", "2").exit_code == 0
    assert scan(root, "--out", tmp_path / "full", *common, "--early-stop-patience", "0").exit_code == 0
    early = json.loads((tmp_path / "early" / "run.json").read_text())
    full = json.loads((tmp_path / "full" / "run.json").read_text())
    q_epochs = [e for e in early["epochs"] if e["phase"] == "quarantine"]
    assert len(q_epochs) < 16 and early["stop_reason"].startswith(f"stopped early after quarantine epoch "
                                                                  f"{len(q_epochs)} of 16")
    assert [e["stable_epochs"] for e in q_epochs[-2:]] == [1, 2]
    assert full["stop_reason"] == "completed all epochs"
    flagged = lambda run: [r[0] for r in read_csv(tmp_path / run / "flagged.csv")[1:]]  # noqa: E731
    assert sorted(flagged("early")) == sorted(flagged("full"))


def test_variant_paper_sets_the_published_values_but_explicit_options_win(tiny_folder, tmp_path):
    root, _, _ = tiny_folder
    result = scan(root, "--out", tmp_path / "p", "--variant", "paper", "--pre-fraction", "0.2")
    assert result.exit_code == 0, result.stderr
    qt_settings = json.loads((tmp_path / "p" / "run.json").read_text())["settings"]["qt"]
    assert qt_settings["pre_selection"] == "loss" and qt_settings["release"] == "all"
    assert qt_settings["final_eps"] == "jump" and qt_settings["early_stop_patience"] == 0
    assert qt_settings["seed_weight_share"] == 0 and qt_settings["min_seed_share"] == 0  # no seed weighting
    assert qt_settings["expand_min_bimodality"] == 0 and qt_settings["feature_seed_share"] == 0  # no feature seeds
    assert qt_settings["content_max_agreement"] == 0  # no content seeds
    assert qt_settings["score_outlier_quantile"] == 0  # no flags beyond the model's own
    assert qt_settings["own_looking_flag_z"] == 0  # and none withdrawn for their pixels
    assert qt_settings["trigger_residual_quantile"] == 0 and qt_settings["trigger_free_quantile"] == 0
    assert qt_settings["residual_completion_quantile"] == 0 and qt_settings["lookalike_margin_quantile"] == 0
    assert qt_settings["residual_in_flagged_classes"] is False
    assert qt_settings["residual_untriggered_lookalikes"] is False
    assert qt_settings["residual_by_quarantined_classes"] is False
    assert qt_settings["trigger_free_any_target"] is False and qt_settings["trigger_free_confidence_quantile"] == 0
    assert qt_settings["any_quarantine_class"] is False  # a sample's own quarantine class only
    assert qt_settings["shared_trigger_seed"] is False  # no seeds along other classes' trigger direction
    assert qt_settings["second_pass_epochs"] == 0 and qt_settings["second_pass_seed_max_own_share"] == 1
    assert qt_settings["second_pass_seed_trigger_out"] is False and qt_settings["residual_seed_by_own_share"] is False
    assert qt_settings["palette_min_expected"] == 0 and qt_settings["shared_block_other_classes"] is False
    assert qt_settings["out_of_frame_band"] == 0 and qt_settings["out_of_frame_wrapped"] is False
    assert qt_settings["pre_fraction"] == 0.2  # given on the command line
    assert qt_settings["epochs_quarantine"] == 8  # FAST_ARGS, also explicit


def test_scan_option_defaults_are_the_library_defaults():
    """The CLI repeats each default (to keep `qtclean --help` from importing torch); they must not drift."""
    import typer

    from qtclean.cli import app
    from qtclean.qt import QTConfig
    from qtclean.scan import TrainConfig

    command = typer.main.get_command(app).commands["scan"]
    defaults = {p.name: getattr(p.default, "value", p.default) for p in command.params}
    expected = {**QTConfig().to_dict(), **TrainConfig().to_dict()}
    shared = sorted(set(defaults) & set(expected))
    assert len(shared) >= 25  # every algorithm and training option is a CLI option
    assert {name: defaults[name] for name in shared} == {name: expected[name] for name in shared}


@pytest.mark.parametrize("method", ["loss", "ss", "ac"])
def test_baseline_methods_write_the_same_contract(tiny_folder, tmp_path, method):
    data, _, poisoned = tiny_folder
    run = tmp_path / "run"
    result = runner.invoke(app, ["scan", str(data), "--out", str(run), "--method", method, "--baseline-epochs", "3",
                                 "--batch-size", "32", "--threads", "1"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO((run / "scores.csv").read_text())))
    assert list(rows[0]) == list(COLUMNS) and len(rows) == len(poisoned)
    info = json.loads((run / "run.json").read_text())
    assert info["settings"]["method"] == method and info["settings"]["qt"] is None
    assert [e["phase"] for e in info["epochs"]] == ["training"] * 3
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["head_layout"])["outputs"] == 3  # a plain 3-way model
    flagged = [r["index"] for r in csv.DictReader(io.StringIO((run / "flagged.csv").read_text()))]
    assert flagged == [r["index"] for r in sorted(rows, key=lambda r: -float(r["score"])) if r["flagged"] == "1"]
    scores = np.array([float(r["score"]) for r in rows])
    truth = np.array([poisoned[int(r["id"].split("/")[1][:4])] for r in rows])
    assert auroc(scores, truth) > 0.9  # the planted patch is easy for every method


def test_the_library_api_of_the_readme(tiny_folder, tmp_path):
    """README "As a library": the names import from the package root and do what the CLI does."""
    from qtclean import QTConfig, TrainConfig, export, load_dataset, scan, scan_to_run

    root, _, poisoned = tiny_folder
    fast = dict(qt_config=QTConfig(epochs_quarantine=6, epochs_dynamic=3, max_ambiguous_share=1.0),
                train_config=TrainConfig(batch_size=32, threads=1))
    result = scan(load_dataset(root), **fast)
    assert result.scores.shape == result.flagged.shape == (len(poisoned),)
    run = scan_to_run(root, out=tmp_path / "run", **fast)
    assert (run.run_dir / "scores.csv").is_file() and run.result.flagged.sum() == result.flagged.sum()
    exported = export(run.run_dir, clean_out=tmp_path / "clean")
    assert sum(1 for p in (tmp_path / "clean").rglob("*.png")) == len(poisoned) - int(result.flagged.sum())
    assert exported is not None


def test_help_shows_bracketed_text():
    """Rich markup would swallow "[default: ...]" and "qtclean[plot]" in help texts unless they are escaped."""
    scan_help = runner.invoke(app, ["scan", "--help"], env={"COLUMNS": "240"}).output
    assert "[default: ./qtclean-<DATA name>]" in scan_help and "[default: cores available]" in scan_help
    evaluate_help = runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "240"}).output
    assert "qtclean[plot]" in evaluate_help and "\\[" not in evaluate_help


def test_scan_expands_a_small_loss_seed_and_records_why_in_the_epoch_statistics(tiny_folder):
    """The wiring of qt.expand_seed: with every loss seed too small to trust (min seed share 1) and every group
    accepted, each class with a loss seed is seeded with its group, and the pre-quarantine epoch records it."""
    from qtclean import QTConfig, TrainConfig, load_dataset
    from qtclean import scan as scan_library

    dataset = load_dataset(tiny_folder[0])
    fast = dict(epochs_pre=4, pre_min_steps=0, epochs_quarantine=1, early_stop_patience=0, feature_seed_share=0.0,
                min_pre_share=0.0, min_seed_share=1.0, content_max_agreement=0.0)  # content check: test_content
    train = TrainConfig(batch_size=32, threads=1)
    result = scan_library(dataset, qt_config=QTConfig(**fast, expand_min_bimodality=1e-6), train_config=train)
    pre_stat = [e for e in result.epochs if e["phase"] == "pre-quarantine"][-1]
    expansion = pre_stat["seed_expansion"]
    assert expansion and all(e["accepted"] and e["group"] >= 1 for e in expansion.values())
    for c, e in expansion.items():
        assert pre_stat["expanded_seed_per_class"][int(c)] == e["group"]
        assert pre_stat["pre_quarantine_per_class"][int(c)] >= e["group"]  # the loss seed plus its group
    off = scan_library(dataset, qt_config=QTConfig(**fast, expand_min_bimodality=0.0), train_config=train)
    off_stat = [e for e in off.epochs if e["phase"] == "pre-quarantine"][-1]
    assert "seed_expansion" not in off_stat and off_stat["pre_quarantine_size"] < pre_stat["pre_quarantine_size"]


def test_scan_seeds_unseeded_classes_by_content_and_records_why(tiny_folder):
    """The wiring of qt.content_seed (its rule: tests/test_content.py): with no loss seed (threshold out of reach)
    and every group accepted, each class is seeded with one of its candidate groups, and the pre-quarantine epoch
    records each group's kind and pixel statistics; with the rule off nothing is seeded."""
    from qtclean import QTConfig, TrainConfig, load_dataset
    from qtclean import scan as scan_library

    dataset = load_dataset(tiny_folder[0])
    fast = dict(epochs_pre=2, pre_min_steps=0, epochs_quarantine=1, early_stop_patience=0, feature_seed_share=0.0,
                pre_threshold=1000.0)
    train = TrainConfig(batch_size=32, threads=1)
    lax = QTConfig(**fast, content_max_agreement=1.0, content_min_diversity=0.0, content_min_baseline=0.0)
    pre_stat = [e for e in scan_library(dataset, qt_config=lax, train_config=train).epochs
                if e["phase"] == "pre-quarantine"][-1]
    per_class = pre_stat["content_seed_per_class"]
    assert all(n > 0 for n in per_class) and pre_stat["pre_quarantine_per_class"] == per_class
    assert pre_stat["seeded_classes"] == list(range(dataset.num_classes))
    counts = np.bincount(dataset.labels, minlength=3)
    for c in range(3):  # the groups looked at: at least 5 % of their class, leaving 30 % as its reference
        groups = pre_stat["content_seed"][str(c)]
        assert all(0.05 * counts[c] <= s["size"] <= 0.7 * counts[c] for s in groups)
        assert {s["group"] for s in groups} <= {"features", "pixels"} and groups[0]["group"] == "features"
    assert all(per_class[c] in {s["size"] for s in pre_stat["content_seed"][str(c)]} for c in range(3))  # whole
    off = scan_library(dataset, qt_config=QTConfig(**fast, content_max_agreement=0.0), train_config=train)
    off_stat = [e for e in off.epochs if e["phase"] == "pre-quarantine"][-1]
    assert "content_seed" not in off_stat and off_stat["pre_quarantine_size"] == 0


def test_a_withdrawn_content_seeded_class_flags_its_content_seed(tiny_folder, monkeypatch):
    """The wiring of the content fallback (its rules: tests/test_readout.py, tests/test_content.py): every class seeded
    by content and every flagged class withdrawn, the flags are exactly the content seeds of the withdrawn classes
    as readout.widen_content_seed widens them (with the configured source share), and run.json's ambiguity record counts
    them; with --no-content-fallback (and --withdraw-any-ambiguous) the same run flags nothing. Completed by the
    quarantine's ranking (the default; off in the first runs), the fallback adds the class members it counts in
    run.json, and each completed class's scores follow its flags."""
    from qtclean import QTConfig, TrainConfig, load_dataset
    from qtclean import scan as scan_library

    dataset = load_dataset(tiny_folder[0])
    lax = dict(epochs_pre=2, pre_min_steps=0, epochs_quarantine=2, early_stop_patience=0, feature_seed_share=0.0,
               pre_threshold=1000.0, content_max_agreement=1.0, content_min_diversity=0.0, content_min_baseline=0.0,
               max_ambiguous_share=-1.0, content_fallback_source_share=0.3, content_fallback_score_quantile=0.0,
               flag_ranked_scores=False)  # the scores as the rules leave them: flag ranks would move them
    train = TrainConfig(batch_size=32, threads=1)
    calls = []
    widen = readout.widen_content_seed

    def spy(embedding, labels, seed, classes, source_share):
        calls.append((seed.clone(), classes.clone(), source_share))
        return widen(embedding, labels, seed, classes, source_share)

    monkeypatch.setattr(readout, "widen_content_seed", spy)
    result = scan_library(dataset, qt_config=QTConfig(**lax), train_config=train)
    ambiguity = result.extra["quarantine_ambiguity"]
    withdrawn = np.array([str(c) in ambiguity for c in range(dataset.num_classes)])
    assert withdrawn.any() and all(v["withdrawn"] for v in ambiguity.values())
    seed, classes, source_share = calls[-1]  # the final read-out (a first-pass probe may read out before it)
    assert source_share == 0.3 and classes.all()  # every class was content-seeded
    assert np.array_equal(seed.numpy(), result.pre_quarantine)
    expected = result.pre_quarantine & withdrawn[dataset.labels]  # here the lenient test adds nothing ...
    assert expected.any() and np.array_equal(result.flagged, expected)
    assert all(v["content_flagged"] == int(expected[dataset.labels == int(c)].sum()) for c, v in ambiguity.items())
    assert "samples whose pixels look like other classes flagged instead" in result.extra["flags_withdrawn"]
    monkeypatch.setattr(readout, "widen_content_seed", lambda embedding, labels, seed, classes, source_share:
                        seed | classes[labels])  # ... so widen to whole classes: what it returns is flagged
    whole = scan_library(dataset, qt_config=QTConfig(**lax), train_config=train)
    assert np.array_equal(whole.flagged, withdrawn[dataset.labels]) and np.array_equal(whole.scores, result.scores)
    # the bars at their loosest, the flags would be kept as relabelled without a fallback: that rule off too
    off = scan_library(dataset, qt_config=QTConfig(**lax, content_fallback=False, keep_relabelled_quarantine=False),
                       train_config=train)
    assert not off.flagged.any() and np.array_equal(off.scores, result.scores)
    monkeypatch.setattr(readout, "widen_content_seed", widen)
    monkeypatch.setattr(readout, "COMPLETION_MIN_SEED_RANK", -1.0)  # the tiny model's ranking, whatever it is, is read
    completed = scan_library(dataset, qt_config=QTConfig(**{**lax, "content_fallback_score_quantile": 0.15}),
                             train_config=train)
    added = completed.flagged & ~result.flagged
    counts = {c: v["content_completed"] for c, v in completed.extra["quarantine_ambiguity"].items()}
    assert added.any() and not (result.flagged & ~completed.flagged).any()
    assert counts == {str(c): int(added[dataset.labels == c].sum()) for c in range(dataset.num_classes)
                      if str(c) in counts}
    completed_class = np.isin(dataset.labels, [int(c) for c in counts])
    assert (completed.scores[completed.flagged & completed_class] >= 0.5).all()
    assert (completed.scores[~completed.flagged & completed_class] <= 0.5).all()
    assert not np.array_equal(completed.scores, result.scores)
    assert "more that look so and score like them" in completed.extra["flags_withdrawn"]


def test_a_withdrawn_class_whose_flags_look_relabelled_keeps_them(tiny_folder):
    """The wiring of keep_relabelled_quarantine (its rule: tests/test_readout.py): every flagged class withdrawn and
    none falling back to a content seed, the scan hands each one's quarantine flags to the content test on the
    set's pixel embedding, run.json records what it saw, and a class it accepts (here every group, the bars at
    their loosest) keeps its flags: the same flags as a run that withdraws nothing. Switched off, nothing is
    flagged."""
    import torch

    from qtclean import QTConfig, TrainConfig, load_dataset
    from qtclean import scan as scan_library
    from qtclean.content import group_content, pixel_embedding

    dataset = load_dataset(tiny_folder[0])
    lax = dict(epochs_pre=2, pre_min_steps=0, epochs_quarantine=2, early_stop_patience=0, content_fallback=False,
               content_max_agreement=1.0, content_min_diversity=0.0, content_min_baseline=0.0,
               score_outlier_quantile=0.0, own_looking_flag_z=0.0, withdraw_unlike_target=False,
               trigger_free_quantile=0.0)  # the rules that change flags after the withdrawal: off
    train = TrainConfig(batch_size=32, threads=1)
    nothing_withdrawn = scan_library(dataset, qt_config=QTConfig(**lax, max_ambiguous_share=1.0), train_config=train)
    kept = scan_library(dataset, qt_config=QTConfig(**lax, max_ambiguous_share=-1.0), train_config=train)
    assert nothing_withdrawn.flagged.any() and np.array_equal(kept.flagged, nothing_withdrawn.flagged)
    ambiguity = kept.extra["quarantine_ambiguity"]
    labels = torch.from_numpy(dataset.labels)
    embedding = pixel_embedding(dataset.images)
    for c, v in ambiguity.items():
        members = torch.from_numpy(np.flatnonzero(kept.flagged & (dataset.labels == int(c))))
        assert not v["withdrawn"]
        assert v["flags_look_relabelled"] == group_content(embedding, labels, members, int(c), dataset.num_classes)
        assert f"class {c} ({v['flagged']} quarantined" in kept.extra["flags_kept_relabelled"]
    off = scan_library(dataset, qt_config=QTConfig(**lax, max_ambiguous_share=-1.0, keep_relabelled_quarantine=False),
                       train_config=train)
    assert not off.flagged.any() and all(v["withdrawn"] for v in off.extra["quarantine_ambiguity"].values())
    assert "flags_kept_relabelled" not in off.extra and "flags_kept_relabelled" not in nothing_withdrawn.extra


def test_second_pass_is_seeded_with_the_first_pass_flags_and_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    """The wiring of the second pass (qt.needs_second_pass decides; tests/test_qt.py): forced to run, it starts
    from the K-way model seeded with the first pass's flags, is recorded in the epochs and the stop reason, and an
    interrupted run resumes to the same scores from either pass."""
    from qtclean import QTConfig, TrainConfig, load_dataset, qt
    from qtclean import scan as scan_library

    dataset = load_dataset(tiny_folder[0])
    cfg = QTConfig(epochs_pre=4, pre_min_steps=0, epochs_quarantine=4, epochs_dynamic=2, second_pass_epochs=3,
                   second_pass_dynamic=1, second_pass_seed_max_own_share=1.0, early_stop_patience=0,
                   max_ambiguous_share=1.0, readout_epochs=1)  # the second pass's seed is the final model's flags
    fast = dict(qt_config=cfg, train_config=TrainConfig(batch_size=32, threads=1))
    first_only = scan_library(dataset, qt_config=replace(cfg, second_pass_epochs=0), train_config=fast["train_config"])
    assert first_only.flagged.sum() > 0 and "second_pass" not in first_only.extra
    monkeypatch.setattr(qt, "needs_second_pass", lambda **kw: True)
    (tmp_path / "a").mkdir()
    events = []
    whole = scan_library(dataset, checkpoint_dir=tmp_path / "a", progress=lambda e, **i: events.append((e, i)), **fast)
    assert [e["phase"] for e in whole.epochs].count("second pass") == 3
    announced = [i for e, i in events if e == "phase" and i["name"] == "second pass"]
    assert len(announced) == 1 and announced[0]["why"] == whole.extra["second_pass"]["reason"]
    first_flags = np.bincount(dataset.labels[first_only.flagged], minlength=dataset.num_classes).tolist()
    assert whole.extra["second_pass"]["first_pass_flags_per_class"] == first_flags
    assert whole.extra["second_pass"]["seed_per_class"] == first_flags  # share 1: every flag seeds
    assert whole.stop_reason.startswith("second pass (the quarantine had not settled after 4 epochs")
    assert np.array_equal(whole.pre_quarantine, first_only.pre_quarantine)  # the result keeps the original seed
    for phase, stop_at in (("quarantine", 3), ("second pass", 2)):
        seen = {"n": 0}

        def stop(event, **info):
            if event == "epoch_end" and info["phase"] == phase:
                seen["n"] += 1
                if seen["n"] == stop_at:
                    raise KeyboardInterrupt

        run = tmp_path / phase.replace(" ", "-")
        run.mkdir()
        with pytest.raises(KeyboardInterrupt):
            scan_library(dataset, checkpoint_dir=run, progress=stop, **fast)
        resumed = scan_library(dataset, checkpoint_dir=run, resume=True, **fast)
        assert np.array_equal(resumed.scores, whole.scores) and resumed.stop_reason == whole.stop_reason


def test_second_pass_growth_counts_the_peak_of_the_first_pass_after_its_dynamic_epochs(tiny_folder, monkeypatch):
    """The wiring of qt.peak_growth (its rule: tests/test_qt.py): handed the first pass's quarantine epochs, its
    dynamic epoch count and the seed's size, its ratio is the growth qt.needs_second_pass judges where it is larger
    than the final flags'; --second-pass-final-growth does not ask it."""
    from qtclean import QTConfig, TrainConfig, load_dataset, qt
    from qtclean import scan as scan_library

    dataset = load_dataset(tiny_folder[0])
    cfg = QTConfig(epochs_pre=4, pre_min_steps=0, epochs_quarantine=4, epochs_dynamic=2, second_pass_epochs=2,
                   early_stop_patience=0, max_ambiguous_share=1.0)
    train = TrainConfig(batch_size=32, threads=1)
    peak_calls, judged = [], []

    def peak_growth(epochs, seed_size, after_epoch):
        peak_calls.append(([e["phase"] for e in epochs], seed_size, after_epoch))
        return 99.0

    def needs_second_pass(**kw):
        judged.append(kw["growth"])
        return False

    monkeypatch.setattr(qt, "peak_growth", peak_growth)
    monkeypatch.setattr(qt, "needs_second_pass", needs_second_pass)
    result = scan_library(dataset, qt_config=cfg, train_config=train)
    seeded = next(e["seeded_classes"] for e in result.epochs if "seeded_classes" in e)
    seed_size = int((result.pre_quarantine & np.isin(dataset.labels, seeded)).sum())
    assert seed_size > 0 and peak_calls == [(["quarantine"] * 4, seed_size, 2)] and judged == [99.0]
    peak_calls.clear()
    judged.clear()
    scan_library(dataset, qt_config=replace(cfg, second_pass_peak_growth=False), train_config=train)
    assert not peak_calls and len(judged) == 1 and judged[0] < 99.0


def test_second_pass_seed_is_the_first_pass_flags_cut_by_their_pixels(tiny_folder, monkeypatch):
    """The wiring of qt.relabelled_flags (its rule: tests/test_qt.py): handed the first pass's flags and the
    pixel embedding, what it returns seeds the second pass and run.json's second_pass says what it saw; share 1
    does not call it."""
    from qtclean import QTConfig, TrainConfig, load_dataset, qt
    from qtclean import scan as scan_library

    dataset = load_dataset(tiny_folder[0])
    cfg = QTConfig(epochs_pre=4, pre_min_steps=0, epochs_quarantine=4, epochs_dynamic=2, second_pass_epochs=2,
                   second_pass_dynamic=1, second_pass_seed_max_own_share=0.7, early_stop_patience=0,
                   max_ambiguous_share=1.0)
    train = TrainConfig(batch_size=32, threads=1)
    monkeypatch.setattr(qt, "needs_second_pass", lambda **kw: True)
    calls = []

    def keep_one_class(embedding, labels, flags, seed, num_classes, cfg, baseline):
        calls.append((int(flags.sum()), embedding.shape[0], cfg.second_pass_seed_max_own_share))
        kept = flags & (labels == labels[flags][0])
        return kept, {"made up": {"seed": int(kept.sum())}}

    monkeypatch.setattr(qt, "relabelled_flags", keep_one_class)
    result = scan_library(dataset, qt_config=cfg, train_config=train)
    record = result.extra["second_pass"]
    assert len(calls) == 1 and calls[0][1:] == (dataset.num_samples, 0.7)
    assert sum(record["first_pass_flags_per_class"]) == calls[0][0] > 0
    assert record["seed_content"] == {"made up": {"seed": sum(record["seed_per_class"])}}
    assert sum(c > 0 for c in record["seed_per_class"]) == 1  # the seed is what came back
    calls.clear()
    scan_library(dataset, qt_config=replace(cfg, second_pass_seed_max_own_share=1.0), train_config=train)
    assert not calls


def test_second_pass_seed_plain_pixels_reaches_the_settings(tiny_folder, tmp_path):
    """--second-pass-seed-plain-pixels switches off judging the seed with the flags' shared pattern taken out
    (the rule: tests/test_qt.py); run.json's settings say which ran."""
    for args, expected in (((), True), (("--second-pass-seed-plain-pixels",), False)):
        result = scan(tiny_folder[0], "--out", tmp_path / str(expected), *args)
        assert result.exit_code == 0, result.stderr
        settings = json.loads((tmp_path / str(expected) / "run.json").read_text())["settings"]["qt"]
        assert settings["second_pass_seed_trigger_out"] is expected


def _withdrawal_that_flags_half_of(other: int):
    """readout.withdraw_ambiguous as it is, then every other member of class ``other`` flagged (kept, recorded):
    a second flagged class for the rules that judge one class's flags against another's."""
    import torch

    real_withdraw = readout.withdraw_ambiguous

    def flag_other_too(scores, flagged, labels, k, cfg, **kw):
        kept, info = real_withdraw(scores, flagged, labels, k, cfg, **kw)
        kept = kept | ((labels == other) & (torch.arange(labels.numel(), device=labels.device) % 2 == 0))
        info[other] = {"flagged": int(kept[labels == other].sum()), "ambiguous_share": 0.0, "withdrawn": False}
        return kept, info

    return flag_other_too


def test_flags_unlike_the_target_are_withdrawn_recorded_and_said(finished, tiny_folder, tmp_path, monkeypatch):
    """The wiring of readout.withdraw_unlike_target (its rule: tests/test_readout.py): with a second class flagged, the
    scan hands it the pixel embedding and the set's label agreement, writes the flags it returns, and run.json and the
    summary say why that class was withdrawn; --keep-unlike-target does not call it."""
    import torch

    default_run = finished[3]
    before = json.loads((default_run / "run.json").read_text())
    target = max(range(len(before["flagged_per_class"])), key=lambda c: before["flagged_per_class"][c])
    other = next(c for c, n in enumerate(before["flagged_per_class"]) if n == 0)
    flag_other_too = _withdrawal_that_flags_half_of(other)

    calls = []

    def spy(embedding, labels, flagged, info, k, cfg, baseline):
        calls.append((embedding.shape, baseline, sorted(torch.unique(labels[flagged]).tolist())))
        info[other].update(withdrawn=True, unlike_target=[target])
        return flagged & (labels != other)

    monkeypatch.setattr(readout, "withdraw_ambiguous", flag_other_too)
    monkeypatch.setattr(readout, "withdraw_unlike_target", spy)
    result = scan(tiny_folder[0], "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    shape, baseline, classes = calls[-1]  # the final read-out (a first-pass probe may read out before it)
    assert shape[0] == before["dataset"]["count"]  # one embedding row per sample
    assert 0.0 < baseline <= 1.0 and other in classes and target in classes
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["flagged_per_class"] == before["flagged_per_class"]  # the returned flags are the ones written
    assert info["quarantine_ambiguity"][str(other)]["unlike_target"] == [target]
    assert f"class {other} (" in info["flags_withdrawn"] and "do not look like relabelled" in info["flags_withdrawn"]
    assert "do not look like relabelled" in " ".join(result.stderr.split())
    calls.clear()
    assert scan(tiny_folder[0], "--out", tmp_path / "kept", "--keep-unlike-target").exit_code == 0
    assert calls == []


def test_a_class_off_the_shared_trigger_is_withdrawn_recorded_said_and_not_completed(finished, tiny_folder, tmp_path,
                                                                                       monkeypatch):
    """The wiring of readout.withdraw_off_trigger_classes (its rule: tests/test_readout.py): with two of the three
    classes flagged (a many-target attack), the scan hands it the pixel embedding, the label agreement and the
    flags, writes the flags it returns, and run.json and the summary say why that class was withdrawn; the trigger
    residual's flags in it are not completed by the withdrawn quarantine's ranking (that ranking is what lacked
    the trigger); --keep-off-trigger does not call it."""
    import torch

    before = json.loads((finished[3] / "run.json").read_text())
    target = max(range(len(before["flagged_per_class"])), key=lambda c: before["flagged_per_class"][c])
    other = next(c for c, n in enumerate(before["flagged_per_class"]) if n == 0)
    flag_other_too = _withdrawal_that_flags_half_of(other)

    calls, completions, counted = [], [], []

    def spy(embedding, labels, flagged, info, k, cfg, baseline):
        calls.append((embedding.shape, baseline, sorted(torch.unique(labels[flagged]).tolist())))
        info[other].update(withdrawn=True, off_trigger=[target])
        return flagged & (labels != other)

    def residual(embedding, labels, flagged, k, cfg, baseline, **kw):
        counted.append(torch.nonzero(kw["quarantined_classes"]).flatten().tolist())
        out, added_scores = flagged.clone(), torch.zeros(flagged.shape)
        members = torch.nonzero(labels == other).flatten()[:3]
        out[members], added_scores[members] = True, 0.8
        return out, added_scores, {"threshold_cosine": 0.5, "added_per_class": {str(other): 3}}

    def complete(probability, flagged, residual_flags, labels, withdrawn, *args):
        completions.append(list(withdrawn))
        return flagged, {}

    monkeypatch.setattr(readout, "withdraw_ambiguous", flag_other_too)
    monkeypatch.setattr(readout, "withdraw_off_trigger_classes", spy)
    monkeypatch.setattr(readout, "flag_by_trigger_residual", residual)
    monkeypatch.setattr(readout, "complete_residual_flags", complete)
    quiet = ("--no-second-pass-after-residual", "--trigger-free-quantile", "0")
    result = scan(tiny_folder[0], "--out", tmp_path / "run", *quiet)
    assert result.exit_code == 0, result.output
    shape, baseline, classes = calls[-1]  # the final read-out (a first-pass probe may read out before it)
    assert shape[0] == before["dataset"]["count"] and 0.0 < baseline <= 1.0 and classes == sorted([other, target])
    assert completions == []  # the one withdrawn class lacked the trigger: its ranking completes nothing
    assert counted[-1] == [target]  # a quarantine judged false does not count toward the many-target bar
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["quarantine_ambiguity"][str(other)]["off_trigger"] == [target]
    assert info["flagged_per_class"][other] == 3  # the residual's flags only
    said = f"the trigger that the flags of class {target} share is in their pixels no more than in the rest"
    assert f"class {other} (" in info["flags_withdrawn"] and said in info["flags_withdrawn"]
    assert said in " ".join(result.stderr.split())
    calls.clear()
    assert scan(tiny_folder[0], "--out", tmp_path / "kept", *quiet, "--keep-off-trigger").exit_code == 0
    assert calls == []


def test_a_withdrawn_class_beside_flags_elsewhere_is_scored_down(finished, tiny_folder, tmp_path, monkeypatch):
    """The wiring of readout.demote_withdrawn_scores (its rule: tests/test_readout.py): one class with no content seed
    reported withdrawn beside the run's flags, scores.csv holds its scores times --withdrawn-score-scale and every
    other score as the plain run wrote it, and run.json says which class was scaled."""
    default_run = finished[3]
    before = json.loads((default_run / "run.json").read_text())
    content_seeded = {c for e in before["epochs"] for c, n in enumerate(e.get("content_seed_per_class", [])) if n}
    other = next(c for c, n in enumerate(before["flagged_per_class"]) if n == 0 and c not in content_seeded)
    assert sum(before["flagged_per_class"]) > 0
    real = readout.withdraw_ambiguous

    def withdraw_other(scores, flagged, labels, k, cfg, **kw):
        kept, info = real(scores, flagged, labels, k, cfg, **kw)
        info[other] = {"flagged": 0, "ambiguous_share": 1.0, "withdrawn": True}
        return kept, info

    monkeypatch.setattr(readout, "withdraw_ambiguous", withdraw_other)
    run = tmp_path / "run"
    # by the flags alone: a second quarantined class of three would make this a many-target attack, where the
    # trigger residual may add flags (tests/test_readout.py,
    # test_the_trigger_residual_counts_the_classes_quarantined_before_withdrawals)
    result = scan(tiny_folder[0], "--out", run, "--withdrawn-score-scale", "0.25", "--residual-by-flagged-classes")
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["quarantine_ambiguity"][str(other)]["scores_scaled"] is True
    rows, plain = read_csv(run / "scores.csv")[1:], read_csv(default_run / "scores.csv")[1:]
    assert [r[:4] + r[5:] for r in rows] == [r[:4] + r[5:] for r in plain]  # same samples, same flags
    scaled = [int(r[2]) == other for r in rows]
    assert max(float(was[4]) for was, s in zip(plain, scaled) if s) > 1e-3  # a scaled score differs visibly
    for row, was, is_scaled in zip(rows, plain, scaled):
        assert float(row[4]) == pytest.approx(float(was[4]) * (0.25 if is_scaled else 1.0), abs=2e-6)


def test_score_outliers_are_flagged_recorded_and_said(finished_model_scores, tiny_folder, tmp_path, monkeypatch):
    """The wiring of readout.flag_score_outliers (its rule: tests/test_readout.py): called once with the run's scores,
    flags, the pixel embedding and the set's label agreement; the flags it returns are the ones written, the scores stay
    as the plain run wrote them (both --model-scores), and run.json and the summary say so; --score-outlier-quantile 0
    does not call it."""
    import torch

    default_run = finished_model_scores
    plain = read_csv(default_run / "scores.csv")[1:]
    calls = []

    def spy(scores, flagged, labels, k, embedding, cfg, baseline):
        calls.append((cfg.score_outlier_quantile, embedding.shape[0], baseline))
        target = int(torch.bincount(labels[flagged], minlength=k).argmax())
        candidates = torch.nonzero((labels == target) & ~flagged).flatten()
        chosen = candidates[scores[candidates].argmax()]
        out = flagged.clone()
        out[chosen] = True
        return out, {"threshold_z": 2.5, "added_per_class": {str(target): 1}}

    monkeypatch.setattr(readout, "flag_score_outliers", spy)
    run = tmp_path / "run"
    # the trigger-free rule kept to many-target attacks and the exact-trigger rule off: the forced flag carries no
    # trigger in the pixels
    result = scan(tiny_folder[0], "--out", run, "--score-outlier-quantile", "0.98", "--model-scores",
                  "--trigger-free-many-target-only", "--shared-block-share", "0")
    assert result.exit_code == 0, result.output
    quantile, rows, baseline = calls[-1]  # the final read-out (a first-pass probe may read out before it)
    assert quantile == 0.98 and rows == len(plain) and 0.0 < baseline <= 1.0
    written = read_csv(run / "scores.csv")[1:]
    assert [r[4] for r in written] == [r[4] for r in plain]  # scores untouched
    newly = [r[0] for r, was in zip(written, plain) if r[5] != was[5]]
    assert len(newly) == 1 and written[int(newly[0])][5] == "1"
    assert newly[0] in {r[0] for r in read_csv(run / "flagged.csv")[1:]}
    info = json.loads((run / "run.json").read_text())
    assert info["score_outliers"]["added_per_class"] and sum(info["flagged_per_class"]) == sum(
        int(r[5]) for r in written)
    assert "1 of the flags are score outliers" in " ".join(result.stderr.split())
    calls.clear()
    assert scan(tiny_folder[0], "--out", tmp_path / "off", "--score-outlier-quantile", "0").exit_code == 0
    assert calls == []


def test_confident_lookalikes_are_flagged_scored_recorded_and_said(finished, tiny_folder, tmp_path, monkeypatch):
    """The wiring of readout.flag_confident_lookalikes (its rule: tests/test_readout.py): called with the final model's
    logits (N, 2K), the flags as the earlier rules left them, the withdrawn classes, the pixel embedding and the
    set's label agreement; the flag it adds (forced here: one unflagged member of the most flagged class) is
    written, scored at least 0.5 with its class's other members at most 0.5, kept in run.json and said in the
    summary; --lookalike-margin-quantile 0 does not call it."""
    import torch

    plain = read_csv(finished[3] / "scores.csv")[1:]
    calls = []

    def spy(logits, flagged, labels, withdrawn, embedding, k, cfg, baseline):
        calls.append((cfg.lookalike_margin_quantile, tuple(logits.shape), int(flagged.sum()), list(withdrawn),
                      embedding.shape[0], baseline))
        target = int(torch.bincount(labels[flagged], minlength=k).argmax())
        out = flagged.clone()
        out[torch.nonzero((labels == target) & ~flagged).flatten()[0]] = True
        return out, {str(target): {"lookalikes": 1, "confident_share": 1.0, "margin_bar": 2.0, "added": 1}}

    monkeypatch.setattr(readout, "flag_confident_lookalikes", spy)
    run = tmp_path / "run"
    # the trigger-free rule kept to many-target attacks: the forced flag carries no trigger in the pixels
    result = scan(tiny_folder[0], "--out", run, "--lookalike-margin-quantile", "0.6", "--trigger-free-many-target-only",
                  "--shared-block-share", "0")  # the exact-trigger rule would judge the forced flags too
    assert result.exit_code == 0, result.output
    quantile, shape, given, withdrawn, rows, baseline = calls[-1]  # the final read-out (a probe may come first)
    assert quantile == 0.6 and shape == (len(plain), 6) and rows == len(plain) and withdrawn == []
    assert 0.0 < baseline <= 1.0
    assert given == sum(int(r[5]) for r in plain)
    written = read_csv(run / "scores.csv")[1:]
    newly = [r for r, was in zip(written, plain) if r[5] != was[5]]
    assert len(newly) == 1 and newly[0][5] == "1" and float(newly[0][4]) >= 0.5
    target = int(newly[0][2])
    assert all(float(r[4]) <= 0.5 for r in written if int(r[2]) == target and r[5] == "0")
    info = json.loads((run / "run.json").read_text())
    assert info["confident_lookalikes"][str(target)]["added"] == 1
    assert sum(info["flagged_per_class"]) == sum(int(r[5]) for r in written)
    assert "1 of the flags look like images of other classes" in " ".join(result.stderr.split())
    calls.clear()
    assert scan(tiny_folder[0], "--out", tmp_path / "off", "--lookalike-margin-quantile", "0").exit_code == 0
    assert calls == []


def test_residual_flags_in_flagged_classes_are_written_recorded_and_said(finished, tiny_folder, tmp_path,
                                                                           monkeypatch):
    """The wiring of readout.flag_residual_in_flagged_classes (its rule: tests/test_readout.py): called once, after the
    look-alikes, with the pixel embedding, the flags so far and the set's label agreement; the flag it adds (forced
    here: one unflagged member of the most flagged class) is written with at least the score it gave, its class's
    other members at most 0.5; run.json keeps what it reported and the summary counts it;
    --no-residual-in-flagged-classes does not call it."""
    import torch

    plain = read_csv(finished[3] / "scores.csv")[1:]
    calls = []

    def spy(embedding, labels, flagged, k, cfg, baseline):
        calls.append((embedding.shape[0], int(flagged.sum()), baseline))
        target = int(torch.bincount(labels[flagged], minlength=k).argmax())
        out, added_scores = flagged.clone(), torch.zeros(flagged.shape)
        first = torch.nonzero((labels == target) & ~flagged).flatten()[0]
        out[first], added_scores[first] = True, 0.8
        return out, added_scores, {str(target): {"relabelled_share": 1.0, "added": 1, "bar_cosine": 0.3,
                                                 "flags_median_cosine": 0.7}}

    monkeypatch.setattr(readout, "flag_residual_in_flagged_classes", spy)
    run = tmp_path / "run"
    result = scan(tiny_folder[0], "--out", run, "--trigger-free-many-target-only",
                  "--shared-block-share", "0")  # as in the look-alikes' test
    assert result.exit_code == 0, result.output
    rows, given, baseline = calls[-1]  # the final read-out (a probe may come first)
    assert rows == len(plain) and given == sum(int(r[5]) for r in plain) and 0.0 < baseline <= 1.0
    written = read_csv(run / "scores.csv")[1:]
    newly = [r for r, was in zip(written, plain) if r[5] != was[5]]
    assert len(newly) == 1 and newly[0][5] == "1" and float(newly[0][4]) >= 0.8
    target = int(newly[0][2])
    assert all(float(r[4]) <= 0.5 for r in written if int(r[2]) == target and r[5] == "0")
    info = json.loads((run / "run.json").read_text())
    assert info["residual_in_flagged_classes"][str(target)]["added"] == 1
    assert sum(info["flagged_per_class"]) == sum(int(r[5]) for r in written)
    assert "1 of the flags carry the trigger the class's other flags show" in " ".join(result.stderr.split())
    calls.clear()
    assert scan(tiny_folder[0], "--out", tmp_path / "off", "--no-residual-in-flagged-classes").exit_code == 0
    assert calls == []


def test_own_looking_samples_are_decided_recorded_and_said(finished_model_scores, tiny_folder, tmp_path,
                                                           monkeypatch):
    """The wiring of readout.own_looking_by_score (its rule: tests/test_readout.py): called once, after the score
    outliers, with the run's scores, flags, the pixel embedding, the set's label agreement and the withdrawn classes;
    the flags it returns are the ones written, the scores stay (both runs --model-scores), and run.json and the summary
    say so; --own-looking-flag-z 0 does not call it."""
    import torch

    default_run = finished_model_scores
    plain = read_csv(default_run / "scores.csv")[1:]
    calls = []

    def spy(scores, flagged, labels, k, embedding, cfg, baseline, withdrawn):
        calls.append((cfg.own_looking_flag_z, embedding.shape[0], baseline, int(flagged.sum()), withdrawn.shape))
        members = torch.nonzero(flagged).flatten()
        chosen = members[scores[members].argmin()]
        out = flagged.clone()
        out[chosen] = False
        return out, {"threshold_z": 5.0, "withdrawn_per_class": {str(int(labels[chosen])): 1},
                     "added_per_class": {str(int(labels[chosen])): 0}}

    monkeypatch.setattr(readout, "own_looking_by_score", spy)
    run = tmp_path / "run"
    # the trigger residual in the class would flag the withdrawn poison again (it adds nothing to the plain run)
    result = scan(tiny_folder[0], "--out", run, "--own-looking-flag-z", "1.5", "--model-scores",
                  "--no-residual-in-flagged-classes", "--shared-block-share", "0")
    assert result.exit_code == 0, result.output
    factor, rows, baseline, given, withdrawn_shape = calls[-1]  # the final read-out (a first-pass probe may come first)
    assert factor == 1.5 and rows == len(plain) and 0.0 < baseline <= 1.0 and withdrawn_shape == (3,)
    assert given == sum(int(r[5]) for r in plain)  # the flags as the other rules left them
    written = read_csv(run / "scores.csv")[1:]
    assert [r[4] for r in written] == [r[4] for r in plain]  # scores untouched
    gone = [r[0] for r, was in zip(written, plain) if r[5] != was[5]]
    assert len(gone) == 1 and written[int(gone[0])][5] == "0"
    assert gone[0] not in {r[0] for r in read_csv(run / "flagged.csv")[1:]}
    info = json.loads((run / "run.json").read_text())
    assert sum(info["own_looking_flags"]["withdrawn_per_class"].values()) == 1
    assert sum(info["flagged_per_class"]) == sum(int(r[5]) for r in written)
    assert "1 flags withdrawn, 0 added" in " ".join(result.stderr.split())
    calls.clear()
    assert scan(tiny_folder[0], "--out", tmp_path / "off", "--own-looking-flag-z", "0").exit_code == 0
    assert calls == []


def test_any_quarantine_class_is_the_read_out_recorded_and_said(tiny_folder, tmp_path, monkeypatch):
    """The wiring of qt.is_quarantined's any_class (its rule: tests/test_qt.py): the scan's read-out asks for it
    by default, and a flag it adds (forced here: an unflagged sample of a class that quarantines) is counted per
    class in run.json and said in the summary; --own-quarantine-class reads each sample's own class only."""
    import torch

    from qtclean import qt

    real, calls, forced = qt.is_quarantined, [], []

    def spy(logits, labels, k, any_class=False):
        calls.append(any_class)
        out = real(logits, labels, k, any_class=any_class)
        if any_class:
            own = real(logits, labels, k)
            candidates = torch.nonzero(qt.quarantining_classes(logits, labels, k)[labels] & ~own).flatten()
            forced.append(int(labels[candidates[0]]))
            out = out.clone()
            out[candidates[0]] = True
        return out

    monkeypatch.setattr(qt, "is_quarantined", spy)
    run = tmp_path / "run"
    result = scan(tiny_folder[0], "--out", run)
    assert result.exit_code == 0, result.output
    assert True in calls and len(set(forced)) == 1  # the score asks too: the same sample each time
    info = json.loads((run / "run.json").read_text())
    assert info["settings"]["qt"]["any_quarantine_class"] is True
    expected = [0] * 3
    expected[forced[0]] = 1
    assert info["flagged_in_another_quarantine_class"] == expected
    assert "Flagged in another class's quarantine class: 1" in " ".join(result.stderr.split())
    calls.clear()
    own = tmp_path / "own"
    assert scan(tiny_folder[0], "--out", own, "--own-quarantine-class").exit_code == 0
    assert True not in calls
    assert "flagged_in_another_quarantine_class" not in json.loads((own / "run.json").read_text())

def test_shared_trigger_seed_is_called_recorded_and_seeds(tiny_folder, tmp_path, monkeypatch):
    """The wiring of qt.shared_trigger_seed (its rule: tests/test_qt.py): called at the end of pre-quarantine with
    the penultimate features when some class has no seed; its seed (forced here: three samples of a class without
    one) joins the pre-quarantine set, and the epoch's statistics record it; --no-shared-trigger-seed does not
    call it."""
    import torch

    from qtclean import qt

    calls = []

    def spy(features, labels, pre_mask, k, cfg):
        unseeded = [c for c in range(k) if not bool((pre_mask & (labels == c)).any())]
        calls.append((features.shape[0], features.dim(), unseeded))
        mask = torch.zeros_like(pre_mask)
        mask[torch.nonzero(labels == unseeded[0]).flatten()[:3]] = True
        return mask, {str(unseeded[0]): {"group": 3, "share": 0.01, "separation": 0.9, "accepted": True}}

    monkeypatch.setattr(qt, "shared_trigger_seed", spy)
    run = tmp_path / "run"
    result = scan(tiny_folder[0], "--out", run)
    assert result.exit_code == 0, result.output
    [(rows, dims, unseeded)] = calls
    assert rows == 240 and dims == 2 and unseeded  # every sample of the tiny set (3 x 80)
    pre = next(e for e in json.loads((run / "run.json").read_text())["epochs"] if "pre_quarantine_per_class" in e)
    assert pre["shared_trigger_seed"][str(unseeded[0])]["accepted"] is True
    assert pre["shared_trigger_seed_per_class"][unseeded[0]] == 3
    assert pre["pre_quarantine_per_class"][unseeded[0]] >= 3
    calls.clear()
    assert scan(tiny_folder[0], "--out", tmp_path / "off", "--no-shared-trigger-seed").exit_code == 0
    assert calls == []

def test_withdrawn_flags_are_recorded_said_and_leave_the_scores(finished_model_scores, tiny_folder, tmp_path,
                                                                 monkeypatch):
    """The wiring of readout.withdraw_ambiguous (its rule: tests/test_readout.py): forced to withdraw every flagged
    class, the run flags nothing, keeps the scores (both runs --model-scores), and run.json and the summary say which
    class was withdrawn and why."""

    real = readout.withdraw_ambiguous
    monkeypatch.setattr(readout, "withdraw_ambiguous", lambda scores, flagged, labels, k, cfg, **kw: real(
        scores, flagged, labels, k, replace(cfg, max_ambiguous_share=-1.0), **kw))
    result = scan(tiny_folder[0], "--out", tmp_path / "run", "--model-scores")
    assert result.exit_code == 0, result.output
    default_run, run = finished_model_scores, tmp_path / "run"
    before, info = (json.loads((r / "run.json").read_text()) for r in (default_run, run))
    flagged_classes = [c for c, n in enumerate(before["flagged_per_class"]) if n]
    assert not any(v["withdrawn"] for v in before["quarantine_ambiguity"].values())  # FAST_ARGS keep them
    assert flagged_classes and info["flagged"] == 0 and len(read_csv(run / "flagged.csv")) == 1  # header only
    assert sorted(map(int, info["quarantine_ambiguity"])) == flagged_classes
    assert all(v["withdrawn"] for v in info["quarantine_ambiguity"].values())
    assert read_csv(run / "scores.csv")[1:] == [row[:-1] + ["0"] for row in read_csv(default_run / "scores.csv")[1:]]
    assert info["flags_withdrawn"].startswith(f"class {flagged_classes[0]} (")
    assert "Flags withdrawn" in result.stderr


def test_min_class_remainder_withdraws_a_class_taken_whole_and_says_so(finished, tiny_folder, tmp_path):
    """The wiring of --min-class-remainder (its rule: tests/test_readout.py): at 100 every flagged class leaves fewer
    than 100 median classes outside its flags, so each is withdrawn; run.json keeps how many were left and the
    summary says the quarantine took the class."""
    result = scan(tiny_folder[0], "--out", tmp_path / "run", "--min-class-remainder", "100")
    assert result.exit_code == 0, result.output
    before, info = (json.loads((r / "run.json").read_text()) for r in (finished[3], tmp_path / "run"))
    sizes = Counter(int(row[2]) for row in read_csv(tmp_path / "run" / "scores.csv")[1:])
    flagged_classes = [c for c, n in enumerate(before["flagged_per_class"]) if n]
    assert flagged_classes and info["flagged"] == 0
    for c in flagged_classes:
        v = info["quarantine_ambiguity"][str(c)]
        assert v["withdrawn"] and v["unflagged_left"] == sizes[c] - v["flagged"]
    assert "the quarantine took the class itself" in info["flags_withdrawn"]
    assert "Flags withdrawn" in result.stderr


def test_ambiguous_flags_kept_as_relabelled_are_recorded_and_said(finished, tiny_folder, tmp_path, monkeypatch):
    """The same forced withdrawal with the content test accepting every group: the run keeps the default run's
    flags, and run.json and the summary say which class was kept and why."""

    real = readout.withdraw_ambiguous
    monkeypatch.setattr(readout, "withdraw_ambiguous", lambda scores, flagged, labels, k, cfg, **kw: real(
        scores, flagged, labels, k, replace(cfg, max_ambiguous_share=-1.0, content_max_agreement=1.0,
                                            content_min_diversity=0.0), **kw))
    result = scan(tiny_folder[0], "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    before, info = (json.loads((r / "run.json").read_text()) for r in (finished[3], tmp_path / "run"))
    assert info["flagged_per_class"] == before["flagged_per_class"] and info["flagged"] > 0
    assert not any(v["withdrawn"] for v in info["quarantine_ambiguity"].values())
    first = next(c for c, n in enumerate(info["flagged_per_class"]) if n)
    assert info["flags_kept_relabelled"].startswith(f"class {first} (")
    assert "Kept although ambiguous" in result.stderr and "flags_withdrawn" not in info


def test_trigger_residual_flags_are_written_recorded_and_said(finished, tiny_folder, tmp_path, monkeypatch):
    """The wiring of readout.flag_by_trigger_residual (its rule: tests/test_readout.py): step 3 hands it the pixel
    embedding, the set's label agreement and the flags so far; a flag it adds (forced here: a sample of a class without
    flags) is written with the score it gave (--model-scores), run.json keeps what it reported and the summary counts
    it; --trigger-residual-quantile 0 does not call it."""
    import torch

    default_run = finished[3]
    before = json.loads((default_run / "run.json").read_text())
    other = next(c for c, n in enumerate(before["flagged_per_class"]) if n == 0)
    calls = []

    def spy(embedding, labels, flagged, k, cfg, baseline, **kw):
        calls.append((embedding.shape[0], int(flagged.sum()), cfg.trigger_residual_quantile, baseline))
        out, added_scores = flagged.clone(), torch.zeros(flagged.shape)
        first = torch.nonzero(labels == other).flatten()[0]
        out[first], added_scores[first] = True, 0.75
        return out, added_scores, {"threshold_cosine": 0.5, "added_per_class": {str(other): 1}}

    monkeypatch.setattr(readout, "flag_by_trigger_residual", spy)
    result = scan(tiny_folder[0], "--out", tmp_path / "run", "--no-second-pass-after-residual", "--model-scores")
    assert result.exit_code == 0, result.output
    [(rows, flags_so_far, quantile, baseline)] = calls
    assert rows == before["dataset"]["count"] and flags_so_far == before["flagged"]
    assert quantile == 0.999 and 0.0 < baseline <= 1.0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    expected = list(before["flagged_per_class"])
    expected[other] = 1
    assert info["flagged_per_class"] == expected
    assert info["trigger_residual"] == {"threshold_cosine": 0.5, "added_per_class": {str(other): 1}}
    [added] = [row for row in read_csv(tmp_path / "run" / "scores.csv")[1:] if int(row[2]) == other and row[5] == "1"]
    assert float(added[4]) == pytest.approx(0.75)  # its quarantine probability was lower: the residual's score
    assert "1 flags in classes without a quarantine" in " ".join(result.stderr.split())
    calls.clear()
    assert scan(tiny_folder[0], "--out", tmp_path / "off", "--trigger-residual-quantile", "0").exit_code == 0
    assert calls == []


def test_the_classes_quarantined_before_withdrawals_reach_the_trigger_residual(finished, tiny_folder, tmp_path,
                                                                               monkeypatch):
    """readout.flag_by_trigger_residual gets the classes the quarantine flagged before step 3 withdrew any (here
    every class with a flag in the default run; none withdrawn), as a (K,) mask, and the setting that lets it count
    them: on by default, off with --residual-by-flagged-classes."""
    import torch

    before = json.loads((finished[3] / "run.json").read_text())
    calls = []

    def spy(embedding, labels, flagged, k, cfg, baseline, **kw):
        calls.append((cfg.residual_by_quarantined_classes, kw.get("quarantined_classes")))
        return flagged, torch.zeros(flagged.shape), {}

    monkeypatch.setattr(readout, "flag_by_trigger_residual", spy)
    result = scan(tiny_folder[0], "--out", tmp_path / "run", "--no-second-pass-after-residual")
    assert result.exit_code == 0, result.output
    [(setting, quarantined)] = calls
    assert setting is True and quarantined.tolist() == [n > 0 for n in before["flagged_per_class"]]
    # (a class withdrawn as unlike the target or without the trigger is left out: the off-trigger wiring test)
    calls.clear()
    assert scan(tiny_folder[0], "--out", tmp_path / "by-flags", "--no-second-pass-after-residual",
                "--residual-by-flagged-classes").exit_code == 0
    [(setting, by_flags_quarantined)] = calls
    assert setting is False and torch.equal(by_flags_quarantined, quarantined)


def test_a_withdrawn_class_the_residual_reflags_is_completed_recorded_and_said(finished, finished_model_scores,
                                                                              tiny_folder, tmp_path, monkeypatch):
    """The wiring of readout.complete_residual_flags (its rule: tests/test_readout.py): forced here, the target class's
    quarantine is withdrawn (a flag of another class stays, so step 3 goes on) and the residual re-flags 3 of its
    members; the completion gets the quarantine probability as the model gave it, the residual's flags and the
    withdrawn class, and 2 more flags it adds are written, scored at least 0.5 with the class's rest at most 0.5,
    kept in run.json and said in the summary; with --residual-completion-quantile 0 nothing is added."""
    import torch

    target = max(range(3), key=lambda c: json.loads((finished[3] / "run.json").read_text())["flagged_per_class"][c])
    real_withdraw, real_complete = readout.withdraw_ambiguous, readout.complete_residual_flags

    def withdraw(scores, flagged, labels, k, cfg, **kw):
        out, info = real_withdraw(scores, flagged, labels, k, replace(cfg, max_ambiguous_share=-1.0), **kw)
        out[torch.nonzero(labels != target).flatten()[0]] = True  # a flag elsewhere: step 3's later rules run
        return out, info

    def residual(embedding, labels, flagged, k, cfg, baseline, **kw):
        out, added_scores = flagged.clone(), torch.zeros(flagged.shape)
        members = torch.nonzero(labels == target).flatten()[:3]
        out[members], added_scores[members] = True, 0.8
        return out, added_scores, {"threshold_cosine": 0.5, "added_per_class": {str(target): 3}}

    calls = []

    def complete(probability, flagged, residual_flags, labels, withdrawn, embedding, k, cfg):
        calls.append((probability.clone(), residual_flags.clone(), list(withdrawn)))
        out = flagged.clone()
        out[torch.nonzero((labels == target) & ~flagged).flatten()[:2]] = True
        return out, {str(target): 2}

    monkeypatch.setattr(readout, "withdraw_ambiguous", withdraw)
    monkeypatch.setattr(readout, "flag_by_trigger_residual", residual)
    monkeypatch.setattr(readout, "complete_residual_flags", complete)
    quiet = ("--no-second-pass-after-residual", "--trigger-free-quantile", "0", "--score-outlier-quantile", "0",
             "--own-looking-flag-z", "0", "--model-scores")
    result = scan(tiny_folder[0], "--out", tmp_path / "run", *quiet)
    assert result.exit_code == 0, result.output
    [(probability, residual_flags, withdrawn)] = calls
    assert withdrawn == [target] and int(residual_flags.sum()) == 3
    rows = read_csv(tmp_path / "run" / "scores.csv")[1:]
    default_scores = {row[0]: float(row[4]) for row in read_csv(finished_model_scores / "scores.csv")[1:]}
    assert probability.numpy() == pytest.approx([default_scores[row[0]] for row in rows], abs=1e-6)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["trigger_residual"]["completed_per_class"] == {str(target): 2}
    assert info["flagged_per_class"][target] == 5
    in_target = [row for row in rows if int(row[2]) == target]
    assert all(float(row[4]) >= 0.5 for row in in_target if row[5] == "1")
    assert all(float(row[4]) <= 0.5 for row in in_target if row[5] == "0")
    assert "3 flags in classes without a quarantine" in " ".join(result.stderr.split())
    assert "and 2 more there scored like them" in " ".join(result.stderr.split())
    monkeypatch.setattr(readout, "complete_residual_flags", real_complete)
    off = scan(tiny_folder[0], "--out", tmp_path / "off", *quiet, "--residual-completion-quantile", "0")
    assert off.exit_code == 0, off.output
    off_info = json.loads((tmp_path / "off" / "run.json").read_text())
    assert "completed_per_class" not in off_info["trigger_residual"] and off_info["flagged_per_class"][target] == 3


def test_trigger_free_flags_are_withdrawn_recorded_and_said(finished, tiny_folder, tmp_path, monkeypatch):
    """The wiring of readout.withdraw_trigger_free_flags (its rule: tests/test_readout.py): step 3 hands it the pixel
    embedding, the set's label agreement, the flags so far and the model's probability of each label, after the
    trigger residual; a flag it withdraws (forced here: the first flag) is written unflagged, run.json keeps what it
    reported and the summary counts it; --trigger-free-quantile 0 does not call it. The rule acts in any attack by
    default, with the model's word (0.01); --trigger-free-many-target-only and --trigger-free-confidence-quantile 0
    hand it the settings that keep it to many-target attacks and to the pixels (no probability computed)."""

    before = json.loads((finished[3] / "run.json").read_text())
    calls, any_target = [], []

    def spy(embedding, labels, flagged, k, cfg, baseline, label_probability):
        calls.append((embedding.shape[0], int(flagged.sum()), cfg.trigger_free_quantile, baseline))
        any_target.append((cfg.trigger_free_any_target, cfg.trigger_free_confidence_quantile,
                           label_probability is not None))
        if label_probability is not None:
            assert label_probability.shape == labels.shape
            assert bool(((label_probability >= 0) & (label_probability <= 1 + 1e-6)).all())
        out = flagged.clone()
        first = int(flagged.nonzero()[0])
        out[first] = False
        info = {"bar_cosine": 0.2, "flags_median_cosine": 0.9, "withdrawn_per_class": {str(int(labels[first])): 1}}
        return out, info

    monkeypatch.setattr(readout, "withdraw_trigger_free_flags", spy)
    result = scan(tiny_folder[0], "--out", tmp_path / "run", "--no-second-pass-after-residual",
                  "--shared-block-share", "0")
    assert result.exit_code == 0, result.output
    [(rows, flags_so_far, quantile, baseline)] = calls
    assert rows == before["dataset"]["count"] and flags_so_far == before["flagged"] > 0
    assert quantile == 0.99 and 0.0 < baseline <= 1.0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["flagged"] == before["flagged"] - 1
    assert info["trigger_free_flags"]["withdrawn_per_class"] and info["trigger_free_flags"]["bar_cosine"] == 0.2
    assert sum(row[5] == "1" for row in read_csv(tmp_path / "run" / "scores.csv")[1:]) == before["flagged"] - 1
    assert "1 flags withdrawn that carry no trigger in their pixels" in " ".join(result.stderr.split())
    calls.clear()
    assert scan(tiny_folder[0], "--out", tmp_path / "off", "--trigger-free-quantile", "0").exit_code == 0
    assert calls == []
    assert scan(tiny_folder[0], "--out", tmp_path / "many", "--no-second-pass-after-residual",
                "--trigger-free-many-target-only", "--trigger-free-confidence-quantile", "0").exit_code == 0
    assert any_target == [(True, 0.01, True), (False, 0.0, False)]


def test_a_class_the_trigger_residual_finds_whole_gets_a_second_pass(finished, tiny_folder, tmp_path, monkeypatch):
    """When step 3, read on the first pass, flags a class the quarantine never seeded (forced here: the residual
    flags every sample of a class without flags, enough to seed it), the quarantine runs again seeded with the
    read-out's flags, that class included, and run.json says why; with --no-second-pass-after-residual, or when the
    residual adds too few to seed a class (one sample), no second pass runs. A few flags (3 of the class's 70: over
    --min-seed-share of the class, under --min-pre-share of the whole seed, raised here to 0.5) seed that pass too,
    and not with --no-residual-seed-by-own-share."""
    import torch

    from qtclean import qt

    before = json.loads((finished[3] / "run.json").read_text())
    other = next(c for c, n in enumerate(before["flagged_per_class"]) if n == 0)
    added = {"count": None}  # the residual's flags in that class: None = all of it
    # the other reason for a second pass cannot hold; the forced flags carry no trigger, so the rule that withdraws
    # such flags stays out
    settled = ("--second-pass-min-growth", "1000", "--trigger-free-quantile", "0")

    def residual(embedding, labels, flagged, k, cfg, baseline, **kw):
        out = flagged.clone()
        members = torch.nonzero(labels == other).flatten()
        out[members[:added["count"]]] = True
        added_scores = (out & ~flagged).float()
        return out, added_scores, {"threshold_cosine": 0.5, "added_per_class": {str(other): int(added_scores.sum())}}

    monkeypatch.setattr(readout, "flag_by_trigger_residual", residual)
    monkeypatch.setattr(qt, "MANY_TARGET_CLASS_SHARE", 0.0)  # the tiny set seeds one class: count it as many
    result = scan(tiny_folder[0], "--out", tmp_path / "run", *settled)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "trigger residual" in info["second_pass"]["reason"] and f"({other})" in info["second_pass"]["reason"]
    assert info["second_pass"]["seed_per_class"][other] > 0  # the class the first pass never seeded
    sizes = Counter(int(row[2]) for row in read_csv(tmp_path / "run" / "scores.csv")[1:])
    assert info["second_pass"]["first_pass_flags_per_class"][other] == sizes[other]
    assert any(e["phase"] == "second pass" for e in info["epochs"])
    off = scan(tiny_folder[0], "--out", tmp_path / "off", *settled, "--no-second-pass-after-residual")
    assert off.exit_code == 0 and "second_pass" not in json.loads((tmp_path / "off" / "run.json").read_text())
    assert info["second_pass"]["residual_seeded"] is True
    added["count"] = 1
    one = scan(tiny_folder[0], "--out", tmp_path / "one", *settled)
    assert one.exit_code == 0 and "second_pass" not in json.loads((tmp_path / "one" / "run.json").read_text())
    added["count"], few = 3, ("--min-pre-share", "0.5")
    own = scan(tiny_folder[0], "--out", tmp_path / "own", *settled, *few)
    assert own.exit_code == 0, own.output
    own_info = json.loads((tmp_path / "own" / "run.json").read_text())
    assert own_info["second_pass"]["residual_seeded"] is True
    assert own_info["second_pass"]["seed_per_class"][other] == 3
    assert any(e["phase"] == "second pass" for e in own_info["epochs"])
    strict = scan(tiny_folder[0], "--out", tmp_path / "strict", *settled, *few, "--no-residual-seed-by-own-share")
    assert strict.exit_code == 0 and "second_pass" not in json.loads((tmp_path / "strict" / "run.json").read_text())


def test_scan_help_groups_options_by_step():
    """The ~50 scan options are grouped as README's algorithm section is: each under its step's panel, the
    everyday ones first, so a user looking for e.g. the read-out's switches finds them together."""
    scan_help = runner.invoke(app, ["scan", "--help"], env={"COLUMNS": "240"}).output
    panels = [cli.TRAINING, cli.STEP1, cli.STEP2, cli.STEP3, cli.BASELINES]
    starts = [scan_help.index(f"─ {name} ─") for name in panels]
    assert starts == sorted(starts) and scan_help.index("─ Options ─") < starts[0]

    def panel_of(option: str) -> str:
        at = re.search(rf"^│ {option}\s", scan_help, re.M).start()
        return max((s, name) for s, name in zip([scan_help.index("─ Options ─"), *starts], ["Options", *panels])
                   if s < at)[1]

    assert panel_of("--clean-out") == "Options" and panel_of("--variant") == "Options"
    assert panel_of("--lr-quarantine") == cli.TRAINING
    assert panel_of("--pre-threshold") == cli.STEP1 and panel_of("--shared-trigger-seed") == cli.STEP1
    assert panel_of("--second-pass-epochs") == cli.STEP2 and panel_of("--release") == cli.STEP2
    assert panel_of("--any-quarantine-class") == cli.STEP3 and panel_of("--content-fallback") == cli.STEP3
    assert panel_of("--baseline-epochs") == cli.BASELINES


def test_residual_ranks_raise_unflagged_scores_and_are_recorded(tiny_folder, tmp_path, monkeypatch):
    """The wiring of readout.residual_ranks (its rule: tests/test_readout.py): with half of the classes flagged or more
    (forced: the tiny set flags one class, counted as many here), step 3 hands it the pixel embedding, the final flags
    and the set's label agreement; each unflagged sample then ranks by the larger of its score and its rank (forced:
    0.9 for every unflagged sample, still under 0.5), the flags keep their scores, and run.json keeps what it saw;
    --no-residual-ranked-scores and --model-scores do not call it, nor does a one-target attack."""
    import torch

    from qtclean import qt

    calls = []

    def spy(embedding, labels, flagged, k, cfg, baseline):
        calls.append((embedding.shape[0], int(flagged.sum()), baseline))
        return torch.where(flagged, 0.0, 0.9), {"flags_median_rank": 1.0, "ranked": True}

    monkeypatch.setattr(readout, "residual_ranks", spy)
    one_read = "--no-second-pass-after-residual"
    assert scan(tiny_folder[0], "--out", tmp_path / "one-target", one_read).exit_code == 0 and calls == []
    monkeypatch.setattr(qt, "MANY_TARGET_CLASS_SHARE", 0.0)
    off = scan(tiny_folder[0], "--out", tmp_path / "off", one_read, "--no-residual-ranked-scores")
    assert off.exit_code == 0 and calls == []
    assert scan(tiny_folder[0], "--out", tmp_path / "model", one_read, "--model-scores").exit_code == 0 and calls == []
    result = scan(tiny_folder[0], "--out", tmp_path / "run", one_read)
    assert result.exit_code == 0, result.output
    before = json.loads((tmp_path / "off" / "run.json").read_text())
    [(rows, flags, baseline)] = calls
    assert rows == before["dataset"]["count"] and flags == before["flagged"] > 0 and 0.0 < baseline <= 1.0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["residual_ranked_scores"] == {"flags_median_rank": 1.0, "ranked": True}
    assert "samples rank by the trigger their pixels carry" in " ".join(result.stderr.split())
    assert "residual_ranked_scores" not in before and "rank by the trigger" not in " ".join(off.stderr.split())
    plain = {row[0]: row for row in read_csv(tmp_path / "off" / "scores.csv")[1:]}
    share = info["flag_ranked_scores"]["class_share"]  # the flags' floor for their class (one target, in step 3)
    for row in read_csv(tmp_path / "run" / "scores.csv")[1:]:
        assert row[5] == plain[row[0]][5]
        if row[5] == "1":
            assert row[4] == plain[row[0]][4]  # a flag's score as before
        else:  # the probability the plain run ranked by, and the rank's 0.9 in its place where higher
            floor = share[int(row[2])]
            probability = (2 * float(plain[row[0]][4]) - floor) / (1 - floor)
            expected = 0.5 * (floor + (1 - floor) * max(probability, 0.9))
            assert float(row[4]) == pytest.approx(expected, abs=2e-6) and float(row[4]) < 0.5


def test_images_moved_in_a_centred_set_are_flagged_recorded_and_said(tmp_path):
    """A geometric trigger: 30 of 240 centred objects moved 3 pixels right (labels kept). Whatever the model
    quarantines, the scan flags the 30 (flagged.csv), records where they sit (run.json: out_of_frame) and says so
    in its summary; with --out-of-frame-band 0 it does neither."""
    images, labels, moved = framed()
    ids = write_folder(tmp_path / "data", images, labels)
    result = scan(tmp_path / "data", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    flagged = {row[1] for row in read_csv(tmp_path / "run" / "flagged.csv")[1:]}  # the id column
    assert {ids[i] for i in np.flatnonzero(moved)} <= flagged
    info = json.loads((tmp_path / "run" / "run.json").read_text())["out_of_frame"]
    assert info["offsets"] == [{"axis": "x", "from": 3, "images": 30}]
    assert "(run.json: out_of_frame)" in " ".join(result.stderr.split())
    result = scan(tmp_path / "data", "--out", tmp_path / "off", "--out-of-frame-band", "0")
    assert result.exit_code == 0, result.stderr
    assert "out_of_frame" not in result.stderr
    assert "out_of_frame" not in json.loads((tmp_path / "off" / "run.json").read_text())


def test_a_pattern_written_onto_most_of_a_class_is_flagged_recorded_and_said(tmp_path):
    """Clean-label poison: a pattern on 50 of class 0's 80 images, labels kept, no image relabelled. Whatever the
    model quarantines, the scan flags the 50 (flagged.csv), records the block (run.json: class_bound_blocks) and
    says so in its summary; with the rule off the summary does not."""
    images, labels, _ = synthetic(poison_per_class=0)
    stamped = np.flatnonzero(labels == 0)[:50]
    images[stamped, 0, 1:4, 1:4] = np.array([[30, 90, 150], [210, 250, 170], [110, 50, 10]], dtype=np.uint8)
    ids = write_folder(tmp_path / "data", images, labels)
    result = scan(tmp_path / "data", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    flagged = {row[1] for row in read_csv(tmp_path / "run" / "flagged.csv")[1:]}  # the id column
    assert {ids[i] for i in stamped} <= flagged
    info = json.loads((tmp_path / "run" / "run.json").read_text())["class_bound_blocks"]
    assert info["positions"] == 1 and info["per_class"]["0"]["carriers"] == 50
    assert "(run.json: class_bound_blocks)" in result.stderr
    result = scan(tmp_path / "data", "--out", tmp_path / "off", "--class-block-share", "0")
    assert result.exit_code == 0, result.stderr
    assert "class_bound_blocks" not in result.stderr
    assert "class_bound_blocks" not in json.loads((tmp_path / "off" / "run.json").read_text())
