"""Losses: CE label formats, balanced CE from training frequencies, focal loss (multi-class and binary)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torchvision.ops import sigmoid_focal_loss

from datamodules import DigitsDataModule
from lightning_modules import MLPClassifier
from lightning_modules.losses import (
    balanced_class_weights,
    focal_loss_binary,
    focal_loss_multiclass,
    task_loss,
    training_class_counts,
)


def test_focal_with_gamma_0_and_no_alpha_is_cross_entropy():
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    ce = F.cross_entropy(logits, target)
    assert torch.allclose(task_loss(logits, target, "multiclass", loss="focal", alpha=None, gamma=0), ce)
    one_hot = F.one_hot(target, 5).float()
    assert torch.allclose(task_loss(logits, one_hot, "multiclass", loss="focal", alpha=None, gamma=0), ce)
    b_logits, b_target = torch.randn(16, 1), torch.randint(0, 2, (16,))
    bce = F.binary_cross_entropy_with_logits(b_logits[:, 0], b_target.float())
    assert torch.allclose(task_loss(b_logits, b_target, "binary", loss="focal", alpha=None, gamma=0), bce)


def test_focal_matches_the_formula_and_torchvision():
    logits, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    p_t = logits.softmax(-1).gather(1, target[:, None])[:, 0]
    expected = -0.25 * (1 - p_t) ** 2 * p_t.log()
    assert torch.allclose(focal_loss_multiclass(logits, target, 0.25, 2.0), expected, atol=1e-6)
    b_logits, b_target = torch.randn(8), torch.randint(0, 2, (8,)).float()
    assert torch.allclose(focal_loss_binary(b_logits, b_target), sigmoid_focal_loss(b_logits, b_target))


@pytest.mark.parametrize("task", ["multiclass", "binary"])
def test_focal_down_weights_easy_examples(task):
    # An easy sample (p_true = 0.95) and a hard one (p_true = 0.3): focal shrinks the easy one far more.
    if task == "multiclass":
        easy, hard = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[-0.5, 0.3, 0.0]])
        target = torch.tensor([0])
    else:
        easy, hard, target = torch.tensor([[3.0]]), torch.tensor([[-0.85]]), torch.tensor([1])
    ratio = {}
    for name, logits in (("easy", easy), ("hard", hard)):
        ce = task_loss(logits, target, task)
        focal = task_loss(logits, target, task, loss="focal", alpha=None, gamma=2.0)
        ratio[name] = float(focal / ce)
    assert ratio["easy"] < 0.01 and ratio["hard"] > 0.3
    assert ratio["easy"] < ratio["hard"] / 30


@pytest.mark.parametrize("task", ["multiclass", "binary"])
def test_focal_gradients_finite_at_saturated_probabilities(task):
    values = [[60.0, -60.0], [-60.0, 60.0]] if task == "multiclass" else [[60.0], [-60.0]]
    logits = torch.tensor(values, requires_grad=True)
    target = torch.tensor([0, 0]) if task == "multiclass" else torch.tensor([1, 1])  # p_t -> 1 and p_t -> 0
    loss = task_loss(logits, target, task, loss="focal")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0  # the hard (p_t -> 0) sample still pushes


def test_balanced_weights_from_counts():
    weights = balanced_class_weights([90, 10])
    assert torch.allclose(weights, torch.tensor([100 / 180, 100 / 20]))
    assert torch.allclose(balanced_class_weights([5, 5, 5]), torch.ones(3))
    assert balanced_class_weights([4, 0, 4])[1] == 0
    with pytest.raises(ValueError, match="count per class"):
        balanced_class_weights([3])


def test_balanced_ce_is_a_class_weighted_mean():
    logits, target = torch.randn(6, 3), torch.tensor([0, 0, 0, 0, 1, 2])
    weights = torch.tensor([0.5, 2.0, 2.0])
    per_sample = F.cross_entropy(logits, target, reduction="none")
    expected = (per_sample * weights[target]).mean()
    assert torch.allclose(task_loss(logits, target, "multiclass", loss="balanced_ce", class_weights=weights), expected)
    one_hot = F.one_hot(target, 3).float()
    assert torch.allclose(task_loss(logits, one_hot, "multiclass", loss="balanced_ce", class_weights=weights), expected)
    b_logits, b_target = torch.randn(4, 1), torch.tensor([0, 1, 1, 1])
    b_terms = F.binary_cross_entropy_with_logits(b_logits[:, 0], b_target.float(), reduction="none")
    b_expected = (b_terms * torch.tensor([3.0, 1.0, 1.0, 1.0])).mean()
    b_loss = task_loss(b_logits, b_target, "binary", loss="balanced_ce", class_weights=torch.tensor([3.0, 1.0]))
    assert torch.allclose(b_loss, b_expected)


def test_bad_loss_options_are_explained():
    with pytest.raises(ValueError, match="choose one of"):
        MLPClassifier(loss="hinge", hidden_units=(16,))
    with pytest.raises(ValueError, match="regression"):
        MLPClassifier(task="regression", loss="focal", hidden_units=(16,))
    with pytest.raises(ValueError, match="needs 10"):
        MLPClassifier(loss="balanced_ce", class_weights=[1.0, 2.0], hidden_units=(16,))
    with pytest.raises(ValueError, match="class_counts"):
        training_class_counts(object(), 10)


def test_balanced_ce_weights_come_from_the_training_split(tmp_path):
    data = DigitsDataModule(batch_size=64)
    model = MLPClassifier(loss="balanced_ce", hidden_units=(32,))
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    counts = torch.bincount(data.train_set.targets, minlength=10).float()
    assert torch.allclose(model.loss_class_weights, counts.sum() / (10 * counts))
    # The weights are in the checkpoint: a restored module weighs its loss as in training.
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    restored = MLPClassifier.load_from_checkpoint(path, weights_only=False)  # hparams hold a class
    assert torch.allclose(restored.loss_class_weights, model.loss_class_weights)


def test_default_loss_keeps_checkpoint_keys_unchanged():
    assert "loss_class_weights" not in MLPClassifier(hidden_units=(16,)).state_dict()
    focal = MLPClassifier(loss="focal", hidden_units=(16,)).eval()
    assert "loss_class_weights" not in focal.state_dict()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(focal.compute_loss(focal(x), y), focal_loss_multiclass(focal(x), y).mean())
