"""`qtclean export` (and `scan --clean-out`): the cleaned dataset in the input's format, loadable by the usual tools."""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torchvision
from typer.testing import CliRunner

from conftest import FAST_ARGS, tree_hash, write_cifar
from qtclean.cli import app

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [*map(str, args)], input=input)


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, tiny_folder):
    """One scan of the tiny image folder with the one-step export."""
    root, ids, poisoned = tiny_folder
    before = tree_hash(root)
    base = tmp_path_factory.mktemp("export")
    result = invoke("scan", *FAST_ARGS, root, "--out", base / "run", "--clean-out", base / "clean",
                    "--quarantine-out", base / "quarantine")
    assert result.exit_code == 0, result.stderr
    assert tree_hash(root) == before
    return root, ids, base


def test_folder_export_loads_with_torchvision_imagefolder(folder_run):
    root, ids, base = folder_run
    flagged = read_rows(base / "run" / "flagged.csv")
    flagged_ids = {r["id"] for r in flagged}
    assert flagged_ids, "the tiny poisoned set should flag something"
    original = torchvision.datasets.ImageFolder(str(root))
    clean = torchvision.datasets.ImageFolder(str(base / "clean"))
    assert clean.class_to_idx == original.class_to_idx
    kept = [rel for rel in ids if rel not in flagged_ids]
    assert [os.path.relpath(p, base / "clean").replace(os.sep, "/") for p, _ in clean.samples] == kept
    assert len(clean) == len(ids) - len(flagged_ids)
    for rel in kept[:: max(1, len(kept) // 20)]:
        assert (base / "clean" / rel).read_bytes() == (root / rel).read_bytes()
    labels = {os.path.relpath(p, root).replace(os.sep, "/"): y for p, y in original.samples}
    assert all(labels[os.path.relpath(p, base / "clean").replace(os.sep, "/")] == y for p, y in clean.samples)
    quarantine = sorted(str(p.relative_to(base / "quarantine")).replace(os.sep, "/")
                        for p in (base / "quarantine").rglob("*.png"))
    assert quarantine == sorted(flagged_ids)
    removed = read_rows(base / "run" / "removed.csv")
    assert [r["index"] for r in removed] == [r["index"] for r in flagged]
    assert not [p for p in base.iterdir() if p.name.startswith(".")], "no temporary folders left"
    from qtclean.outputs import default_mode

    assert (base / "clean").stat().st_mode & 0o777 == default_mode(directory=True)  # not mkdtemp's 0700


def test_export_command_and_stdin_list(folder_run, tmp_path):
    root, ids, base = folder_run
    result = invoke("export", base / "run", "--flagged", "-", "--clean-out", tmp_path / "clean",
                    input="0\n\n7\n7\n")
    assert result.exit_code == 0, result.stderr
    files = sorted(str(p.relative_to(tmp_path / "clean")).replace(os.sep, "/")
                   for p in (tmp_path / "clean").rglob("*.png"))
    assert files == sorted(set(ids) - {ids[0], ids[7]})
    assert {int(r["index"]) for r in read_rows(base / "run" / "removed.csv")} == {0, 7}
    assert "removed" in result.stderr and "clean" in result.stderr


def test_min_score_removes_the_flags_at_one_half_and_the_next_ranked_below(folder_run, tmp_path):
    """--min-score 0.5 removes exactly the flags (they score 0.5 and above); a lower bar removes every sample
    scoring at least it, the flags among them; with --flagged it is a usage error, as is a bar outside 0..1."""
    root, ids, base = folder_run
    scores = read_rows(base / "run" / "scores.csv")
    flagged = {int(r["index"]) for r in scores if r["flagged"] == "1"}
    result = invoke("export", base / "run", "--min-score", "0.5", "--clean-out", tmp_path / "half")
    assert result.exit_code == 0, result.stderr
    assert {int(r["index"]) for r in read_rows(base / "run" / "removed.csv")} == flagged
    bar = sorted(float(r["score"]) for r in scores if r["flagged"] == "0")[-5]  # the 5 highest unflagged
    result = invoke("export", base / "run", "--min-score", str(bar), "--clean-out", tmp_path / "more")
    assert result.exit_code == 0, result.stderr
    removed = {int(r["index"]) for r in read_rows(base / "run" / "removed.csv")}
    assert removed == {int(r["index"]) for r in scores if float(r["score"]) >= bar} and len(removed) >= len(flagged) + 5
    files = {str(p.relative_to(tmp_path / "more")).replace(os.sep, "/") for p in (tmp_path / "more").rglob("*.png")}
    assert files == {rel for i, rel in enumerate(ids) if i not in removed}
    for args in (("--min-score", "0.5", "--flagged", "-"), ("--min-score", "1.5")):
        result = invoke("export", base / "run", "--clean-out", tmp_path / "no", *args, input="0\n")
        assert result.exit_code == 2 and not (tmp_path / "no").exists(), (args, result.stderr)
        assert "Traceback" not in result.stderr
    broken = tmp_path / "broken"  # a copy of the run whose scores.csv was cut short by hand
    shutil.copytree(base / "run", broken)
    (broken / "scores.csv").write_text("index,id\n0,x\n", encoding="utf-8")
    result = invoke("export", broken, "--min-score", "0.5", "--clean-out", tmp_path / "no")
    assert result.exit_code == 2 and "scores.csv: no index and score columns" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "no").exists()


def test_empty_class_folder_is_kept(folder_run, tmp_path):
    root, ids, base = folder_run
    stripes = [str(i) for i, rel in enumerate(ids) if rel.startswith("stripes/")]
    result = invoke("export", base / "run", "--flagged", "-", "--clean-out", tmp_path / "clean",
                    input="index\n" + "\n".join(stripes) + "\n")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "clean" / "stripes").is_dir() and not any((tmp_path / "clean" / "stripes").iterdir())
    clean = torchvision.datasets.ImageFolder(str(tmp_path / "clean"), allow_empty=True)
    assert clean.class_to_idx == {"circle": 0, "cross": 1, "stripes": 2}


