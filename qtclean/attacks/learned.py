"""Attacks whose trigger is a trained network: IAB and ISSBA, trained here on the data being poisoned.

Nothing can be downloaded, so each trigger network is trained on the user's own (clean) images, then frozen and
used to poison samples, as a data-poisoning attacker would (the original IAB also controls the victim's training;
here it only supplies poisoned samples). Both work on any (C, H, W): every layer keeps the image size.

- ``iab`` (Nguyen & Tran 2020, "Input-Aware Dynamic Backdoor Attack"): a generator makes a pattern and a mask for
  each input, ``x' = (1 - m) x + m p``. As in the paper, a mask generator is trained first (diversity loss plus a
  density penalty, density 0.032), then the pattern generator is trained jointly with a classifier on clean,
  backdoor (label -> target) and cross samples (another input's trigger, label kept) with the diversity loss
  ``|x1 - x2| / |g(x1) - g(x2)|``, so triggers differ per input and one input's trigger does not work on another.
  Adapted: small dilated-conv generators instead of the encoder-decoders; the classifier is qtclean's CNN; a fixed
  number of Adam steps on up to 4,096 images. The poisoned set holds backdoor samples only, as backdoor-toolbox
  (the toolkit the QT paper made its poisoned sets with) writes it: cross samples are part of the attacker's own
  training, which a data poisoner does not control.
  Measured (3 draws, 20k Fashion-MNIST): with as many cross samples written as cover samples (labels kept), a
  plainly trained model's attack success rate was 33-94 %; without them 95-99 %.
- ``issba`` (Li et al. 2021, "Invisible Backdoor Attack with Sample-Specific Triggers"): a StegaStamp-style encoder
  hides a bit string in the image as a small residual and a decoder reads it back; poisoned samples carry the
  attacker's fixed string, so each gets its own invisible residual. Adapted: 32 bits (not 100) for 28-32 px images,
  a small dilated-conv encoder and conv decoder trained with bit cross-entropy plus a ramped L2 penalty on the
  residual, rounding to uint8 inside training (straight-through) so the code survives the saved PNG; no LPIPS or
  critic loss (they need pretrained networks).

A trained trigger is saved as safetensors beside the poisoned copy (``DIR.trigger.safetensors``), so the same
trigger can poison a test set (``qtclean poison ... --trigger FILE``). The same seed trains the same trigger only
with the same torch thread count (float sums run in another order): ISSBA draw 2 of the 20k benchmark set, built
with 1 thread instead of 2, has another target-class pixel group (485 members, not 719). To reproduce a poisoned
set elsewhere, pass its saved trigger file; the benchmarks in docs/benchmarks.md ran with 2 threads.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import outputs
from ..errors import InputError
from ..models import build_model

LEARNED_ATTACKS = ("iab", "issba")
MASK_DENSITY = 0.032  # IAB's published mask density
CODE_BITS = 32


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU())


class SmallUNet(nn.Module):
    """Two stride-2 levels down, back up with skips: any image size in, the same size out, ~5 MMAC at 28x28."""

    def __init__(self, c_in: int, c_out: int, width: int = 16):
        super().__init__()
        self.down0, self.down1 = _conv(c_in, width), _conv(width, 2 * width, 2)
        self.down2 = nn.Sequential(_conv(2 * width, 2 * width, 2), _conv(2 * width, 2 * width))
        self.up1, self.up0 = _conv(4 * width, 2 * width), _conv(3 * width, width)
        self.out = nn.Conv2d(width, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.down0(x)
        h1 = self.down1(h0)
        h2 = F.interpolate(self.down2(h1), size=h1.shape[2:], mode="nearest")
        u1 = F.interpolate(self.up1(torch.cat([h1, h2], 1)), size=h0.shape[2:], mode="nearest")
        return self.out(self.up0(torch.cat([h0, u1], 1)))


class TriggerGenerator(nn.Module):
    """IAB: a per-input pattern (C channels, [0, 1]) and mask (1 channel, [0, 1])."""

    def __init__(self, channels: int):
        super().__init__()
        self.pattern_net, self.mask_net = SmallUNet(channels, channels), SmallUNet(channels, 1)

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.pattern_net(x))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Soft. The authors' code thresholds it to near 0/1 (tanh(20 m - 10)); measured here (3 draws, 20k
        Fashion-MNIST), that lowered the attack success rate from 95-99 % to 88-91 %."""
        return torch.sigmoid(self.mask_net(x))


