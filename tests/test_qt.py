"""The algorithm's pieces on hand-made tensors where the right answer is known."""

from __future__ import annotations

import torch

from qtclean import qt
from qtclean.models import build_model, widen_head


def test_pre_quarantine_takes_lowest_losses_sized_by_largest_class():
    labels = torch.tensor([0] * 20 + [1] * 10)
    losses = torch.arange(30, dtype=torch.float32).flip(0)  # sample 29 has the lowest loss
    mask = qt.select_pre_quarantine(losses, labels, 2, fraction=0.1)
    assert mask.nonzero().flatten().tolist() == [28, 29]  # 10 % of 20 = 2


def test_soft_target_loss_is_minimised_at_the_soft_target():
    labels = torch.tensor([1])
    eps = torch.tensor([0.3])
    best = torch.log(torch.tensor([[1e-9, 0.7, 1e-9, 0.3]]))
    worse = torch.log(torch.tensor([[1e-9, 0.3, 1e-9, 0.7]]))
    assert qt.soft_target_loss(best, labels, eps, 2) < qt.soft_target_loss(worse, labels, eps, 2)


def test_score_and_flag():
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0])
    score = qt.quarantine_probability(logits, labels, 2)
    assert score[0] > 0.9 and score[1] < 0.01
    assert qt.is_quarantined(logits, labels, 2).tolist() == [True, False]


def test_otsu_separates_two_modes_and_reports_no_mode_for_constant():
    v = torch.cat([torch.full((50,), -3.0), torch.full((30,), 4.0)])
    thr, sep = qt.otsu_threshold(v)
    assert -3 < thr < 4 and sep > 0.99
    assert qt.otsu_threshold(torch.zeros(10))[1] == 0.0


def _logits_for(q_prob: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Logits whose quarantine probability is q_prob (rest of the mass on the source class)."""
    logits = torch.full((len(labels), 2 * k), -20.0)
    logits[torch.arange(len(labels)), labels] = torch.log(1 - q_prob)
    logits[torch.arange(len(labels)), labels + k] = torch.log(q_prob)
    return logits


def test_release_split_keeps_the_upper_mode_of_a_swallowed_class():
    # class 0: 60 samples, all predicted quarantined: 20 strongly (poison-like), 40 weakly
    labels = torch.zeros(60, dtype=torch.long)
    q = torch.cat([torch.full((20,), 0.999), torch.full((40,), 0.6)])
    logits = _logits_for(q, labels, 2)
    eps = torch.full((60,), 0.5)
    pre = torch.zeros(60, dtype=torch.bool)
    split_cfg = qt.QTConfig(release="split", min_pre_share=0, min_seed_share=0)
    new, stats = qt.update_eps(eps, epoch=1, logits=logits, labels=labels, pre_mask=pre, num_classes=2, cfg=split_cfg)
    assert stats["releases"][0]["rule"] == "split"
    assert torch.all(new[:20] == 0.6) and torch.all(new[20:] == split_cfg.eps_min)
    paper = qt.QTConfig(release="all", min_pre_share=0, min_seed_share=0)
    new, stats = qt.update_eps(eps, epoch=1, logits=logits, labels=labels, pre_mask=pre, num_classes=2, cfg=paper)
    assert torch.all(new == paper.eps_min)


def test_dynamic_phase_raises_quarantined_and_pins_pre_quarantine():
    labels = torch.tensor([0, 0, 1, 1])
    logits = _logits_for(torch.tensor([0.8, 0.2, 0.2, 0.2]), labels, 2)
    eps = torch.tensor([0.4, 0.4, 0.4, 0.4])
    pre = torch.tensor([False, False, False, True])
    cfg = qt.QTConfig(min_pre_share=0, min_seed_share=0)
    new, stats = qt.update_eps(eps, epoch=1, logits=logits, labels=labels, pre_mask=pre, num_classes=2, cfg=cfg)
    assert torch.allclose(new, torch.tensor([0.5, 0.4, 0.4, 0.9]))
    assert stats["quarantined_per_class"] == [1, 0]
    # after the dynamic epochs: quarantined to eps_max, the rest decay by a step towards eps_min
    new, _ = qt.update_eps(eps, epoch=cfg.epochs_dynamic + 1, logits=logits, labels=labels, pre_mask=pre,
                           num_classes=2, cfg=cfg)
    assert torch.allclose(new, torch.tensor([0.9, 0.3, 0.3, 0.3]))


def test_only_classes_seeded_by_the_pre_quarantine_set_get_a_quarantine():
    labels = torch.tensor([0, 0, 1, 1])
    logits = _logits_for(torch.tensor([0.8, 0.2, 0.8, 0.2]), labels, 2)  # one quarantined in each class
    pre = torch.tensor([True, False, False, False])  # the pre-quarantine set lies in class 0 only
    new, stats = qt.update_eps(torch.full((4,), 0.4), epoch=1, logits=logits, labels=labels, pre_mask=pre,
                               num_classes=2, cfg=qt.QTConfig())
    assert stats["quarantined_per_class"] == [1, 0]
    assert torch.allclose(new, torch.tensor([0.9, 0.4, 0.4, 0.4]))


def test_widen_head_copies_and_biases_down():
    model = build_model("cnn", 1, 3)
    x = torch.randn(4, 1, 16, 16)
    model.eval()
    before = model(x)
    widen_head(model, 3, quarantine_bias=4.0)
    after = model(x)
    assert after.shape == (4, 6)
    assert torch.allclose(after[:, :3], before, atol=1e-5)
    assert torch.allclose(after[:, 3:], before - 4.0, atol=1e-5)


def test_stability_counts_only_after_the_dynamic_epochs_and_without_releases():
    cfg = qt.QTConfig(epochs_dynamic=6, early_stop_tolerance=0.01)
    n = 1000
    assert not qt.is_stable(epoch=6, changed=0, num_samples=n, released=False, cfg=cfg)  # eps still being raised
    assert not qt.is_stable(epoch=9, changed=0, num_samples=n, released=True, cfg=cfg)
    assert qt.is_stable(epoch=9, changed=10, num_samples=n, released=False, cfg=cfg)  # 1 % of 1,000 may change
    assert not qt.is_stable(epoch=9, changed=11, num_samples=n, released=False, cfg=cfg)


def test_a_class_needs_a_share_of_its_own_samples_in_the_seed():
    labels = torch.tensor([0] * 100 + [1] * 100)
    pre = torch.zeros(200, dtype=torch.bool)
    pre[:3] = True      # 3 % of class 0
    pre[100:101] = True  # 1 outlier of class 1: 25 % of the pre-quarantine set, but 1 % of its class
    seeded = qt.seeded_classes(labels, pre, 2, qt.QTConfig(min_pre_share=0.05, min_seed_share=0.02))
    assert seeded.tolist() == [True, False]
    assert qt.seeded_classes(labels, pre, 2, qt.QTConfig(min_pre_share=0, min_seed_share=0)).tolist() == [True, True]
    assert not qt.seeded_classes(labels, torch.zeros(200, dtype=torch.bool), 2, qt.QTConfig()).any()
