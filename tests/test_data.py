"""Input formats: ImageFolder order, CIFAR batches, the safe unpickler, unreadable files, the mode/size rule."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic, write_cifar, write_folder
from qtclean.data import load_dataset
from qtclean.errors import InputError


def test_folder_order_matches_torchvision(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    images, labels, _ = synthetic(n_per_class=6)
    root = tmp_path / "d"
    write_folder(root, images, labels)
    (root / "cross" / "sub").mkdir()
    Image.fromarray(images[0, 0]).save(root / "cross" / "sub" / "zz.png")
    Image.fromarray(images[1, 0]).save(root / "cross" / "A_upper.PNG")
    (root / "cross" / "notes.txt").write_text("not an image")
    ds = load_dataset(root)
    ref = torchvision.datasets.ImageFolder(str(root))
    assert ds.ids == [os.path.relpath(p, root).replace(os.sep, "/") for p, _ in ref.samples]
    assert ds.labels.tolist() == [t for _, t in ref.samples]
    assert ds.class_to_idx == ref.class_to_idx


def test_cifar_batches_load_in_file_order(tmp_path):
    images, labels, _ = synthetic(n_per_class=5)
    write_cifar(tmp_path / "c", images, labels, batches=2)
    ds = load_dataset(tmp_path / "c")
    assert ds.format == "cifar"
    assert ds.images.shape == (15, 3, 32, 32)
    assert ds.labels.tolist() == labels.tolist()
    assert ds.ids[0] == "data_batch_1:0" and ds.ids[-1] == "data_batch_2:6"
    assert ds.classes == ["circle", "cross", "stripes"]


def test_cifar100_layout(tmp_path):
    root = tmp_path / "c100"
    root.mkdir()
    data = np.arange(4 * 3072, dtype=np.uint8).reshape(4, 3072)
    with open(root / "train", "wb") as f:
        pickle.dump({"data": data, "fine_labels": [0, 1, 2, 1], "coarse_labels": [0, 0, 1, 1],
                     "filenames": ["a", "b", "c", "d"], "batch_label": "training batch 1 of 1"}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["x", "y", "z"], "coarse_label_names": ["p", "q"]}, f)
    ds = load_dataset(root)
    assert ds.labels.tolist() == [0, 1, 2, 1]
    assert ds.ids[3] == "train:3"
    assert np.array_equal(ds.images[1].reshape(-1), data[1])


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_unpickler_refuses_code_execution(tmp_path):
    images, labels, _ = synthetic(n_per_class=4)
    root = tmp_path / "c"
    write_cifar(root, images, labels)
    sentinel = tmp_path / "pwned"
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(sentinel), b"labels": [0]}, f, protocol=2)
    with pytest.raises(InputError, match="data_batch_1: the pickle refers to '(posix|os|nt).system'"):
        load_dataset(root)
    assert not sentinel.exists()


def test_cifar_shape_and_label_errors(tmp_path):
    images, labels, _ = synthetic(n_per_class=4)
    root = tmp_path / "c"
    write_cifar(root, images, labels, batches=1)
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3071), np.uint8), b"labels": [0, 1, 2]}, f, protocol=2)
    with pytest.raises(InputError, match=r"shape \(3, 3071\), expected \(rows, 3072\)"):
        load_dataset(root)
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 7]}, f, protocol=2)
    with pytest.raises(InputError, match="label 7 is out of range 0..2"):
        load_dataset(root)


def test_unreadable_images_are_reported_and_indices_kept(tmp_path):
    images, labels, _ = synthetic(n_per_class=5)
    root = tmp_path / "d"
    ids = write_folder(root, images, labels)
    (root / ids[1]).write_bytes(b"")  # zero bytes
    good = (root / ids[7]).read_bytes()
    (root / ids[7]).write_bytes(good[: len(good) // 2])  # truncated
    (root / "stripes" / "fake.png").write_text("hello")
    ds = load_dataset(root)
    bad = {u.id: u for u in ds.unreadable}
    assert set(bad) == {ids[1], ids[7], "stripes/fake.png"}
    assert ds.num_total == 16 and ds.num_samples == 13
    assert bad[ids[1]].index == 1 and bad[ids[7]].index == 7
    # the samples after an unreadable one keep their position in ImageFolder order
    assert ds.indices.tolist()[:2] == [0, 2]
    assert ds.ids[1] == ids[2]


def test_mixed_modes_and_sizes_follow_the_rule(tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    Image.new("L", (8, 8), 10).save(root / "a" / "1.png")
    Image.new("L", (8, 8), 20).save(root / "a" / "2.png")
    Image.new("RGB", (12, 10), (255, 0, 0)).save(root / "b" / "3.png")
    Image.new("RGBA", (8, 8), (0, 255, 0, 128)).save(root / "b" / "4.png")
    ds = load_dataset(root)
    assert ds.image_shape == (3, 8, 8)  # any colour image makes the set RGB; most common size wins
    assert ds.images[2, :, 0, 0].tolist() == [255, 0, 0]
    assert load_dataset(root, image_size=(5, 6)).image_shape == (3, 5, 6)


@pytest.mark.parametrize("setup, message", [
    (lambda r: None, "no such file or directory"),
    (lambda r: r.mkdir(), "no class folders found"),
    (lambda r: (r / "a").mkdir(parents=True), "no images found"),
])
def test_bad_folders(tmp_path, setup, message):
    root = tmp_path / "x"
    setup(root)
    with pytest.raises(InputError, match=message):
        load_dataset(root)


def test_single_class_is_refused(tmp_path):
    root = tmp_path / "d"
    (root / "only").mkdir(parents=True)
    Image.new("L", (8, 8)).save(root / "only" / "1.png")
    with pytest.raises(InputError, match="only one class"):
        load_dataset(root)


def test_single_readable_class_names_the_files_that_could_not_be_read(tmp_path):
    """A class whose every file fails to decode looks absent: the error says so, with the first such file."""
    root = tmp_path / "d"
    (root / "good").mkdir(parents=True)
    (root / "broken").mkdir()
    Image.new("L", (8, 8)).save(root / "good" / "1.png")
    (root / "broken" / "2.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"only one class \(good\) found \(1 file\(s\) could not be read, "
                                         r"the first broken/2\.png"):
        load_dataset(root)
