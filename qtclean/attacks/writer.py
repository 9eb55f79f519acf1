"""`qtclean poison`: write a poisoned copy of a dataset in its own format, and the truth beside it.

Image folder: every readable image re-encoded as PNG (a lossy format would blur the trigger) at its relative path
with a ``.png`` suffix, moved to its new class folder when its label changes. CIFAR: batches rewritten with the
same keys and rows (data and labels changed), meta and test batch copied. Truth: ``DIR.truth.csv`` beside DIR,
columns ``index,id,poisoned,original_label,label,cover`` in the copy's own index order (``cover``: a trigger variant
on a sample that keeps its label, WaNet's noise mode and the adaptive attacks' cover samples; not poisoned).
Learned attacks (iab, issba) also write their trained trigger network to ``DIR.trigger.safetensors``, which
``trigger=`` (``--trigger``) reuses to poison a test set with the same backdoor.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import outputs
from ..data import Dataset, load_dataset
from ..data.cifar import safe_load
from ..data.cifar_writer import write_batch
from ..data.folder import list_files
from ..errors import InputError, RunError
from ..export import atomic_folder, check_destination
from .lab import ATTACK_NAMES, poison
from .learned import LEARNED_ATTACKS, LearnedTrigger


@dataclass(frozen=True)
class PoisonResult:
    out: Path
    truth_path: Path
    num_samples: int
    num_poisoned: int
    attack: str
    trigger_path: Path | None = None  # learned attacks: the trained trigger network
    trigger_info: dict | None = None


def truth_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".truth.csv")


def trigger_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".trigger.safetensors")


def poison_dataset(data: str | os.PathLike, out: str | os.PathLike, *, attack: str, rate: float = 0.1,
                   target: int = 0, seed: int = 0, format: str = "auto", force: bool = False,
                   trigger: str | os.PathLike | None = None, on_training=None) -> PoisonResult:
    """Write ``attack`` at ``rate`` into a copy of ``data`` at ``out``; the truth goes to ``out.truth.csv``.

    Learned attacks train their trigger network on ``data`` (``on_training(attack)`` is called first: it takes
    a minute) unless ``trigger`` names a ``.trigger.safetensors`` file from an earlier poisoning."""
    data, out = Path(data), Path(out)
    if attack not in ATTACK_NAMES:
        raise InputError(f"--attack {attack!r}: choose one of {', '.join(ATTACK_NAMES)}")
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"--rate {rate}: must be a fraction between 0 and 1")
    if trigger is not None and attack not in LEARNED_ATTACKS:
        raise InputError(f"--trigger is for the learned attacks ({', '.join(LEARNED_ATTACKS)}), not {attack!r}: "
                         "drop --trigger")
    check_destination(out, data=data, run_dir=None, force=force, option="--out")
    learned = LearnedTrigger.load(trigger) if trigger is not None else None
    if learned is not None and learned.attack != attack:
        raise InputError(f"--trigger {trigger}: it is an {learned.attack} trigger, not {attack}: "
                         f"use --attack {learned.attack} or another trigger file")
    ds = load_dataset(data, format=format)
    if not 0 <= target < ds.num_classes:
        raise InputError(f"--target {target}: the dataset has classes 0..{ds.num_classes - 1}")
    if learned is not None:
        learned.check_shape(ds.images)
    elif attack in LEARNED_ATTACKS and on_training is not None:
        on_training(attack)
    poisoned = poison(ds.images, ds.labels, ds.num_classes, attack=attack, rate=rate, target=target, seed=seed,
                      trigger=learned)
    images, labels, mask, cover = poisoned.images, poisoned.labels, poisoned.poisoned, poisoned.cover
    writer = _write_folder if ds.format == "folder" else _write_cifar
    ids: list[str] = []
    truth, trigger_out = truth_path_for(out), trigger_path_for(out)
    try:
        if poisoned.trigger is not None:  # first: a copy never exists without the network that made it
            poisoned.trigger.save(trigger_out)
        elif trigger_out.exists():  # --force over a learned attack's copy: its old network no longer applies
            trigger_out.unlink()
        atomic_folder(out, force, lambda tmp: ids.extend(writer(ds, images, labels, tmp)))
        rows = [[i, ids[i], int(mask[i]), int(ds.labels[i]), int(labels[i]), int(cover[i])] for i in range(len(ids))]
        if ds.format == "folder":  # relabelled files moved folders: index = position in the copy's ImageFolder order
            order = {rel: i for i, (rel, _) in enumerate(list_files(out)[1])}
            rows = sorted(([order[r[1]], *r[1:]] for r in rows), key=lambda r: r[0])
        outputs.write_text(truth, outputs.csv_text(rows, ["index", "id", "poisoned", "original_label", "label",
                                                          "cover"]))
    except OSError as exc:
        raise RunError(f"{out}: cannot write the poisoned copy ({exc}); check free space and permissions") from exc
    if poisoned.trigger is None:
        trigger_out = None
    return PoisonResult(out=out, truth_path=truth, num_samples=len(rows), num_poisoned=int(mask.sum()),
                        attack=attack, trigger_path=trigger_out,
                        trigger_info=poisoned.trigger.info if poisoned.trigger is not None else None)


def _write_folder(ds: Dataset, images: np.ndarray, labels: np.ndarray, out: Path) -> list[str]:
    """Return the new relative path of each sample, in the input's order."""
    for name in ds.classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    new_ids = []
    for i, rel in enumerate(ds.ids):
        inner = Path(*Path(rel).parts[1:]).with_suffix(".png")
        new = (Path(ds.classes[int(labels[i])]) / inner).as_posix()
        if new in taken:  # a relabelled file meets a namesake in its new class
            new = (Path(new).with_name(f"{Path(new).stem}-{i}.png")).as_posix()
        taken.add(new)
        (out / new).parent.mkdir(parents=True, exist_ok=True)
        array = images[i]
        Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)).save(out / new)
        new_ids.append(new)
    return new_ids


def _write_cifar(ds: Dataset, images: np.ndarray, labels: np.ndarray, out: Path) -> list[str]:
    root, extra, start = Path(ds.root), ds.extra, 0
    for fname, num_rows in extra["batches"]:
        batch = safe_load(root / fname)
        batch["data"] = images[start:start + num_rows].reshape(num_rows, -1)
        lab = labels[start:start + num_rows].tolist()
        batch[extra["label_key"]] = lab if isinstance(batch[extra["label_key"]], list) else np.asarray(lab)
        write_batch(out / fname, batch)
        start += num_rows
    for fname in (extra["meta"], extra["test"]):
        if (root / fname).is_file():
            shutil.copyfile(root / fname, out / fname)
    return list(ds.ids)
