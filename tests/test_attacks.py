"""`qtclean poison`: the attack lab writes a poisoned copy in the input's format and a truth that matches it."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import CLASSES, synthetic, tree_hash, write_cifar
from qtclean.attacks import lab, learned
from qtclean.attacks.lab import ATTACK_NAMES, COVER, poison, poison_arrays, poison_with_cover
from qtclean.attacks.learned import LearnedTrigger, train_iab, train_issba
from qtclean.cli import app
from qtclean.data import load_dataset
from qtclean.errors import InputError

runner = CliRunner()


@pytest.fixture(scope="module")
def quick_triggers():
    """Trigger networks trained for a few steps on the synthetic images: enough to exercise the poisoning path."""
    images, labels, _ = synthetic(n_per_class=40, poison_per_class=0)
    return {"iab": train_iab(images, labels, 3, target=0, mask_steps=10, steps=10, batch=32),
            "issba": train_issba(images, steps=10)}


@pytest.mark.parametrize("attack", [a for a in ATTACK_NAMES if a != "none"])
def test_each_attack_changes_only_the_poisoned_samples(attack, quick_triggers):
    images, labels, _ = synthetic(n_per_class=40, poison_per_class=0)
    p = poison(images, labels, 3, attack=attack, rate=0.1, target=0, seed=1, trigger=quick_triggers.get(attack))
    new_images, new_labels, mask, cover = p.images, p.labels, p.poisoned, p.cover
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


def test_issba_hides_its_code_invisibly_and_the_decoder_reads_it_back():
    images, _, _ = synthetic(n_per_class=100, poison_per_class=0)
    trigger = train_issba(images, steps=300)
    assert trigger.info["bit_accuracy"] >= 0.9  # the attacker's 32 bits survive uint8 rounding
    assert trigger.info["psnr_db"] >= 20  # a faint residual, not a painted pattern
    stego = trigger.apply(images[:50])
    residual = stego.astype(int) - images[:50].astype(int)
    assert (residual != 0).any(axis=(1, 2, 3)).all()
    assert not all(np.array_equal(residual[0], r) for r in residual[1:])  # sample-specific, not one fixed pattern


def test_iab_mask_is_sparse_and_each_input_gets_its_own_trigger():
    images, labels, _ = synthetic(n_per_class=40, poison_per_class=0)
    trigger = train_iab(images, labels, 3, target=0, mask_steps=150, steps=20, batch=32)
    assert trigger.info["mask_density"] <= 2 * learned.MASK_DENSITY  # the density penalty held the mask small
    with torch.no_grad():
        x = torch.from_numpy(images[:40]).float() / 255
        masks, patterns = trigger.net.mask(x), trigger.net.pattern(x)
    spread = (masks[:20] - masks[20:]).abs().sum(dim=(1, 2, 3)) / masks[:20].sum(dim=(1, 2, 3))
    assert float(spread.mean()) > 0.2  # each input its own mask, not one fixed mask for all
    assert float((patterns[:20] - patterns[20:]).abs().mean()) > 0.01
    triggered = trigger.apply(images[:20])
    changed = (np.abs(triggered.astype(int) - images[:20]) > 32).any(axis=1)  # (20, H, W) pixels it visibly moved
    assert changed.any(axis=(1, 2)).all()  # every input got a trigger
    assert changed.mean() < 4 * learned.MASK_DENSITY  # ... on a sparse set of pixels


def fake_train(attack, images, labels, num_classes, *, target, seed=0, **_):
    """The CLI tests' stand-in for the minute-long trigger training: the same networks, a few steps."""
    if attack == "iab":
        return train_iab(images, labels, num_classes, target=target, seed=seed, mask_steps=5, steps=5, batch=16)
    return train_issba(images, seed=seed, steps=5)


