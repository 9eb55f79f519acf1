"""`scan`: the detection pipeline as one library call (pre-quarantine, quarantine, scores).

N = number of readable samples, K = number of classes. The CLI is a thin layer over :func:`scan`.
State is checkpointed after every epoch (safetensors + JSON, never pickle), so ``resume=True`` continues from the
last finished epoch and gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from . import baselines, qt, readout
from .content import group_content, label_agreement, pixel_embedding, value_counts, value_histograms
from .data import Dataset
from .engine import (DeviceData, default_threads, make_optimizer, predict, prepare_model, put_on_device,
                     resolve_device, train_epoch)
from .errors import InputError
from .models import MODELS, build_model, widen_head
from .outputs import write_tensors

CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """How models are trained (both phases).

    model : key of qtclean.models.MODELS, default "cnn".
    batch_size : samples per step. lr : SGD learning rate (per batch of ``batch_size``), pre-quarantine.
    lr_quarantine : SGD learning rate of the quarantine phase (None = ``lr``); the paper's 0.01. Measured:
        0.05 made membership swing by hundreds of samples per epoch and lost 30 % of BadNets poison.
    momentum, weight_decay : SGD settings. device : auto|cpu|cuda|cuda:N|mps. threads : CPU threads (None = cores).
    cuda_graphs : on CUDA, replay each training step as a CUDA graph (same arithmetic, far fewer launches; see
        qtclean.engine.train_epoch); False = eager steps.
    precision : on CUDA, "bf16" (autocast) or "fp32" (TF32 off too, as on CPU); CPU is always fp32.
    """

    model: str = "cnn"
    batch_size: int = 128
    lr: float = 0.05
    lr_quarantine: float | None = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    device: str = "auto"
    threads: int | None = None
    cuda_graphs: bool = True
    precision: str = "bf16"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScanResult:
    """What a scan found.

    scores : float32 (N,), 0..1, higher = more likely poisoned (probability mass on the quarantine class y + K).
    flagged : bool (N,), the model predicts the sample's quarantine class.
    pre_quarantine : bool (N,), the pre-quarantine set.
    epochs : per-epoch statistics (phase, epoch, loss, seconds, img/s, pre-quarantine size, quarantined per class,
        releases).
    model : the final 2K-way quarantine model (on CPU).
    readout_logits : float32 (N, 2K), the logits step 3 read: the final model's, or with ``readout_epochs`` > 1
        the log of its last epochs' averaged probabilities in the seeded classes.
    device : the device it ran on. seconds : training wall time.
    """

    scores: np.ndarray
    flagged: np.ndarray
    pre_quarantine: np.ndarray
    epochs: list[dict]
    model: torch.nn.Module
    device: str
    seconds: float
    stop_reason: str = "completed all epochs"
    extra: dict = field(default_factory=dict)
    readout_logits: np.ndarray | None = None  # (N, 2K): what step 3 read (the final model's, or an average)


def _noop(event: str, **info) -> None:
    return None


def _withdrawn_text(c: int, info: dict) -> str:
    """Why class ``c``'s flags were withdrawn and what it flags instead, for run.json and the summary."""
    if info.get("unlike_target"):
        targets = ", ".join(map(str, info["unlike_target"]))
        return (f"class {c} ({info['flagged']} flagged; unlike class {targets}'s, their pixels do not look like "
                "relabelled images of other classes)")
    if info.get("off_trigger"):
        carrying = ("class " if len(info["off_trigger"]) == 1 else "classes ") + ", ".join(
            map(str, info["off_trigger"]))
        return (f"class {c} ({info['flagged']} flagged; the trigger that the flags of {carrying} share is in "
                "their pixels no more than in the rest of the class)")
    instead = (f"; its {info['content_flagged']} samples whose pixels look like other classes flagged instead"
               if info.get("content_flagged") else "")
    if info.get("content_completed"):
        instead += f", with {info['content_completed']} more that look so and score like them"
    return f"class {c} ({_unseparated_text(info)}{instead})"


def _unseparated_text(info: dict) -> str:
    """What made a class's quarantine one that :func:`readout.withdraw_ambiguous` looks at: it took the class itself,
    or too much of the class is ambiguous."""
    if "content_seed_held" in info:
        return (f"{info['flagged']} quarantined, holding only {info['content_seed_held']:.0%} of the "
                f"{info['content_seed']} samples its content seed started it with")
    if "unflagged_left" in info:
        return (f"{info['flagged']} quarantined, only {info['unflagged_left']} of the class left outside: the "
                "quarantine took the class itself")
    return f"{info['flagged']} quarantined, {info['ambiguous_share']:.0%} of the class ambiguous"


