"""Hostile inputs, faults and interruptions (issue 7): every case ends in a one-line error with the contract's exit
code, or a reported-and-skipped sample; never a traceback, a hang, a changed input or a half-written output."""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import FAST_ARGS, synthetic, tree_hash, write_cifar, write_folder
from qtclean.cli import app
from qtclean.data import load_cifar, load_dataset, load_folder
from qtclean.errors import InputError

runner = CliRunner()
QUICK = [*FAST_ARGS, "--epochs-quarantine", "1"]


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr  # the error is last
    assert "Traceback" not in result.stderr and result.stdout == ""
    return errors[0]


# --- CIFAR batches -------------------------------------------------------------------------------------------------

class RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _cifar_case(root: Path, case: str, sentinel: Path) -> str:
    """Replace data_batch_1 of a valid set with a broken one; returns the message expected."""
    good = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 0]}
    batch = root / "data_batch_1"
    if case == "runs-code":
        payload, expect = pickle.dumps({b"data": RunsCode(sentinel), b"labels": [0]}, protocol=2), ".system'"
    elif case == "other-global":
        payload = pickle.dumps(collections.OrderedDict(good), protocol=2)
        expect = "'collections.OrderedDict'"
    elif case == "truncated":
        full = pickle.dumps(good, protocol=2)
        payload, expect = full[: len(full) // 2], "not a readable CIFAR pickle"
    elif case == "not-a-dict":
        payload, expect = pickle.dumps([1, 2, 3], protocol=2), "expected a dict of arrays, found list"
    elif case == "wrong-shape":
        payload = pickle.dumps({**good, b"data": np.zeros((4, 32, 32, 3), np.uint8)}, protocol=2)
        expect = "expected (rows, 3072)"
    elif case == "wrong-dtype":
        payload = pickle.dumps({**good, b"data": np.zeros((4, 3072), np.float32)}, protocol=2)
        expect = "must be a uint8 numpy array, found float32"
    elif case == "missing-data":
        payload, expect = pickle.dumps({b"labels": [0]}, protocol=2), "missing key 'data'"
    elif case == "missing-labels":
        payload, expect = pickle.dumps({b"data": good[b"data"]}, protocol=2), "missing key 'labels'"
    elif case == "label-range":
        payload, expect = pickle.dumps({**good, b"labels": [0, 1, 2, 3]}, protocol=2), "label 3 is out of range"
    elif case == "negative-label":
        payload, expect = pickle.dumps({**good, b"labels": [0, -1, 2, 0]}, protocol=2), "label -1 is out of range"
    elif case == "length-mismatch":
        payload, expect = pickle.dumps({**good, b"labels": [0, 1]}, protocol=2), "4 rows of 'data' but 2 labels"
    elif case == "labels-not-ints":
        payload, expect = pickle.dumps({**good, b"labels": ["a", "b", "c", "d"]}, protocol=2), "list of integers"
    else:
        raise AssertionError(case)
    batch.write_bytes(payload)
    return expect


CIFAR_CASES = ["runs-code", "other-global", "truncated", "not-a-dict", "wrong-shape", "wrong-dtype", "missing-data",
               "missing-labels", "label-range", "negative-label", "length-mismatch", "labels-not-ints"]


@pytest.mark.parametrize("case", CIFAR_CASES)
def test_hostile_cifar_batches(tmp_path, case):
    images, labels, _ = synthetic(n_per_class=4)
    root = tmp_path / "cifar"
    write_cifar(root, images, labels, batches=2)
    sentinel = tmp_path / "pwned"
    expect = _cifar_case(root, case, sentinel)
    before = tree_hash(root)
    line = one_line_error(runner.invoke(app, ["scan", *QUICK, str(root), "--out", str(tmp_path / "run")]), 2)
    assert "data_batch_1" in line and expect in line, line
    assert not sentinel.exists()
    assert tree_hash(root) == before
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_cifar_str_keys_load_like_bytes_keys(tmp_path):
    images, labels, _ = synthetic(n_per_class=4)
    write_cifar(tmp_path / "bytes", images, labels, batches=1)
    root = tmp_path / "str"
    write_cifar(root, images, labels, batches=1)
    for name in ("data_batch_1", "batches.meta"):
        with open(tmp_path / "bytes" / name, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
        obj = {k.decode(): ([v.decode() for v in val] if isinstance(val, list) and val and isinstance(val[0], bytes)
                            else val) for k, val in obj.items()}
        (root / name).write_bytes(pickle.dumps(obj, protocol=4))
    a, b = load_cifar(tmp_path / "bytes"), load_cifar(root)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels) and a.classes == b.classes


# --- image folders -------------------------------------------------------------------------------------------------

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(side: int = 100_000) -> bytes:
    """A 200-byte PNG whose header claims side x side pixels (10 gigapixels by default)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def hostile_folder(root: Path) -> dict[str, str]:
    """A folder with every awkward file the issue lists; returns {id: expected reason fragment} of the bad ones."""
    good = root / "a b ünïcødé"
    other = root / "plain"
    empty = root / "zz-empty"
    for d in (good, other, empty):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(good / f"img {i} ✓.png")
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(other / f"{i}.png")
    Image.fromarray((rng.integers(0, 65535, (12, 12))).astype(np.uint16)).save(good / "sixteen-bit.png")
    Image.new("RGB", (12, 12), (10, 200, 30)).convert("P").save(other / "palette.png")
    Image.new("RGBA", (12, 12), (0, 0, 255, 0)).save(other / "rgba.png")
    Image.new("LA", (12, 12), (90, 128)).save(good / "la.png")
    Image.new("CMYK", (12, 12), (0, 255, 0, 0)).save(other / "cmyk.jpg")
    Image.new("RGB", (20, 9), (1, 2, 3)).save(other / "other-size.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (other / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    png = (other / "0.png").read_bytes()
    (other / "truncated.png").write_bytes(png[: len(png) // 2])
    (other / "zero.png").write_bytes(b"")
    (other / "text.png").write_text("this is not an image\n")
    (other / "bomb.png").write_bytes(bomb_png())
    (good / "loop").symlink_to(good, target_is_directory=True)  # walked once, not forever
    Image.new("L", (12, 12)).save(root / "top-level.png")  # not in a class folder: ignored, as ImageFolder does
    return {"plain/bomb.png": "DecompressionBomb", "plain/text.png": "UnidentifiedImageError",
            "plain/zero.png": "UnidentifiedImageError", "plain/truncated.png": "truncated",
            "plain/truncated.jpg": "truncated"}


def test_hostile_image_folder_scans_and_reports(tmp_path):
    root = tmp_path / "data"
    bad = hostile_folder(root)
    before = tree_hash(root)
    result = runner.invoke(app, ["scan", *QUICK, str(root), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.stderr
    assert tree_hash(root) == before
    with open(tmp_path / "run" / "unreadable.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["id"] for r in rows} == set(bad)
    for r in rows:
        assert bad[r["id"]] in r["reason"], r
    with open(tmp_path / "run" / "scores.csv", newline="", encoding="utf-8") as f:
        scores = list(csv.DictReader(f))
    ids = [r["id"] for r in scores]
    assert len(ids) == len(set(ids)) == 8 + 10  # no file twice through the symlink loop
    assert "a b ünïcødé/img 0 ✓.png" in ids and "top-level.png" not in ids
    assert {r["class"] for r in scores} == {"a b ünïcødé", "plain"}
    info = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    assert info["class_to_idx"] == {"a b ünïcødé": 0, "plain": 1, "zz-empty": 2}


def test_decoded_modes_follow_the_rule(tmp_path):
    root = tmp_path / "data"
    hostile_folder(root)
    ds = load_folder(root)
    assert ds.image_shape == (3, 12, 12)  # colour present -> RGB; most common size wins, 20x9 resized
    by_id = dict(zip(ds.ids, ds.images))
    r, g, b = by_id["plain/cmyk.jpg"][:, 0, 0].tolist()  # CMYK (0, 255, 0, 0) is magenta (JPEG: roughly)
    assert r > 200 and g < 60 and b > 200
    assert by_id["plain/rgba.png"][:, 0, 0].tolist() == [0, 0, 255]  # alpha dropped
    sixteen = np.asarray(Image.open(root / "a b ünïcødé" / "sixteen-bit.png"), dtype=np.float64)
    assert np.abs(by_id["a b ünïcødé/sixteen-bit.png"][0].astype(float) - sixteen / 257).max() <= 1


def test_ten_thousand_files_in_one_class(tmp_path):
    root = tmp_path / "data"
    (root / "big").mkdir(parents=True)
    (root / "small").mkdir()
    img = io.BytesIO()
    Image.new("L", (4, 4), 7).save(img, "PNG")
    for i in range(10_000):
        (root / "big" / f"{i:05d}.png").write_bytes(img.getvalue())
    for i in range(3):
        (root / "small" / f"{i}.png").write_bytes(img.getvalue())
    ds = load_dataset(root)
    assert ds.num_samples == 10_003 and np.bincount(ds.labels).tolist() == [10_000, 3]
    assert ds.ids[9_999] == "big/09999.png"


@pytest.mark.parametrize("setup, message", [
    (lambda r: None, "no such file or directory"),
    (lambda r: r.mkdir(), "no class folders found"),
    (lambda r: (r / "a").mkdir(parents=True), "no images found"),
    (lambda r: ((r / "only").mkdir(parents=True), Image.new("L", (4, 4)).save(r / "only" / "1.png")), "only one class"),
    (lambda r: ((r / "a").mkdir(parents=True), (r / "a" / "x.png").write_bytes(b"")), "none of the 1 images"),
])
def test_unusable_folders_exit_2(tmp_path, setup, message):
    root = tmp_path / "x"
    setup(root)
    line = one_line_error(runner.invoke(app, ["scan", *QUICK, str(root), "--out", str(tmp_path / "run")]), 2)
    assert message in line


# --- fuzzing -------------------------------------------------------------------------------------------------------

def _flip(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 9))):
        buf[pos] = int(rng.integers(0, 256))
    return bytes(buf)


def test_fuzzed_pngs_never_crash(tmp_path):
    rng = np.random.default_rng(1234)
    seeds = []
    for mode, shape in (("L", (10, 10)), ("RGB", (10, 10, 3))):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, "PNG")
        seeds.append(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (5, 6, 7)).convert("P").save(buf, "PNG")
    seeds.append(buf.getvalue())
    root = tmp_path / "fuzz"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "anchor.png").write_bytes(seeds[0])
    for i in range(300):
        (root / ("a" if i % 2 else "b") / f"f{i:03d}.png").write_bytes(_flip(seeds[i % len(seeds)], rng))
    ds = load_folder(root)  # anything but a clean return here is a failure with its traceback
    assert ds.num_samples + len(ds.unreadable) == 302
    assert all(u.reason for u in ds.unreadable)


def test_fuzzed_cifar_batches_never_crash(tmp_path):
    rng = np.random.default_rng(99)
    images, labels, _ = synthetic(n_per_class=4)
    root = tmp_path / "cifar"
    write_cifar(root, images, labels, batches=1)
    original = (root / "data_batch_1").read_bytes()
    outcomes = collections.Counter()
    for _ in range(300):
        (root / "data_batch_1").write_bytes(_flip(original, rng))
        try:
            load_cifar(root)
            outcomes["loaded"] += 1
        except InputError:
            outcomes["refused"] += 1
    assert sum(outcomes.values()) == 300 and outcomes["refused"] > 0, outcomes


# --- faults --------------------------------------------------------------------------------------------------------

def _qtclean(*args) -> list[str]:
    return [sys.executable, "-m", "qtclean", *map(str, args)]


@pytest.fixture(scope="module")
def slow_set(tmp_path_factory):
    """1,500 images: slow enough (~0.2 s an epoch on one thread) to be killed inside a chosen epoch."""
    images, labels, _ = synthetic(n_per_class=500, poison_per_class=40, seed=3)
    root = tmp_path_factory.mktemp("slow") / "data"
    write_folder(root, images, labels)
    args = ["--epochs-pre", "4", "--pre-min-steps", "0", "--epochs-quarantine", "6", "--epochs-dynamic", "2",
            "--batch-size", "32", "--threads", "1"]
    ref = tmp_path_factory.mktemp("slow") / "ref"
    proc = subprocess.run(_qtclean("scan", root, "--out", ref, *args), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return root, args, (ref / "scores.csv").read_bytes()


def _checkpoint_progress(path: Path) -> tuple[int, int] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["qtclean_checkpoint"])
        return meta["done_pre"], meta["done_q"]
    except Exception:  # not there yet, or being renamed into place
        return None


@pytest.mark.parametrize("phase", ["pre-quarantine", "quarantine"])
def test_kill_9_then_resume_equals_uninterrupted(slow_set, tmp_path, phase):
    root, args, reference = slow_set
    run = tmp_path / "run"
    proc = subprocess.Popen(_qtclean("scan", root, "--out", run, *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    want = (lambda p: p[0] >= 1) if phase == "pre-quarantine" else (lambda p: p[1] >= 2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        progress = _checkpoint_progress(run / "checkpoint.safetensors")
        if progress is not None and want(progress):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the scan finished before it could be killed"
    done_pre, done_q = _checkpoint_progress(run / "checkpoint.safetensors")
    assert (done_pre < 4) if phase == "pre-quarantine" else (done_pre == 4 and done_q < 6)
    assert not (run / "scores.csv").exists()
    resumed = subprocess.run(_qtclean("scan", root, "--out", run, "--resume", *args), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "scores.csv").read_bytes() == reference
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_during_scan_exits_1_and_leaves_no_partial_file(tiny_folder, tmp_path):
    root, _, _ = tiny_folder
    run = tmp_path / "run"
    proc = subprocess.run(_qtclean("scan", *QUICK, root, "--out", run), capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_file_size(20_000))
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and "Traceback" not in proc.stderr
    assert not [p for p in run.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not (run / "scores.csv").exists()


def test_full_disk_during_export_exits_1_and_leaves_nothing(tmp_path):
    images, labels, _ = synthetic(n_per_class=40)
    data = tmp_path / "cifar"
    write_cifar(data, images, labels, batches=1)
    assert runner.invoke(app, ["scan", *QUICK, str(data), "--out", str(tmp_path / "run")]).exit_code == 0
    (tmp_path / "out").mkdir()
    proc = subprocess.run(_qtclean("export", tmp_path / "run", "--clean-out", tmp_path / "out" / "clean"),
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(50_000))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "nothing was left behind" in proc.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_unwritable_output_location_exits_1(tiny_folder, tmp_path):
    root, _, _ = tiny_folder
    target = Path("/proc/qtclean-run") if os.path.isdir("/proc") else None
    if os.geteuid() != 0:  # permissions only bind a non-root user
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "run"
    if target is None:
        pytest.skip("no unwritable location on this platform")
    line = one_line_error(runner.invoke(app, ["scan", *QUICK, str(root), "--out", str(target)]), 1)
    assert "cannot create the run folder" in line


def test_other_version_or_changed_data_is_refused(tmp_path, tiny):
    images, labels, _ = tiny
    data = tmp_path / "data"
    ids = write_folder(data, images, labels)
    run = tmp_path / "run"
    assert runner.invoke(app, ["scan", *QUICK, str(data), "--out", str(run)]).exit_code == 0
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "qtclean_version": "0.0.1"}))
    line = one_line_error(runner.invoke(app, ["export", str(run), "--clean-out", str(tmp_path / "c")]), 2)
    assert "made by qtclean 0.0.1" in line
    line = one_line_error(runner.invoke(app, ["scan", *QUICK, str(data), "--out", str(run), "--resume"]), 2)
    assert "made by qtclean 0.0.1" in line
    (run / "run.json").write_text(json.dumps(info))
    (data / ids[0]).write_bytes((data / ids[1]).read_bytes())
    line = one_line_error(runner.invoke(app, ["scan", *QUICK, str(data), "--out", str(run), "--resume"]), 2)
    assert "dataset changed" in line


# --- resources -----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tiny_folder, tmp_path):
    root, _, _ = tiny_folder
    line = one_line_error(runner.invoke(app, ["scan", *QUICK, str(root), "--out", str(tmp_path / "r"),
                                              "--device", "cuda"]), 2)
    assert "CUDA is not available" in line


def test_too_large_for_memory_names_the_memory_needed(tiny_folder, tmp_path, monkeypatch):
    import qtclean.data.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "available_memory", lambda: 10_000)
    root, ids, _ = tiny_folder
    line = one_line_error(runner.invoke(app, ["scan", *QUICK, str(root), "--out", str(tmp_path / "r")]), 1)
    assert f"{len(ids)} images decoded at 16x16 needs" in line and "--image-size" in line


def test_threads_follow_the_option_and_omp_num_threads(tiny_folder, tmp_path, monkeypatch):
    root, _, _ = tiny_folder
    before = torch.get_num_threads()
    try:
        args = ["--epochs-pre", "2", "--pre-min-steps", "0", "--epochs-quarantine", "1", "--batch-size", "32"]
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runner.invoke(app, ["scan", *args, str(root), "--out", str(tmp_path / "a")]).exit_code == 0
        assert json.loads((tmp_path / "a" / "run.json").read_text())["threads"] == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert runner.invoke(app, ["scan", *args, "--threads", "2", str(root), "--out", str(tmp_path / "b")]
                             ).exit_code == 0
        assert json.loads((tmp_path / "b" / "run.json").read_text())["threads"] == 2
    finally:
        torch.set_num_threads(before)