class StegaEncoder(nn.Module):
    """ISSBA: the residual that hides ``bits`` in ``x``; the code enters as an extra image plane."""

    def __init__(self, channels: int, height: int, width: int, bits: int = CODE_BITS):
        super().__init__()
        self.shape = (height, width)
        self.code = nn.Linear(bits, height * width)
        self.net = SmallUNet(channels + 1, channels)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        plane = self.code(bits * 2 - 1).view(-1, 1, *self.shape)
        return torch.tanh(self.net(torch.cat([x, plane], dim=1)))


class StegaDecoder(nn.Module):
    """Reads the bits back: two stride-2 convolutions, then dense layers over the whole map (position matters)."""

    def __init__(self, channels: int, height: int, width: int, bits: int = CODE_BITS):
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, 32, 2), _conv(32, 64, 2))
        cells = ((height + 1) // 2 + 1) // 2 * (((width + 1) // 2 + 1) // 2)
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(64 * cells, 256), nn.ReLU(), nn.Linear(256, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.conv(x))


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).float() / 255


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _round_through(x: torch.Tensor) -> torch.Tensor:
    """uint8 rounding in the forward pass, identity in the backward pass (the saved images are uint8)."""
    q = (x.clamp(0, 1) * 255).round() / 255
    return x + (q - x).detach()