def _pixel_content(dataset: Dataset, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The pixel embedding the content rules read, and how much its neighbourhoods say about labels over the whole
    set (computed once per scan, shared by the expansion's check, the content seed and step 3's content rules)."""
    embedding = pixel_embedding(dataset.images)
    return embedding, label_agreement(embedding, labels.cpu())


def _seeded_by(epochs: list[dict], keys: tuple[str, ...], k: int, device: torch.device) -> torch.Tensor:
    """(K,) bool: the classes that any of the epoch statistics ``keys`` (per-class seed counts, recorded by the
    pre-quarantine epoch, so they survive a resume) gave a seed."""
    seeded = torch.zeros(k, dtype=torch.bool, device=device)
    for e in epochs:
        for key in keys:
            if key in e:
                seeded |= torch.tensor(e[key], device=device) > 0
    return seeded


def _save_checkpoint(path: Path, *, model, optimizer, generator, eps, pre_mask, prev_members, pre_log_losses,
                     seed_weights: torch.Tensor | None, meta: dict, kway_state: dict | None = None,
                     pass_seed: torch.Tensor | None = None, recent: Sequence[torch.Tensor] = ()) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if kway_state is not None:  # first quarantine pass: the K-way weights a second pass starts from
        tensors.update({f"kway.{k}": v.detach().cpu().contiguous() for k, v in kway_state.items()})
    if pass_seed is not None:  # second pass: its seed (the first pass's flags)
        tensors["pass_seed"] = pass_seed.detach().cpu().to(torch.uint8).contiguous()
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"optim.{i}"] = buf.detach().cpu().contiguous()
    tensors["rng"] = generator.get_state().cpu().contiguous()
    tensors["eps"] = eps.detach().cpu().contiguous()
    tensors["pre_mask"] = pre_mask.detach().cpu().to(torch.uint8).contiguous()
    tensors["prev_members"] = prev_members.detach().cpu().to(torch.uint8).contiguous()
    tensors["pre_log_losses"] = pre_log_losses.detach().cpu().contiguous()
    if seed_weights is not None:  # quarantine phase: --seed-weight-until may have released some already
        tensors["seed_weights"] = seed_weights.detach().cpu().contiguous()
    for i, r in enumerate(recent):  # the last epochs' eval passes that --readout-epochs averages
        tensors[f"recent.{i}"] = r.detach().cpu().contiguous()
    write_tensors(path, tensors, {"qtclean_checkpoint": json.dumps(meta)})


def _load_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["qtclean_checkpoint"])
    return load_file(str(path)), meta


def scan(dataset: Dataset, *, qt_config: qt.QTConfig = qt.QTConfig(), train_config: TrainConfig = TrainConfig(),
         seed: int = 0, progress: Callable[..., None] | None = None, checkpoint_dir: str | Path | None = None,
         resume: bool = False, method: str = "qt",
         baseline_config: baselines.BaselineConfig = baselines.BaselineConfig()) -> ScanResult:
    """Find the poisoned samples of ``dataset`` with Quarantine Training.

    Parameters
    ----------
    dataset : Dataset
        From :func:`qtclean.load_dataset`.
    qt_config, train_config : algorithm and training settings (see their docstrings).
    seed : int
        Seeds model init and batch order; same seed + device = same scores.
    progress : callable(event, **info), optional
        Events: ``phase``, ``epoch_start``, ``batch``, ``epoch_end``.
    checkpoint_dir : path, optional
        Where to keep ``checkpoint.safetensors`` after each epoch.
    resume : bool
        Continue from ``checkpoint_dir``'s checkpoint.
    method : "qt" (default), or a baseline for comparison: "loss", "ss", "ac" (see :mod:`qtclean.baselines`),
        which trains a plain K-way model with ``baseline_config`` and scores from it.

    Returns
    -------
    ScanResult
    """
    progress = progress or _noop
    cfg, tcfg = qt_config, train_config
    if method not in baselines.METHODS:
        raise InputError(f"--method {method!r}: choose one of {', '.join(baselines.METHODS)}")
    is_qt = method == "qt"
    epochs_k = (qt.pre_quarantine_epochs(cfg, dataset.num_samples, tcfg.batch_size) if is_qt
                else baseline_config.epochs_for(method))
    phase_k = "pre-quarantine" if is_qt else "training"
    if tcfg.model not in MODELS:
        raise InputError(f"--model {tcfg.model!r}: choose one of {', '.join(MODELS)}")
    device = resolve_device(tcfg.device)
    extra: dict = {}
    if device.type == "cpu":
        torch.set_num_threads(tcfg.threads or default_threads())
        extra["threads"] = torch.get_num_threads()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotuned convolutions pay off after a few steps
        if tcfg.precision == "fp32":  # full fp32, as on CPU: TF32 would round convolutions to a 10-bit mantissa
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats(device)
    k = dataset.num_classes
    lr_q = tcfg.lr if tcfg.lr_quarantine is None else tcfg.lr_quarantine
    t_start = time.perf_counter()
    data = put_on_device(dataset.images, dataset.labels, device, precision=tcfg.precision)
    torch.manual_seed(seed)
    model = prepare_model(build_model(tcfg.model, dataset.image_shape[0], k), device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    optimizer = make_optimizer(model, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    epochs: list[dict] = []
    pre_mask = torch.zeros(data.num_samples, dtype=torch.bool, device=device)
    eps = torch.zeros(data.num_samples, dtype=torch.float32, device=device)
    done_pre, done_q, stable_epochs = 0, 0, 0
    prev_members = torch.zeros(data.num_samples, dtype=torch.bool, device=device)
    pre_log_losses = torch.zeros(epochs_k, data.num_samples, dtype=torch.float32, device=device)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    saved_weights = None  # the quarantine loss's per-sample seed weights, as of the checkpoint resumed from
    weights = None  # ... and as they are now (set when the quarantine phase starts)
    quarantine_pass, kway_state, seed_mask = 1, None, None  # seed_mask: the seed of the quarantine pass running
    final_logits = None  # full-set eval logits of the final model, when already computed
    recent: list[torch.Tensor] = []  # the seeded classes' eval logits of this pass's last readout_epochs epochs

    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise InputError(f"{checkpoint_dir}: no checkpoint to resume from; run without --resume")
        tensors, meta = _load_checkpoint(ckpt_path)
        done_pre, done_q, epochs = meta["done_pre"], meta["done_q"], meta["epochs"]
        stable_epochs = meta.get("stable_epochs", 0)
        if "prev_members" in tensors:
            prev_members = tensors["prev_members"].to(device).bool()
        if "pre_log_losses" in tensors:
            pre_log_losses = tensors["pre_log_losses"].to(device)
        if tensors["model.head.weight"].shape[0] == 2 * k:  # saved during the quarantine phase
            widen_head(model, k, quarantine_bias=cfg.quarantine_bias)
            optimizer = make_optimizer(model, lr=lr_q, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
        model.load_state_dict({n[6:]: v.to(device) for n, v in tensors.items() if n.startswith("model.")})
        params = optimizer.param_groups[0]["params"]
        for i, p in enumerate(params):
            if f"optim.{i}" in tensors:
                optimizer.state[p]["momentum_buffer"] = tensors[f"optim.{i}"].to(device)
        generator.set_state(tensors["rng"])
        eps = tensors["eps"].to(device)
        pre_mask = tensors["pre_mask"].to(device).bool()
        if "seed_weights" in tensors:
            saved_weights = tensors["seed_weights"].to(device).float()
        quarantine_pass = meta.get("quarantine_pass", 1)
        kway_state = {n[5:]: v.to(device) for n, v in tensors.items() if n.startswith("kway.")} or None
        if "pass_seed" in tensors:
            seed_mask = tensors["pass_seed"].to(device).bool()
        if "second_pass" in meta:
            extra["second_pass"] = meta["second_pass"]
        recent = [tensors[f"recent.{i}"].to(device) for i in range(cfg.readout_epochs) if f"recent.{i}" in tensors]

    def checkpoint() -> None:
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, model=model, optimizer=optimizer, generator=generator, eps=eps,
                             pre_mask=pre_mask, prev_members=prev_members, pre_log_losses=pre_log_losses,
                             seed_weights=weights, kway_state=kway_state if quarantine_pass == 1 else None,
                             pass_seed=seed_mask if quarantine_pass == 2 else None, recent=recent,
                             meta={"done_pre": done_pre, "done_q": done_q, "epochs": epochs, "seed": seed,
                                   "stable_epochs": stable_epochs, "quarantine_pass": quarantine_pass,
                                   **({"second_pass": extra["second_pass"]} if "second_pass" in extra else {})})

    def on_batch(n: int) -> None:
        progress("batch", n=n)

    labels = data.labels

    @functools.cache
    def pixel_content() -> tuple[torch.Tensor, float]:  # once, when a content rule first needs it (not checkpointed)
        return _pixel_content(dataset, labels)

    # Phase 1: pre-quarantine (K-way, hard labels); a baseline method trains only this model.
    if done_pre < epochs_k:
        progress("phase", name=phase_k, epochs=epochs_k)
    while done_pre < epochs_k:
        t0 = time.perf_counter()
        progress("epoch_start", phase=phase_k, epoch=done_pre + 1, total=epochs_k, num_samples=data.num_samples)
        loss = train_epoch(model, optimizer, data, lambda lg, idx: qt.per_sample_cross_entropy(lg, labels[idx]),
                           batch_size=tcfg.batch_size, generator=generator, on_batch=on_batch,
                           cuda_graph=tcfg.cuda_graphs)
        done_pre += 1
        stat = {"phase": phase_k, "epoch": done_pre, "loss": round(loss, 5)}
        if is_qt and (cfg.pre_selection == "relative" or done_pre == epochs_k):
            logits = predict(model, data)
            losses = qt.per_sample_cross_entropy(logits, labels)
            pre_log_losses[done_pre - 1] = torch.log(losses.float() + 1e-8)
        if is_qt and done_pre == epochs_k:
            if cfg.pre_selection == "relative":
                pre_mask = qt.select_pre_quarantine_relative(pre_log_losses, labels, k,
                                                             cfg.pre_fraction, cfg.pre_threshold)
            else:
                pre_mask = qt.select_pre_quarantine(losses, labels, k, cfg.pre_fraction)
            loss_seeded = qt.seeded_classes(labels, pre_mask, k, cfg)
            features = None  # penultimate features, computed once if a seeding rule below needs them
            small_seed = ~loss_seeded & (torch.bincount(labels[pre_mask], minlength=k) > 0)
            if cfg.expand_min_bimodality > 0 and bool(small_seed.any()):
                features = predict(model, data, embed=True)
                pixels, pixel_agreement = pixel_content() if cfg.content_max_agreement > 0 else (None, None)
                expanded, expansion = qt.expand_seed(features, labels, pre_mask, small_seed, cfg, embedding=pixels,
                                                     baseline=pixel_agreement)
                stat["seed_expansion"] = {str(c): v for c, v in expansion.items()}  # why a class was (not) expanded
                stat["expanded_seed_per_class"] = torch.bincount(labels[expanded], minlength=k).tolist()
                pre_mask = pre_mask | expanded
            seeded_so_far = qt.seeded_classes(labels, pre_mask, k, cfg)
            if cfg.content_max_agreement > 0 and not bool(seeded_so_far.all()):
                features = predict(model, data, embed=True) if features is None else features
                pixels, pixel_agreement = pixel_content()
                extra_seed, content = qt.content_seed(pixels, features, labels, k, cfg, skip=seeded_so_far,
                                                      baseline=pixel_agreement)
                stat["content_seed"] = content  # each class's clusters: pixel-neighbour agreement and diversity
                stat["content_seed_per_class"] = torch.bincount(labels[extra_seed], minlength=k).tolist()
                pre_mask = pre_mask | extra_seed
                seeded_so_far = qt.seeded_classes(labels, pre_mask, k, cfg)
            if cfg.feature_seed_share > 0 and not bool(seeded_so_far.all()):
                features = predict(model, data, embed=True) if features is None else features
                extra_seed = qt.feature_seed(features, labels, k, cfg.feature_seed_share, skip=seeded_so_far)
                stat["feature_seed_per_class"] = torch.bincount(labels[extra_seed], minlength=k).tolist()
                pre_mask = pre_mask | extra_seed
                seeded_so_far = qt.seeded_classes(labels, pre_mask, k, cfg)
            if cfg.shared_trigger_seed and not bool(seeded_so_far.all()):
                features = predict(model, data, embed=True) if features is None else features
                extra_seed, shared = qt.shared_trigger_seed(features, labels, pre_mask, k, cfg)
                if shared:  # per class without a seed: the group along the seeds' direction, and the decision
                    stat["shared_trigger_seed"] = shared
                    stat["shared_trigger_seed_per_class"] = torch.bincount(labels[extra_seed], minlength=k).tolist()
                pre_mask = pre_mask | extra_seed
            seeded = qt.seeded_classes(labels, pre_mask, k, cfg)
            eps = qt.init_eps(pre_mask, cfg, seeded[labels])
            stat["pre_quarantine_size"] = int(pre_mask.sum())
            stat["pre_quarantine_per_class"] = torch.bincount(labels[pre_mask], minlength=k).tolist()
            stat["seeded_classes"] = torch.nonzero(seeded).flatten().tolist()  # classes that get a quarantine
            stat["accuracy"] = round(float((logits.argmax(1) == labels).float().mean()), 4)
        stat["seconds"] = round(time.perf_counter() - t0, 3)
        stat["img_per_s"] = round(data.num_samples / max(stat["seconds"], 1e-9), 1)
        epochs.append(stat)
        progress("epoch_end", **stat)
        checkpoint()

    if not is_qt:
        return _baseline_result(method, baseline_config, model, data, k, device, epochs, extra, t_start)

    # Phase 2: quarantine (2K-way, soft targets); run again from the K-way model when it did not settle.
    if seed_mask is None:
        seed_mask = pre_mask
    if model.head.out_features == k:
        if cfg.second_pass_epochs > 0:  # the K-way weights a second pass would start from
            kway_state = {n: v.detach().clone() for n, v in model.state_dict().items()}
        widen_head(model, k, quarantine_bias=cfg.quarantine_bias)
        optimizer = make_optimizer(model, lr=lr_q, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    # Seed weights for the classes the loss rule seeded (and, with weight_expanded, those whose small loss seed was
    # expanded: its group can still be a minority of the poison); a feature seed is a whole cluster, the trigger's
    # group itself, not a handful of its fastest-fitted members, so nothing outvotes it. A second pass's seed is
    # the first pass's flags: weighted like a loss seed.
    unweighted = ("feature_seed_per_class", "content_seed_per_class", "shared_trigger_seed_per_class") + (
        () if cfg.weight_expanded else ("expanded_seed_per_class",))
    feature_seeded = _seeded_by(epochs if quarantine_pass == 1 else [], unweighted, k, device)
    logits = torch.zeros(data.num_samples, 2 * k, device=device)  # rows outside ``watched`` are never read

    def settled() -> bool:
        return bool(qcfg.early_stop_patience) and stable_epochs >= qcfg.early_stop_patience

    first_read = None  # step 3 on the first pass's model, where the second pass asked for it
    while True:
        qcfg = cfg if quarantine_pass == 1 else qt.second_pass_config(
            cfg, residual_seeded=bool(extra["second_pass"].get("residual_seeded")))
        phase_q = "quarantine" if quarantine_pass == 1 else "second pass"
        if done_q < qcfg.epochs_quarantine:
            why = {"why": extra["second_pass"]["reason"]} if quarantine_pass == 2 else {}
            progress("phase", name=phase_q, epochs=qcfg.epochs_quarantine, **why)
        # Membership can only change in seeded classes (qt.seeded_classes), so the end-of-epoch eval pass covers
        # those samples only: on clean data none, with one target class about a fifth of the set.
        seeded = qt.seeded_classes(labels, seed_mask, k, qcfg)
        watched = torch.nonzero(seeded[labels]).flatten()
        weights = qt.seed_weights(labels, seed_mask, seeded & ~feature_seeded, k, qcfg)
        seed_weight = torch.ones(k, device=device)  # per class, for run.json: why a small seed could grow
        seed_weight[labels[seed_mask]] = weights[seed_mask]
        extra["seed_weight_per_class" if quarantine_pass == 1 else "second_pass_seed_weight_per_class"] = [
            round(float(w), 3) for w in seed_weight]
        if saved_weights is not None:  # resumed mid-quarantine: keep the weights as they were (releases included)
            weights, saved_weights = saved_weights, None

        while done_q < qcfg.epochs_quarantine and not settled():
            t0 = time.perf_counter()
            progress("epoch_start", phase=phase_q, epoch=done_q + 1, total=qcfg.epochs_quarantine,
                     num_samples=data.num_samples)
            eps_now, weights_now = eps, weights

            def quarantine_loss(lg: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                return weights_now[idx] * qt.soft_target_loss(lg, labels[idx], eps_now[idx], k)

            loss = train_epoch(model, optimizer, data, quarantine_loss, batch_size=tcfg.batch_size,
                               generator=generator, on_batch=on_batch, cuda_graph=tcfg.cuda_graphs)
            done_q += 1
            logits[watched] = predict(model, data, rows=watched)
            if cfg.readout_epochs > 1:
                recent = [*recent, logits[watched].clone()][-cfg.readout_epochs:]
            members = qt.membership(logits, labels, seed_mask, k, qcfg)
            weights = qt.release_seed_weights(weights, labels, seed_mask, members, k, qcfg)
            eps, stat = qt.update_eps(eps, epoch=done_q, logits=logits, labels=labels, pre_mask=seed_mask,
                                      num_classes=k, cfg=qcfg, members=members)
            changed = int((members != prev_members).sum())
            prev_members = members
            stable = qt.is_stable(epoch=done_q, changed=changed, num_samples=data.num_samples,
                                  released=bool(stat["releases"]), cfg=qcfg, any_seeded=bool(seeded.any()))
            stable_epochs = stable_epochs + 1 if stable else 0
            stat = {"phase": phase_q, "epoch": done_q, "loss": round(loss, 5), **stat,
                    "membership_changed": changed, "stable_epochs": stable_epochs,
                    "seconds": round(time.perf_counter() - t0, 3)}
            stat["img_per_s"] = round(data.num_samples / max(stat["seconds"], 1e-9), 1)
            epochs.append(stat)
            progress("epoch_end", **stat)
            checkpoint()

        if quarantine_pass == 2 or cfg.second_pass_epochs <= 0 or not bool(seeded.any()):
            break
        last_changed = next((e["membership_changed"] for e in reversed(epochs) if e["phase"] == phase_q), 0)
        final_logits = predict(model, data)  # the first pass's answer: the scores if no second pass follows
        flags = qt.membership(final_logits, labels, seed_mask, k, cfg)
        growth = qt.seed_growth(labels, seed_mask, flags, k)
        if cfg.second_pass_peak_growth:  # a quarantine that grew after the dynamic epochs and shrank back
            this_pass = [e for e in epochs if e["phase"] == phase_q]
            growth = max(growth, qt.peak_growth(this_pass, int((seed_mask & seeded[labels]).sum()),
                                                cfg.epochs_dynamic))
        reason, found_unseeded = None, torch.zeros_like(flags)
        if not settled() and qt.needs_second_pass(last_changed=last_changed, num_samples=data.num_samples,
                                                  growth=growth, cfg=cfg):
            reason = (f"the quarantine had not settled after {done_q} epochs: membership changed by "
                      f"{last_changed} samples in its last epoch, and it held up to {growth:.1f}x its seed")
        many_targets = qt.is_many_target(seeded, k) and not bool(seeded.all())  # where the residual can act
        if cfg.second_pass_after_residual and many_targets:
            # Step 3 on the first pass: flags in a class it never seeded are the trigger residual's (no other rule
            # flags there); enough of them to seed a class send it to the second pass's seed as they are.
            probe: dict = {}
            first_read = (*read_out(final_logits, labels, pre_mask, epochs, cfg, pixel_content, probe), probe)
            found_unseeded = first_read[1] & ~seeded[labels]
            unseeded = qt.seeded_classes(labels, found_unseeded | flags, k, qt.residual_seed_config(cfg)) & ~seeded
            found_unseeded &= unseeded[labels]
            if bool(found_unseeded.any()):
                reason = ("" if reason is None else reason + "; ") + (
                    "step 3's trigger residual flagged the poison of classes the quarantine never seeded "
                    f"({', '.join(map(str, torch.nonzero(unseeded).flatten().tolist()))}), which it never learned")
        if reason is None:
            break
        final_logits = None  # the model is replaced below
        # Second pass: a fresh 2K head on the K-way model, seeded with the first pass's flags that look relabelled.
        first_seed, seed_mask = seed_mask, flags
        seed_filter: dict = {}  # per class: the first pass's flags' pixel content, how many became the seed
        if cfg.second_pass_seed_max_own_share < 1:
            pixels, pixel_agreement = pixel_content()
            seed_mask, seed_filter = qt.relabelled_flags(pixels, labels, flags, first_seed, k, cfg, pixel_agreement)
        seed_mask = seed_mask | found_unseeded  # found by the trigger in their pixels: no pixel cut applies
        model = prepare_model(build_model(tcfg.model, dataset.image_shape[0], k), device)
        model.load_state_dict(kway_state)
        widen_head(model, k, quarantine_bias=cfg.quarantine_bias)
        optimizer = make_optimizer(model, lr=lr_q, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
        quarantine_pass, done_q, stable_epochs, feature_seeded = 2, 0, 0, torch.zeros_like(feature_seeded)
        prev_members, weights = torch.zeros_like(prev_members), None  # weights: recomputed for the new seed
        recent = []  # the read-out averages the second pass's epochs only
        residual_seeded = bool(found_unseeded.any())
        second_cfg = qt.second_pass_config(cfg, residual_seeded=residual_seeded)
        eps = qt.init_eps(seed_mask, cfg, qt.seeded_classes(labels, seed_mask, k, second_cfg)[labels])
        extra["second_pass"] = {
            "reason": reason, "residual_seeded": residual_seeded,
            "seed_per_class": torch.bincount(labels[seed_mask], minlength=k).tolist(),
            "first_pass_flags_per_class": torch.bincount(labels[flags | found_unseeded], minlength=k).tolist(),
            **({"seed_content": seed_filter} if seed_filter else {})}
        checkpoint()

    logits = predict(model, data) if final_logits is None else final_logits
    q_name = "quarantine epoch" if quarantine_pass == 1 else "second-pass epoch"
    stop_reason = "completed all epochs"
    if settled() and done_q < qcfg.epochs_quarantine:
        stop_reason = (f"stopped early after {q_name} {done_q} of {qcfg.epochs_quarantine}: membership "
                       f"stable for {stable_epochs} epochs (--early-stop-patience {cfg.early_stop_patience})")
    if quarantine_pass == 2:
        stop_reason = f"second pass ({extra['second_pass']['reason']}); {stop_reason}"
    if len(recent) > 1:  # the seeded classes' (the last pass's ``watched``) probabilities over its last epochs
        average = torch.stack([torch.softmax(r.float(), dim=1) for r in recent]).mean(0)
        logits = logits.clone()
        logits[watched] = average.clamp_min(1e-12).log()
        extra["readout_epochs"] = len(recent)
    # step 3 read this model already (without the rules that read pixels, which do not steer the second pass)
    reads_pixels = (cfg.shared_block_min_share > 0 or cfg.class_block_share > 0 or cfg.common_block_share > 0
                    or cfg.value_residual_gap > 0 or cfg.value_move_median > 0 or cfg.palette_min_expected > 0
                    or cfg.out_of_frame_band > 0)
    if first_read is not None and final_logits is not None and len(recent) <= 1 and not reads_pixels:
        scores_t, flagged_t, probe = first_read
        extra.update(probe)
    else:
        scores_t, flagged_t = read_out(logits, labels, pre_mask, epochs, cfg, pixel_content, extra, dataset.images)
    scores = scores_t.cpu().numpy().astype(np.float32)
    flagged = flagged_t.cpu().numpy()
    if device.type == "cuda":
        extra["peak_device_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return ScanResult(
        scores=scores,
        flagged=flagged,
        pre_quarantine=pre_mask.cpu().numpy(),
        epochs=epochs,
        model=model.cpu().eval(),
        device=str(device),
        seconds=time.perf_counter() - t_start,
        stop_reason=stop_reason,
        extra=extra,
        readout_logits=logits.float().cpu().numpy(),
    )


def read_out(logits: torch.Tensor, labels: torch.Tensor, pre_mask: torch.Tensor, epochs: list[dict], cfg: qt.QTConfig,
             pixel_content: Callable[[], tuple[torch.Tensor, float]], extra: dict,
             images: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: the scores (N,) and flags (N,) of a finished quarantine model's ``logits`` (N, 2K), after the rules
    that withdraw, demote and complete flags; what they did goes into ``extra`` (run.json). ``pre_mask`` and
    ``epochs`` say which classes a content group seeded; ``pixel_content`` gives the pixel embedding and its label
    agreement (called only when a rule needs them); ``images`` (N, C, H, W) uint8, the set's pixels, for the
    rules that read them exactly (blocks, value histograms; None: they are skipped). A function of its own so
    that a saved model can be read out again (benchmarks) exactly as the scan reads it."""
    k = logits.shape[1] // 2
    device = logits.device
    scores_t = qt.quarantine_probability(logits, labels, k, any_class=cfg.any_quarantine_class)
    probability = scores_t  # as the model gives it, before the rules below rescale scores
    content_seeded = _seeded_by(epochs, ("content_seed_per_class",), k, device)  # classes seeded by a content group
    content_seed = seeded_by_content = pre_mask & content_seeded[labels]
    if cfg.content_fallback and bool(content_seeded.any()):  # what a withdrawn one of them flags instead
        seeded_by_content = readout.widen_content_seed(pixel_content()[0], labels, seeded_by_content, content_seeded,
                                                       cfg.content_fallback_source_share)
    quarantined = qt.is_quarantined(logits, labels, k, any_class=cfg.any_quarantine_class)
    if cfg.any_quarantine_class:  # per class: flags the model routed into another class's quarantine class
        elsewhere = quarantined & ~qt.is_quarantined(logits, labels, k)
        extra["flagged_in_another_quarantine_class"] = torch.bincount(labels[elsewhere], minlength=k).tolist()

    def flags_content(c: int) -> dict | None:
        pixels, pixel_agreement = pixel_content()
        if pixel_agreement < cfg.content_min_baseline:
            return None
        return group_content(pixels, labels.cpu(), torch.nonzero(quarantined & (labels == c)).flatten(), c, k)

    flagged_t, ambiguity = readout.withdraw_ambiguous(scores_t, quarantined, labels, k, cfg,
                                                      seeded_by_content=seeded_by_content, flags_content=flags_content,
                                                      content_seed=content_seed)
    if cfg.content_fallback and any(v.get("content_flagged") for v in ambiguity.values()):
        flagged_t = readout.complete_content_fallback(scores_t, flagged_t, labels, seeded_by_content, ambiguity,
                                                      pixel_content()[0], cfg)
    if cfg.withdraw_unlike_target and torch.unique(labels[flagged_t]).numel() > 1:
        pixels, pixel_agreement = pixel_content()
        flagged_t = readout.withdraw_unlike_target(pixels, labels, flagged_t, ambiguity, k, cfg, pixel_agreement)
    if cfg.withdraw_off_trigger and qt.is_many_target(torch.unique(labels[flagged_t]).numel(), k):
        pixels, pixel_agreement = pixel_content()
        flagged_t = readout.withdraw_off_trigger_classes(pixels, labels, flagged_t, ambiguity, k, cfg,
                                                         pixel_agreement)
    scores_t = readout.demote_withdrawn_scores(scores_t, flagged_t, labels, ambiguity, content_seeded,
                                               cfg.withdrawn_score_scale)
    scores_t = readout.scores_follow_fallback_flags(scores_t, flagged_t, labels, ambiguity)
    withdrawn = [c for c, v in ambiguity.items() if v["withdrawn"]]
    if cfg.score_outlier_quantile > 0 and bool(flagged_t.any()):
        pixels, pixel_agreement = pixel_content()
        flagged_t, extra["score_outliers"] = readout.flag_score_outliers(scores_t, flagged_t, labels, k, pixels, cfg,
                                                                         pixel_agreement)
    if cfg.own_looking_flag_z > 0 and bool(flagged_t.any()):
        pixels, pixel_agreement = pixel_content()
        withdrawn_classes = torch.zeros(k, dtype=torch.bool)
        withdrawn_classes[withdrawn] = True
        flagged_t, extra["own_looking_flags"] = readout.own_looking_by_score(
            scores_t, flagged_t, labels, k, pixels, cfg, pixel_agreement, withdrawn_classes)
    if cfg.lookalike_margin_quantile > 0 and bool(flagged_t.any()):
        pixels, pixel_agreement = pixel_content()
        flagged_t, lookalikes = readout.flag_confident_lookalikes(logits, flagged_t, labels, withdrawn, pixels, k, cfg,
                                                                  pixel_agreement)
        if lookalikes:  # what each kept class's look-alikes showed, also where nothing was added
            extra["confident_lookalikes"] = lookalikes
            scores_t = readout.scores_follow_flags(scores_t, flagged_t, labels,
                                                   [int(c) for c, v in lookalikes.items() if v["added"]])
    if cfg.residual_in_flagged_classes and bool(flagged_t.any()):
        pixels, pixel_agreement = pixel_content()
        flagged_t, residual_scores, residual_info = readout.flag_residual_in_flagged_classes(
            pixels, labels, flagged_t, k, cfg, pixel_agreement)
        if residual_info:
            extra["residual_in_flagged_classes"] = residual_info
            scores_t = torch.maximum(scores_t, residual_scores)  # an added flag scores as a flag
            scores_t = readout.scores_follow_flags(scores_t, flagged_t, labels,
                                                   [int(c) for c, v in residual_info.items() if v["added"]])
    residual_flags = None  # the trigger residual's flags, where it added any
    if cfg.trigger_residual_quantile > 0 and bool(flagged_t.any()):
        pixels, pixel_agreement = pixel_content()
        # what the quarantine flagged, before withdrawals, less the quarantines step 3 judged false (unlike the
        # target, without the trigger): an ambiguous quarantine may be a target's, those are not
        quarantined_classes = torch.zeros(k, dtype=torch.bool)
        quarantined_classes[[c for c, v in ambiguity.items()
                             if not (v.get("unlike_target") or v.get("off_trigger"))]] = True
        flagged_t, residual_scores, residual_info = readout.flag_by_trigger_residual(
            pixels, labels, flagged_t, k, cfg, pixel_agreement, quarantined_classes=quarantined_classes)
        scores_t = torch.maximum(scores_t, residual_scores)  # a flag it adds scores as a flag, not as clean
        if residual_info:
            extra["trigger_residual"] = residual_info
            residual_flags = residual_scores > 0
    if cfg.trigger_free_quantile > 0 and bool(flagged_t.any()):
        pixels, pixel_agreement = pixel_content()
        confidence = (readout.label_probability(logits, labels, k) if cfg.trigger_free_confidence_quantile > 0
                      else None)  # the model's word, only where the option asks for it
        flagged_t, trigger_free = readout.withdraw_trigger_free_flags(
            pixels, labels, flagged_t, k, cfg, pixel_agreement, confidence)
        if trigger_free:
            extra["trigger_free_flags"] = trigger_free
    # the residual re-flagged withdrawn classes: complete them by their quarantine's ranking, unless it ranked
    # images without the trigger first (withdrawn for that: readout.withdraw_off_trigger_classes)
    ranked_by_poison = [c for c in withdrawn if not ambiguity[c].get("off_trigger")]
    if residual_flags is not None and ranked_by_poison:
        flagged_t, completed = readout.complete_residual_flags(probability, flagged_t, residual_flags, labels,
                                                               ranked_by_poison, pixel_content()[0], k, cfg)
        if completed:
            extra["trigger_residual"]["completed_per_class"] = completed
            scores_t = readout.scores_follow_flags(scores_t, flagged_t, labels, [int(c) for c in completed])
    if cfg.class_block_share > 0 and images is not None:
        flagged_t, class_bound = readout.flag_class_bound_blocks(images, labels, flagged_t, cfg)
        extra["class_bound_blocks"] = class_bound
        scores_t = readout.scores_follow_flags(scores_t, flagged_t, labels,
                                               [int(c) for c, v in class_bound.get("per_class", {}).items()
                                                if v["added"]])
    if cfg.shared_block_min_share > 0 and images is not None and bool(flagged_t.any()):
        pixels, pixel_agreement = pixel_content()
        flagged_t, shared = readout.flag_shared_blocks(images, pixels, labels, flagged_t, k, cfg, pixel_agreement)
        extra["shared_blocks"] = shared
        changed = [int(c) for c, v in shared.get("per_class", {}).items() if v["withdrawn"] or v["added"]]
        scores_t = readout.scores_follow_flags(scores_t, flagged_t, labels, changed)
    if cfg.common_block_share > 0 and images is not None:
        pixels, pixel_agreement = pixel_content()
        flagged_t, common = readout.flag_common_blocks(images, pixels, labels, flagged_t, cfg, pixel_agreement)
        if common:
            extra["common_blocks"] = common
            scores_t = readout.scores_follow_flags(scores_t, flagged_t, labels,
                                                   [int(c) for c in common.get("added_per_class", {})])
    counts = histograms = None  # the set's counts of pixel values, read once for the value rules
    if (cfg.value_residual_gap > 0 or cfg.value_move_median > 0 or cfg.palette_min_expected > 0) \
            and images is not None and bool(flagged_t.any()):
        counts = value_counts(images)
        histograms = value_histograms(counts)
    if cfg.value_residual_gap > 0 and histograms is not None:
        flagged_t, by_values = readout.flag_value_residual(histograms, labels, flagged_t, k, cfg)
        if by_values:
            extra["value_residual"] = by_values
            scores_t = readout.scores_follow_flags(scores_t, flagged_t, labels,
                                                   [int(c) for c in by_values.get("added_per_class", {})])
    if cfg.value_move_median > 0 and histograms is not None:
        flagged_t, value_move = readout.withdraw_against_value_move(histograms, labels, flagged_t, k, cfg)
        if value_move:
            extra["value_move"] = value_move
            scores_t = readout.scores_follow_flags(scores_t, flagged_t, labels,
                                                   [int(c) for c in value_move.get("withdrawn_per_class", {})])
    if cfg.palette_min_expected > 0 and counts is not None:
        flagged_t, palette = readout.flag_palette_holes(counts, labels, flagged_t, k, cfg)
        if palette:
            extra["palette_holes"] = palette
            scores_t = readout.scores_follow_flags(scores_t, flagged_t, labels,
                                                   [int(c) for c in palette.get("added_per_class", {})])
    if cfg.out_of_frame_band > 0 and images is not None:
        flagged_t, framing = readout.flag_out_of_frame(images, labels, flagged_t, cfg)
        if framing:
            extra["out_of_frame"] = framing
            scores_t = readout.scores_follow_flags(scores_t, flagged_t, labels,
                                                   [int(c) for c in framing["added_per_class"]])
    flagged_classes = torch.bincount(labels[flagged_t], minlength=k) > 0
    if cfg.flag_ranked_scores and cfg.residual_ranked_scores and qt.is_many_target(flagged_classes, k):
        pixels, pixel_agreement = pixel_content()  # (only in a many-target attack: the pixels are not read otherwise)
        ranks, extra_ranks = readout.residual_ranks(pixels, labels, flagged_t, k, cfg, pixel_agreement)
        if extra_ranks:
            extra["residual_ranked_scores"] = extra_ranks
        if ranks is not None:  # an unflagged sample ranks by its probability or its trigger residual, the higher
            scores_t = torch.where(flagged_t, scores_t, torch.maximum(scores_t, ranks.to(scores_t.dtype)))
    if cfg.flag_ranked_scores:  # the class shares that set the unflagged samples' floor, for run.json
        scores_t, share = readout.flag_ranked_scores(scores_t, flagged_t, labels, k)
        extra["flag_ranked_scores"] = {"class_share": [round(float(x), 4) for x in share]}
    extra["quarantine_ambiguity"] = {str(c): v for c, v in ambiguity.items()}
    if withdrawn:  # said in the summary too: a scan that flags nothing after withdrawing is not a clean bill
        extra["flags_withdrawn"] = ", ".join(_withdrawn_text(c, ambiguity[c]) for c in withdrawn)
    kept_relabelled = [c for c, v in ambiguity.items() if v.get("flags_look_relabelled")]
    if kept_relabelled:  # ... and so is a quarantine kept against the ambiguity rule
        extra["flags_kept_relabelled"] = ", ".join(
            f"class {c} ({_unseparated_text(ambiguity[c])}; the flags look like images relabelled from every other "
            "class)" for c in kept_relabelled)
    return scores_t, flagged_t


def _baseline_result(method: str, bcfg: baselines.BaselineConfig, model, data: DeviceData, k: int,
                     device: torch.device, epochs: list[dict], extra: dict, t_start: float) -> ScanResult:
    """Scores and flags of a baseline detector from the trained K-way model."""
    labels = data.labels
    if method == "loss":
        scores, flagged = baselines.loss_ranking(predict(model, data), labels, bcfg.poison_rate)
    else:
        features = predict(model, data, embed=True)
        if method == "ss":
            scores, flagged = baselines.spectral_signature(features, labels, k, bcfg.poison_rate)
        else:
            scores, flagged = baselines.activation_clustering(features, labels, k, dims=bcfg.ac_dims,
                                                              size_threshold=bcfg.ac_size_threshold)
    if device.type == "cuda":
        extra["peak_device_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return ScanResult(scores=scores.cpu().numpy().astype(np.float32), flagged=flagged.cpu().numpy(),
                      pre_quarantine=np.zeros(data.num_samples, dtype=bool), epochs=epochs, model=model.cpu().eval(),
                      device=str(device), seconds=time.perf_counter() - t_start, extra=extra)
