"""`qtclean poison`: the attack lab writes a poisoned copy in the input's format and a truth that matches it."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import CLASSES, synthetic, tree_hash, write_cifar
from qtclean.attacks.lab import ATTACK_NAMES, COVER, poison_arrays, poison_with_cover
from qtclean.cli import app
from qtclean.data import load_dataset

runner = CliRunner()


@pytest.mark.parametrize("attack", [a for a in ATTACK_NAMES if a != "none"])
def test_each_attack_changes_only_the_poisoned_samples(attack):
    images, labels, _ = synthetic(n_per_class=40, poison_per_class=0)
    new_images, new_labels, mask, cover = poison_with_cover(images, labels, 3, attack=attack, rate=0.1, target=0,
                                                            seed=1)
    untouched = ~mask & ~cover
    assert mask.sum() == 12 and np.array_equal(new_images[untouched], images[untouched])
    assert np.array_equal(new_labels[~mask], labels[~mask])  # cover samples keep their labels
    assert not (mask & cover).any()
    if attack in COVER:  # WaNet's noise mode and the adaptive attacks' cover samples, each carrying a trigger
        assert cover.sum() == round(COVER[attack][0] * 12)
        assert (new_images[cover] != images[cover]).reshape(int(cover.sum()), -1).any(axis=1).all()
    else:
        assert not cover.any()
    changed = (new_images[mask] != images[mask]).reshape(12, -1).any(axis=1)
    assert changed.all(), f"{attack}: every poisoned image carries the trigger"
    if attack in ("sig", "badnets-cl"):  # clean-label: target-class samples, labels kept
        assert (labels[mask] == 0).all() and np.array_equal(new_labels[mask], labels[mask])
    elif attack == "badnets-a2a":
        assert np.array_equal(new_labels[mask], (labels[mask] + 1) % 3)
    else:
        assert (labels[mask] != 0).all() and (new_labels[mask] == 0).all()


def read_truth(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_poison_folder_copy_and_truth(tiny_folder, tmp_path):
    root, ids, _ = tiny_folder
    before = tree_hash(root)
    out = tmp_path / "poisoned"
    result = runner.invoke(app, ["poison", str(root), "--out", str(out), "--attack", "badnets", "--rate", "0.1",
                                 "--target", "2"])
    assert result.exit_code == 0, result.stderr
    assert tree_hash(root) == before
    truth = read_truth(tmp_path / "poisoned.truth.csv")
    ds = load_dataset(out)
    assert len(truth) == ds.num_samples == len(ids)
    assert [r["id"] for r in truth] == ds.ids and [int(r["index"]) for r in truth] == list(range(len(ids)))
    poisoned = [r for r in truth if r["poisoned"] == "1"]
    assert len(poisoned) == 24 and all(r["label"] == "2" and r["id"].startswith("stripes/") for r in poisoned)
    assert all(int(r["label"]) == ds.labels[int(r["index"])] for r in truth)
    rows = [int(r["index"]) for r in poisoned]
    assert (ds.images[rows, :, 12:15, 12:15] == 255).all()  # the 3x3 patch, 1 px from the corner of 16x16
    again = runner.invoke(app, ["poison", str(root), "--out", str(out), "--attack", "badnets"])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_poison_cifar_copy_scans_and_evaluates(tmp_path, tiny):
    images, labels, _ = tiny
    data = tmp_path / "clean"
    write_cifar(data, images, labels, batches=2)
    out = tmp_path / "poisoned"
    result = runner.invoke(app, ["poison", str(data), "--out", str(out), "--attack", "trojan", "--rate", "0.1"])
    assert result.exit_code == 0, result.stderr
    ds = load_dataset(out)
    truth = read_truth(tmp_path / "poisoned.truth.csv")
    assert ds.format == "cifar" and ds.classes == CLASSES and [r["id"] for r in truth] == ds.ids
    assert (out / "test_batch").read_bytes() == (data / "test_batch").read_bytes()
    assert sum(r["poisoned"] == "1" for r in truth) == round(0.1 * len(labels))
    assert all(int(r["label"]) == ds.labels[int(r["index"])] for r in truth)
    bad = runner.invoke(app, ["poison", str(data), "--out", str(tmp_path / "x"), "--attack", "nope"])
    assert bad.exit_code == 2 and "choose one of" in bad.stderr


def test_wanet_is_a_small_fixed_warp_and_its_noise_mode_varies_per_sample():
    images, labels, _ = synthetic(n_per_class=40, poison_per_class=0, size=28)
    new, _, mask, cover = poison_with_cover(images, labels, 3, attack="wanet", rate=0.1, target=0, seed=1)
    delta = np.abs(new.astype(int) - images.astype(int))
    assert delta[mask].mean() < 20  # a warp moves pixels by about a pixel, it does not paint over the image
    # the poisoned samples share one warp: warping them again from the originals gives the same images
    again, _, mask2, _ = poison_with_cover(images, labels, 3, attack="wanet", rate=0.1, target=0, seed=2)
    both = mask & mask2
    assert both.any() and np.array_equal(new[both], again[both])
    assert set(np.flatnonzero(cover)).isdisjoint(np.flatnonzero(mask)) and cover.sum() == 2 * mask.sum()


def test_adaptive_patch_stamps_two_of_its_four_patches():
    from qtclean.attacks.patch import adaptive_patches

    images, labels, _ = synthetic(n_per_class=40, poison_per_class=0, size=28)
    new, _, mask = poison_arrays(images, labels, 3, attack="adaptive-patch", rate=0.1, target=0, seed=1)
    patches = adaptive_patches(28, 28)
    for i in np.flatnonzero(mask):
        stamped = sum(np.array_equal(new[i, 0, t:t + p.shape[0], c:c + p.shape[1]], p) for p, t, c in patches)
        assert stamped >= 2  # two stamped (a third may match by chance only if the image already held it)


def test_cover_samples_are_marked_in_the_truth_and_keep_their_labels(tiny_folder, tmp_path):
    root, ids, _ = tiny_folder
    out = tmp_path / "warped"
    result = runner.invoke(app, ["poison", str(root), "--out", str(out), "--attack", "wanet", "--rate", "0.05"])
    assert result.exit_code == 0, result.stderr
    truth = read_truth(tmp_path / "warped.truth.csv")
    assert list(truth[0]) == ["index", "id", "poisoned", "original_label", "label", "cover"]
    poisoned = [r for r in truth if r["poisoned"] == "1"]
    cover = [r for r in truth if r["cover"] == "1"]
    assert len(cover) == 2 * len(poisoned) == 2 * round(0.05 * len(ids))
    assert all(r["poisoned"] == "0" and r["label"] == r["original_label"] for r in cover)