@dataclass
class LearnedTrigger:
    """A trained trigger network for ``attack`` on images of ``shape`` (C, H, W); apply with :meth:`apply`."""

    attack: str
    shape: tuple[int, int, int]
    net: nn.Module
    secret: torch.Tensor | None = None  # ISSBA: the attacker's bit string
    info: dict = field(default_factory=dict)  # training figures (bit accuracy, PSNR, mask density)

    @torch.no_grad()
    def apply(self, images: np.ndarray, chunk: int = 512) -> np.ndarray:
        """``images`` (N, C, H, W) uint8, each with its own trigger."""
        self.check_shape(images)
        out = np.empty_like(images)
        for start in range(0, len(images), chunk):
            x = _to_float(images[start:start + chunk])
            out[start:start + chunk] = _to_uint8(self._triggered(x))
        return out

    def _triggered(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        if self.attack == "iab":
            m = self.net.mask(x)
            return (1 - m) * x + m * self.net.pattern(x)
        bits = self.secret.expand(len(x), -1)
        return x + self.net(x, bits)

    def check_shape(self, images: np.ndarray) -> None:
        """InputError unless ``images`` have the (C, H, W) this trigger was trained on."""
        if tuple(images.shape[1:]) != self.shape:
            raise InputError(f"the {self.attack} trigger was trained on {self.shape[0]}x{self.shape[1]}x"
                             f"{self.shape[2]} images, this dataset has {'x'.join(map(str, images.shape[1:]))}: "
                             "train a trigger on images of this size (omit --trigger)")

    def save(self, path: str | os.PathLike) -> None:
        """Atomic safetensors file: the network's weights, the secret, and the attack, shape and info as metadata."""
        tensors = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        if self.secret is not None:
            tensors["secret"] = self.secret.contiguous()
        meta = {"attack": self.attack, "shape": json.dumps(list(self.shape)), "info": json.dumps(self.info)}
        outputs.write_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LearnedTrigger":
        """Read a trigger written by :meth:`save` (safetensors: tensors only, nothing executed)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"--trigger {path}: no such file; give the DIR.trigger.safetensors that `qtclean "
                             "poison` wrote beside a poisoned copy")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            attack, shape = meta["attack"], tuple(json.loads(meta["shape"]))
            if attack not in LEARNED_ATTACKS:
                raise ValueError(f"unknown trigger kind {attack!r}")
            if (len(shape) != 3 or not all(isinstance(v, int) for v in shape) or shape[0] not in (1, 3, 4)
                    or not all(2 <= v <= 4096 for v in shape[1:])):  # checked before any network is built
                raise ValueError(f"implausible image shape {shape}")
            secret = tensors.pop("secret", None)
            if attack == "issba":
                if secret is None or tuple(secret.shape) != (1, CODE_BITS) or not bool(
                        ((secret == 0) | (secret == 1)).all()):
                    raise ValueError(f"an issba trigger needs its {CODE_BITS}-bit secret of 0s and 1s")
                secret = secret.float()
            info = json.loads(meta.get("info", "{}"))
            if not isinstance(info, dict):
                raise ValueError("its info is not a JSON object")
            with torch.device("meta"):  # no memory until the file's tensors, checked against it, are assigned
                net = _new_net(attack, shape)
            net.load_state_dict(tensors, strict=True, assign=True)
            if any(p.is_meta for p in net.parameters()):
                raise ValueError("some weights are missing")
        except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as exc:
            raise InputError(f"--trigger {path}: not a trigger file written by `qtclean poison` ({exc}); "
                             "give the DIR.trigger.safetensors written beside a poisoned copy") from None
        return cls(attack=attack, shape=shape, net=net.float(), secret=secret, info=info)


def _new_net(attack: str, shape: tuple[int, int, int]) -> nn.Module:
    c, h, w = shape
    if attack == "iab":
        return TriggerGenerator(c)
    return _StegaPair(c, h, w)  # one state dict for both halves; only the encoder poisons


class _StegaPair(nn.Module):
    def __init__(self, c: int, h: int, w: int):
        super().__init__()
        self.encoder, self.decoder = StegaEncoder(c, h, w), StegaDecoder(c, h, w)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, bits)


def _training_images(images: np.ndarray, rng: np.random.Generator, limit: int = 4096) -> torch.Tensor:
    rows = rng.choice(len(images), size=min(limit, len(images)), replace=False)
    return _to_float(images[np.sort(rows)])


@contextlib.contextmanager
def _seeded_torch(seed: int):
    """Seed torch for a trigger's training without moving the caller's global RNG (a scan after it is unchanged)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=gen)


def train_iab(images: np.ndarray, labels: np.ndarray, num_classes: int, *, target: int, seed: int = 0,
              mask_steps: int = 200, steps: int = 600, batch: int = 128) -> LearnedTrigger:
    """Train IAB's mask generator, then its pattern generator jointly with a classifier (see module doc)."""
    with _seeded_torch(seed):
        return _train_iab(images, labels, num_classes, target, seed, mask_steps, steps, batch)