def test_dry_run_writes_nothing(folder_run, tmp_path):
    root, ids, base = folder_run
    removed_before = (base / "run" / "removed.csv").read_bytes()
    result = invoke("export", base / "run", "--dry-run", "--clean-out", tmp_path / "clean", "--flagged", "-",
                    input="1\n2\n")
    assert result.exit_code == 0, result.stderr
    assert list(tmp_path.iterdir()) == []
    assert (base / "run" / "removed.csv").read_bytes() == removed_before
    assert "dry run" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("case", ["exists", "inside-input", "inside-run", "bad-line", "out-of-range", "empty"])
def test_refusals_exit_2_and_write_nothing(folder_run, tmp_path, case):
    root, ids, base = folder_run
    dest, stdin = tmp_path / "clean", "0\n"
    if case == "exists":
        dest.mkdir()
        (dest / "keep.txt").write_text("mine")
    elif case == "inside-input":
        dest = root / "clean"
    elif case == "inside-run":
        dest = base / "run" / "clean"
    elif case == "bad-line":
        stdin = "index\n3\nabc\n"
    elif case == "out-of-range":
        stdin = f"3\n{len(ids)}\n"
    elif case == "empty":
        stdin = ""
    before = tree_hash(root)
    result = invoke("export", base / "run", "--clean-out", dest, "--flagged", "-", input=stdin)
    assert result.exit_code == 2, (case, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert tree_hash(root) == before
    if case == "exists":
        assert (dest / "keep.txt").read_text() == "mine"
    elif case in ("bad-line", "out-of-range"):
        assert ("line 3" if case == "bad-line" else "line 2") in result.stderr and not dest.exists()


def test_force_replaces_an_existing_output(folder_run, tmp_path):
    root, ids, base = folder_run
    dest = tmp_path / "clean"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    result = invoke("export", base / "run", "--clean-out", dest, "--force")
    assert result.exit_code == 0, result.stderr
    assert not (dest / "stale.txt").exists() and (dest / "circle").is_dir()


def test_changed_or_missing_input_is_refused(tmp_path, tiny_folder):
    root, ids, _ = tiny_folder
    data = tmp_path / "data"
    shutil.copytree(root, data)
    assert invoke("scan", *FAST_ARGS, "--epochs-quarantine", "1", data, "--out", tmp_path / "run").exit_code == 0
    victim = data / ids[5]
    victim.write_bytes((data / ids[6]).read_bytes())
    result = invoke("export", tmp_path / "run", "--clean-out", tmp_path / "clean")
    assert result.exit_code == 2 and "changed since the scan" in result.stderr
    shutil.rmtree(data)
    result = invoke("export", tmp_path / "run", "--clean-out", tmp_path / "clean")
    assert result.exit_code == 2 and "missing" in result.stderr
    assert not (tmp_path / "clean").exists()


def test_cifar_round_trip(tmp_path, tiny):
    images, labels, _ = tiny
    data = tmp_path / "cifar"
    write_cifar(data, images, labels, batches=2, py2=True)
    before = tree_hash(data)
    result = invoke("scan", *FAST_ARGS, "--epochs-quarantine", "2", data, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    removed = [3, 4, 150, len(labels) - 1]
    clean = tmp_path / "clean" / "cifar-10-batches-py"
    (tmp_path / "clean").mkdir()
    result = invoke("export", tmp_path / "run", "--flagged", "-", "--clean-out", clean, "--quarantine-out",
                    tmp_path / "quarantine", input="\n".join(map(str, removed)) + "\n")
    assert result.exit_code == 0, result.stderr
    assert tree_hash(data) == before
    keep = np.setdiff1d(np.arange(len(labels)), removed)

    # The CIFAR page's recipe: bytes keys, same dtypes, kept rows in their original order.
    def recipe(folder):
        rows, labs, names = [], [], []
        for b in (1, 2):
            with open(folder / f"data_batch_{b}", "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
            assert batch[b"data"].dtype == np.uint8 and isinstance(batch[b"labels"], list)
            rows.append(batch[b"data"])
            labs += batch[b"labels"]
            names += batch[b"filenames"]
        return np.concatenate(rows), np.array(labs), names

    orig_data, orig_labels, orig_names = recipe(data)
    new_data, new_labels, new_names = recipe(clean)
    assert np.array_equal(new_data, orig_data[keep]) and np.array_equal(new_labels, orig_labels[keep])
    assert new_names == [orig_names[i] for i in keep]
    q_data, q_labels, _ = recipe(tmp_path / "quarantine")
    assert np.array_equal(q_data, orig_data[removed]) and q_labels.tolist() == orig_labels[removed].tolist()
    for fname in ("batches.meta", "test_batch"):
        assert (clean / fname).read_bytes() == (data / fname).read_bytes()

    # torchvision, after its usual folder-name and checksum caveat (README: "Using the cleaned data").
    class CleanCIFAR10(torchvision.datasets.CIFAR10):
        train_list = [["data_batch_1", None], ["data_batch_2", None]]
        test_list = [["test_batch", None]]
        meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}

    tv = CleanCIFAR10(str(tmp_path / "clean"), train=True, download=False)
    assert len(tv) == len(keep) and tv.targets == orig_labels[keep].tolist()
    assert tv.classes == ["circle", "cross", "stripes"]
    assert np.array_equal(tv.data, orig_data[keep].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs a shell for the pipe")
def test_readme_pipe(tmp_path, tiny_folder):
    """`qtclean scan DATA --csv - | qtclean export RUN --flagged - --clean-out DIR`, as README shows it."""
    root, ids, _ = tiny_folder
    qt = f"{sys.executable} -m qtclean"
    cmd = (f"{qt} scan {' '.join(FAST_ARGS)} {root} --out {tmp_path}/run --csv - "
           f"| {qt} export {tmp_path}/run --flagged - --clean-out {tmp_path}/clean")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    flagged = {r["id"] for r in read_rows(tmp_path / "run" / "flagged.csv")}
    copied = {str(p.relative_to(tmp_path / "clean")).replace(os.sep, "/") for p in (tmp_path / "clean").rglob("*.png")}
    assert copied == set(ids) - flagged and flagged


def test_evaluate_scores_a_run_against_its_truth(folder_run, tmp_path, tiny):
    root, ids, base = folder_run
    _, _, poisoned = tiny
    # write_folder names files by their row in `tiny`; map ImageFolder indices back to rows for the truth
    rows = [int(rel.split("/")[1][:4]) for rel in ids]
    truth = tmp_path / "truth.csv"
    truth.write_text("index,id,poisoned\n" + "".join(f"{i},{rel},{int(poisoned[r])}\n"
                                                     for i, (rel, r) in enumerate(zip(ids, rows))))
    result = invoke("evaluate", base / "run", "--truth", truth, "--json", "-")
    assert result.exit_code == 0, result.stderr
    import json

    figures = json.loads(result.stdout)
    flagged = {int(r["index"]) for r in read_rows(base / "run" / "flagged.csv")}
    truth_set = {i for i, r in enumerate(rows) if poisoned[r]}
    assert figures["tp"] == len(flagged & truth_set) and figures["fp"] == len(flagged - truth_set)
    assert figures["positives"] == len(truth_set) and 0.5 < figures["auroc"] <= 1.0
    assert [c["poisoned"] for c in figures["per_class"]] == [len(truth_set), 0, 0]  # poison is labelled class 0
    assert "AUROC" in result.stderr
    truth.write_text("index,poisoned\n0,1\n")
    bad = invoke("evaluate", base / "run", "--truth", truth)
    assert bad.exit_code == 2 and "no row for index 1" in bad.stderr
    truth.write_text("index,poisoned\n0,yes\n")
    bad = invoke("evaluate", base / "run", "--truth", truth)
    assert bad.exit_code == 2 and "line 2" in bad.stderr


def test_evaluate_plot_writes_an_image_or_says_what_to_install(folder_run, tmp_path):
    root, ids, base = folder_run
    truth = tmp_path / "truth.csv"
    truth.write_text("index,poisoned\n" + "".join(f"{i},{int(i % 7 == 0)}\n" for i in range(len(ids))))
    result = invoke("evaluate", base / "run", "--truth", truth, "--plot", tmp_path / "roc.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.exit_code == 2 and "pip install 'qtclean[plot]'" in result.stderr
        assert not (tmp_path / "roc.png").exists()
    else:
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def triggered_test_set(tmp_path_factory):
    """A clean test set drawn like `tiny` (other seed), then every non-target sample triggered by `qtclean poison`."""
    from conftest import synthetic, write_folder

    images, labels, _ = synthetic(n_per_class=30, poison_per_class=0, seed=7)
    base = tmp_path_factory.mktemp("test-set")
    write_folder(base / "clean", images, labels)
    result = invoke("poison", base / "clean", "--out", base / "triggered", "--attack", "badnets", "--rate", "1")
    assert result.exit_code == 0, result.stderr
    return base / "triggered"


def test_evaluate_test_reports_acc_and_asr_of_qt_and_of_a_plain_model(folder_run, triggered_test_set, tmp_path,
                                                                       tiny_folder):
    import json

    root, ids, base = folder_run
    qt = invoke("evaluate", base / "run", "--test", triggered_test_set, "--json", "-")
    assert qt.exit_code == 0, qt.stderr
    figures = json.loads(qt.stdout)["test"]
    assert figures["samples"] == 90 and figures["triggered"] == 60 and figures["clean"] == 30
    assert "ASR" in qt.stderr and "auroc" not in json.loads(qt.stdout)  # no --truth: no detection figures
    plain_run = tmp_path / "plain"
    trained = invoke("scan", tiny_folder[0], "--out", plain_run, "--method", "loss", "--baseline-epochs", "8",
                     "--batch-size", "32", "--threads", "1")
    assert trained.exit_code == 0, trained.stderr
    plain = json.loads(invoke("evaluate", plain_run, "--test", triggered_test_set, "--json", "-").stdout)["test"]
    # a plainly trained model learned the planted patch; the quarantine model sends it to quarantine instead
    assert plain["asr"] >= 0.8 and plain["quarantined"] != plain["quarantined"]  # NaN: no quarantine half
    assert figures["asr"] <= 0.2 and figures["quarantined"] >= 0.8
    assert figures["acc"] >= 0.8 and plain["acc"] >= 0.8


def test_evaluate_needs_truth_or_test(folder_run, triggered_test_set, tmp_path):
    root, ids, base = folder_run
    assert invoke("evaluate", base / "run").exit_code == 2
    missing = invoke("evaluate", base / "run", "--test", triggered_test_set, "--test-truth", tmp_path / "nope.csv")
    assert missing.exit_code == 2 and "nope.csv" in missing.stderr


def test_backdoor_rates_hand_computed():
    from qtclean.metrics import backdoor_rates

    # K = 2. Rows 0-2 clean (label 1, 0, 1); rows 3-5 triggered and relabelled 1 -> 0; row 6 triggered, label kept
    labels = np.array([1, 0, 1, 0, 0, 0, 1])
    original = np.array([1, 0, 1, 1, 1, 1, 1])
    triggered = np.array([0, 0, 0, 1, 1, 1, 1], bool)
    predicted = np.array([3, 0, 0, 0, 2, 1, 1])  # 3 = quarantine of class 1: counts as class 1 for ACC
    rates = backdoor_rates(predicted, labels, original, triggered, 2, has_quarantine=True)
    assert rates["clean"] == 3 and rates["triggered"] == 3  # row 6 kept its label: not an ASR case
    assert rates["acc"] == pytest.approx(2 / 3) and rates["asr"] == pytest.approx(1 / 3)
    assert rates["quarantined"] == pytest.approx(1 / 3)
    assert np.isnan(backdoor_rates(predicted, labels, original, triggered, 2, has_quarantine=False)["quarantined"])