@pytest.mark.parametrize("attack", ["iab", "issba"])
def test_learned_attack_writes_its_trigger_and_reuses_it_on_a_test_set(attack, tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(lab, "train_trigger", fake_train)
    root, ids, _ = tiny_folder
    out = tmp_path / "train-poisoned"
    result = runner.invoke(app, ["poison", str(root), "--out", str(out), "--attack", attack, "--rate", "0.1"])
    assert result.exit_code == 0, result.stderr
    trigger_file = tmp_path / "train-poisoned.trigger.safetensors"
    assert trigger_file.is_file() and "trigger network" in result.stderr
    truth = read_truth(tmp_path / "train-poisoned.truth.csv")
    assert sum(r["poisoned"] == "1" for r in truth) == round(0.1 * len(ids))
    assert not any(r["cover"] == "1" for r in truth)  # backdoor samples only, as backdoor-toolbox writes them
    trigger = LearnedTrigger.load(trigger_file)
    assert trigger.attack == attack

    test_out = tmp_path / "test-triggered"  # the same backdoor on another set: here the clean set itself
    again = runner.invoke(app, ["poison", str(root), "--out", str(test_out), "--attack", attack, "--rate", "1.0",
                                "--trigger", str(trigger_file)])
    assert again.exit_code == 0, again.stderr
    clean, triggered = load_dataset(root), load_dataset(test_out, min_classes=1)  # all relabelled to class 0
    test_truth = read_truth(tmp_path / "test-triggered.truth.csv")
    by_id = {r["id"]: r for r in test_truth}
    rows = [i for i, sid in enumerate(triggered.ids) if by_id[sid]["poisoned"] == "1"]
    assert len(rows) == int((clean.labels != 0).sum())  # rate 1.0: every non-target sample
    expected = lab.test_time_trigger(clean.images[clean.labels != 0], attack, trigger)
    assert sorted(map(bytes, expected)) == sorted(map(bytes, triggered.images[rows]))  # exactly that trigger

    wrong = runner.invoke(app, ["poison", str(root), "--out", str(tmp_path / "x"), "--attack", "badnets",
                                "--trigger", str(trigger_file)])
    assert wrong.exit_code == 2 and "--trigger is for the learned attacks" in wrong.stderr
    other = "issba" if attack == "iab" else "iab"
    mismatch = runner.invoke(app, ["poison", str(root), "--out", str(tmp_path / "y"), "--attack", other,
                                   "--trigger", str(trigger_file)])
    assert mismatch.exit_code == 2 and f"it is an {attack} trigger" in mismatch.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    bad = runner.invoke(app, ["poison", str(root), "--out", str(tmp_path / "z"), "--attack", attack,
                              "--trigger", str(junk)])
    assert bad.exit_code == 2 and "not a trigger file" in bad.stderr and "Traceback" not in bad.output


def test_a_tampered_trigger_file_is_refused_before_any_network_is_built(tmp_path):
    from safetensors.torch import save_file

    images, _, _ = synthetic(n_per_class=10, poison_per_class=0)
    trigger = train_issba(images, steps=2)
    good = tmp_path / "good.safetensors"
    trigger.save(good)
    assert LearnedTrigger.load(good).attack == "issba"
    tensors = {k: v.contiguous() for k, v in trigger.net.state_dict().items()}
    cases = {"huge": ({"attack": "issba", "shape": "[1, 100000, 100000]"}, {**tensors, "secret": trigger.secret}),
             "big-but-plausible": ({"attack": "issba", "shape": "[1, 4096, 4096]"},  # ~70 GB if it were built
                                   {**tensors, "secret": trigger.secret}),
             "bad-secret": ({"attack": "issba", "shape": "[1, 16, 16]"}, {**tensors, "secret": trigger.secret * 7}),
             "no-secret": ({"attack": "issba", "shape": "[1, 16, 16]"}, tensors),
             "other-kind": ({"attack": "exec", "shape": "[1, 16, 16]"}, tensors)}
    for name, (meta, payload) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(payload, str(path), metadata=meta)
        with pytest.raises(InputError, match="not a trigger file"):
            LearnedTrigger.load(path)


def test_the_same_seed_gives_the_same_learned_poisoning_and_leaves_torch_rng_alone():
    images, labels, _ = synthetic(n_per_class=20, poison_per_class=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        trigger = train_iab(images, labels, 3, target=0, seed=4, mask_steps=3, steps=3, batch=16)
        after = torch.rand(1)  # the caller's global RNG did not move (training forks it)
        runs.append((poison(images, labels, 3, attack="iab", rate=0.2, seed=4, trigger=trigger), after))
    (a, after_a), (b, after_b) = runs
    assert np.array_equal(a.images, b.images) and np.array_equal(a.cover, b.cover)
    torch.manual_seed(123)
    assert torch.equal(after_a, torch.rand(1)) and torch.equal(after_a, after_b)
    torch.manual_seed(123)
    train_issba(images, seed=4, steps=2)
    assert torch.equal(torch.rand(1), after_a)  # ISSBA's training forks it too


def test_a_test_sets_cover_samples_do_not_count_as_clean(tmp_path):
    from qtclean.evaluate import read_test_truth

    path = tmp_path / "t.truth.csv"
    path.write_text("index,id,poisoned,original_label,label,cover\n0,a,1,1,0,0\n1,b,0,2,2,1\n2,c,0,2,2,0\n")
    assert read_test_truth(path) == {0: (True, 1), 1: (True, 2), 2: (False, 2)}
    old = tmp_path / "old.truth.csv"  # a truth without the column still reads
    old.write_text("index,poisoned,original_label\n0,1,1\n1,0,2\n")
    assert read_test_truth(old) == {0: (True, 1), 1: (False, 2)}