def _train_iab(images, labels, num_classes, target, seed, mask_steps, steps, batch) -> LearnedTrigger:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(images), size=min(4096, len(images)), replace=False)
    x_all, y_all = _to_float(images[rows]), torch.from_numpy(labels[rows].astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    net = TriggerGenerator(images.shape[1])

    def diversity(a: torch.Tensor, b: torch.Tensor, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
        d_in = ((a - b).flatten(1).pow(2).mean(1) + 1e-8).sqrt()
        d_out = ((out_a - out_b).flatten(1).pow(2).mean(1) + 1e-8).sqrt()
        return (d_in / (d_out + 1e-3)).mean()

    mask_params = list(net.mask_net.parameters())
    opt = torch.optim.Adam(mask_params, lr=1e-3)
    for idx in _batches(len(x_all), 32, mask_steps, gen):
        x = x_all[idx]
        x2 = x[torch.roll(torch.arange(len(x)), 1)]
        m, m2 = net.mask(x), net.mask(x2)
        loss = diversity(x, x2, m, m2) + 100 * F.relu(m.mean() - MASK_DENSITY)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in mask_params:
        p.requires_grad_(False)

    classifier = build_model("cnn", images.shape[1], num_classes)
    opt = torch.optim.Adam([*net.pattern_net.parameters(), *classifier.parameters()], lr=1e-3)
    k = max(1, batch // 10)  # the paper's p_attack = p_cross = 0.1 of each batch
    for idx in _batches(len(x_all), batch, steps, gen):
        x, y = x_all[idx], y_all[idx]
        a, b = x[:2 * k], x[torch.roll(torch.arange(2 * k), 1)]  # triggered inputs and the donors of cross triggers
        with torch.no_grad():
            m, m2 = net.mask(a), net.mask(b)
        p, p2 = net.pattern(a), net.pattern(b)
        backdoor = (1 - m[:k]) * a[:k] + m[:k] * p[:k]
        cross = (1 - m2[k:]) * a[k:] + m2[k:] * p2[k:]
        inputs = torch.cat([backdoor, cross, x[2 * k:]])
        targets = torch.cat([torch.full((k,), target), y[k:]])
        classifier.train()
        loss = F.cross_entropy(classifier(inputs), targets) + diversity(a, b, p, p2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        density = float(net.mask(x_all[:512]).mean())
    return LearnedTrigger("iab", tuple(images.shape[1:]), net, info={"mask_density": round(density, 4)})


def train_issba(images: np.ndarray, *, seed: int = 0, steps: int = 500, batch: int = 64,
                l2_weight: float = 30.0) -> LearnedTrigger:
    """Train the encoder/decoder on random codes, then fix the attacker's code (see module doc).

    StegaStamp's schedule: the code is learned first with no image loss (the residual is then loud), the L2
    penalty ramps in over the middle 40 % of the steps and holds for the rest. Measured on Fashion-MNIST (4,096
    images, 500 steps): bit accuracy 0.998, PSNR 27.7 dB (ISSBA reports ~27 dB on CIFAR-10)."""
    with _seeded_torch(seed):
        return _train_issba(images, seed, steps, batch, l2_weight)


def _train_issba(images: np.ndarray, seed: int, steps: int, batch: int, l2_weight: float) -> LearnedTrigger:
    rng = np.random.default_rng(seed)
    x_all = _training_images(images, rng)
    gen = torch.Generator().manual_seed(seed)
    c, h, w = images.shape[1:]
    net = _StegaPair(c, h, w)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step, idx in enumerate(_batches(len(x_all), batch, steps, gen)):
        x = x_all[idx]
        bits = torch.randint(0, 2, (len(x), CODE_BITS), generator=gen).float()
        stego = _round_through(x + net.encoder(x, bits))
        ramp = min(1.0, max(0.0, (step - 0.4 * steps) / (0.4 * steps)))
        image_loss = (stego - x).pow(2).mean()
        loss = F.binary_cross_entropy_with_logits(net.decoder(stego), bits) + ramp * l2_weight * image_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    secret = torch.from_numpy(rng.integers(0, 2, size=(1, CODE_BITS))).float()
    trigger = LearnedTrigger("issba", (c, h, w), net, secret=secret)
    sample = images[:256]
    stego = trigger.apply(sample)
    with torch.no_grad():
        decoded = net.decoder(_to_float(stego)) > 0
    mse = float(((stego.astype(np.float64) - sample) ** 2).mean())
    trigger.info = {"bit_accuracy": round(float((decoded == secret.bool()).float().mean()), 4),
                    "psnr_db": round(float(10 * np.log10(255 ** 2 / max(mse, 1e-9))), 2)}
    return trigger


def train_trigger(attack: str, images: np.ndarray, labels: np.ndarray, num_classes: int, *, target: int,
                  seed: int = 0, **steps) -> LearnedTrigger:
    """Train the trigger network of a learned attack on the (clean) ``images``."""
    if attack == "iab":
        return train_iab(images, labels, num_classes, target=target, seed=seed, **steps)
    if attack == "issba":
        return train_issba(images, seed=seed, **steps)
    raise ValueError(f"{attack!r} is not a learned attack ({', '.join(LEARNED_ATTACKS)})")
