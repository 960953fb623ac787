"""The fast MNIST recipe (configs/mnist/fast.yaml): batch augmentation on the device, a one-cycle learning rate stepped
every batch over exactly the run, BatchNorm, label smoothing; it learns, runs through the CLI and resumes exactly."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning import Callback
from torch import nn
from train import main

from lightning_modules.losses import task_loss

ROOT = Path(__file__).resolve().parents[1]
FAST = ROOT / "configs" / "mnist" / "fast.yaml"
# A narrower network than the recipe's [32, 64, 128] keeps the tests fast; everything else is the recipe's.
SMALL = ["--model.init_args.filters", "[8, 16, 16]"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--curves", "null"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ lands in the test's folder


def fast_args(mnist_dir: Path, *extra: str) -> list[str]:
    return ["-c", str(FAST), "--data.init_args.data_dir", str(mnist_dir), *SMALL, *QUIET, *extra]


class RecordLR(Callback):
    """The learning rate each training batch runs with, and the scheduler's interval."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class StopAt(Callback):
    """Stop the run inside an epoch once ``step`` optimiser steps are done (as a killed or preempted job would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` -> ``(N, 2)`` ink-weighted mean (row, column) in pixels."""
    h, w = images.shape[-2:]
    mass = images.sum((1, 2, 3))
    rows = (images.sum((1, 3)) * torch.arange(h)).sum(1) / mass
    cols = (images.sum((1, 2)) * torch.arange(w)).sum(1) / mass
    return torch.stack([rows, cols], 1)


def test_the_recipe_builds_a_batchnorm_cnn_with_label_smoothing():
    cli = main(["-c", str(FAST)], run=False)
    model, data = cli.model, cli.datamodule
    convs = [m for m in model.net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 3 and all(c.bias is None for c in convs)  # the BN's shift is the bias
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    assert model.hparams.label_smoothing == 0.1 and data.hparams.val_size == 0


def test_label_smoothing_is_torchs_and_only_in_the_training_loss():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 10), torch.randint(0, 10, (16,))
    smoothed = task_loss(logits, target, "multiclass", label_smoothing=0.1)
    assert smoothed == pytest.approx(float(nn.CrossEntropyLoss(label_smoothing=0.1)(logits, target)), rel=1e-6)
    one_hot = torch.nn.functional.one_hot(target, 10).float()  # soft rows give the same loss
    assert task_loss(logits, one_hot, "multiclass", label_smoothing=0.1) == pytest.approx(float(smoothed), rel=1e-5)
    # A confident right answer costs more with smoothing: the loss keeps some mass on the other classes.
    sure = torch.full((1, 10), -20.0).index_fill_(1, torch.tensor([3]), 20.0)
    assert task_loss(sure, torch.tensor([3]), "multiclass", label_smoothing=0.1) > 1.0
    assert task_loss(sure, torch.tensor([3]), "multiclass") < 1e-6
    cli = main(["-c", str(FAST)], run=False)
    model = cli.model
    assert model.compute_loss(logits, target) == pytest.approx(float(nn.functional.cross_entropy(logits, target)))
    with pytest.raises(ValueError, match=r"label_smoothing=0\.1 applies to multiclass tasks only"):
        task_loss(logits[:, :1], target.clamp(max=1).float(), "binary", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing=1.0: choose a value in \[0, 1\)"):
        main(["-c", str(FAST), "--model.init_args.label_smoothing", "1.0"], run=False)


def test_the_batch_augmentation_moves_training_images_keeps_labels_and_is_off_at_eval(mnist_dir):
    cli = main(fast_args(mnist_dir), run=False)
    data = cli.datamodule
    data.setup("fit")
    images, labels = data.train_set.images[:128], data.train_set.targets[:128]
    data.trainer = SimpleNamespace(training=False)  # validation, test and predict batches
    evaluated, eval_labels = data.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(evaluated, images.float() / 255) and torch.equal(eval_labels, labels)
    data.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    trained, train_labels = data.on_after_batch_transfer((images, labels), 0)
    assert trained.shape == evaluated.shape == (128, 1, 28, 28) and trained.dtype == torch.float32
    assert torch.equal(train_labels, labels)
    # Every image is warped, each by its own draw: the ink's centre moves by different amounts, within the ranges
    # (shifts of at most 10 % = 2.8 px, plus what a 10 degree rotation and a 10 % zoom move off-centre ink).
    moved = (centre_of_mass(trained) - centre_of_mass(evaluated)).norm(dim=1)
    assert (moved > 0.05).float().mean() > 0.9 and moved.std() > 0.3
    assert moved.max() < 6.0
    assert trained.min() >= 0 and trained.max() <= 1  # zero fill: the background stays background


def test_one_cycle_lr_steps_every_batch_over_exactly_the_run(mnist_dir):
    epochs, batch_size = 2, 32  # 256 generated training images: 8 batches an epoch
    record = RecordLR()
    cli = main(
        [
            "fit",
            *fast_args(mnist_dir, "--trainer.max_epochs", str(epochs)),
            "--data.init_args.batch_size",
            str(batch_size),
        ],
        callbacks=[record],
    )
    steps = epochs * math.ceil(256 / batch_size)
    assert cli.trainer.lr_scheduler_configs[0].interval == "step"
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and scheduler.total_steps == steps
    # The same schedule built by hand: the lr after N steps is OneCycleLR's value for step N.
    reference_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_opt, max_lr=0.01, total_steps=steps, pct_start=0.25)
    expected = []
    for _ in range(steps):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        reference.step()
    assert record.lrs == pytest.approx(expected, rel=1e-6)
    assert max(record.lrs) == pytest.approx(0.01, rel=0.05)  # warmed up to max_lr ...
    assert record.lrs[-1] == pytest.approx(0.01 / 25 / 1e4, rel=1e-3)  # ... and down to its floor at the last batch


def test_a_short_fit_on_generated_mnist_lowers_the_loss(mnist_dir):
    # The generated digits are horizontal bars two rows apart, so the recipe's vertical shifts, rotations and zooms
    # would change their class: here the augmentation shifts sideways only.
    no_vertical = ["--data.init_args.augment.init_args.height_shift_range", "0"]
    no_vertical += ["--data.init_args.augment.init_args.rotation_range", "0"]
    no_vertical += ["--data.init_args.augment.init_args.zoom_range", "0"]
    cli = main(
        ["fit", *fast_args(mnist_dir, "--trainer.max_epochs", "4", "--data.init_args.batch_size", "32", *no_vertical)]
    )
    metrics = cli.trainer.callback_metrics
    assert metrics["test/loss"] < 0.5 * math.log(10)  # from about ln 10 at the start
    assert metrics["test/acc"] > 0.8


def test_fast_dev_run_through_the_cli(mnist_dir):
    cli = main(["fit", *fast_args(mnist_dir, "--trainer.fast_dev_run", "true")])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["test/loss"])  # test_after_fit ran


def test_resume_from_last_ckpt_finishes_the_uninterrupted_run(mnist_dir, tmp_path, monkeypatch):
    args = ["fit", *fast_args(mnist_dir, "--trainer.max_epochs", "3", "--trainer.deterministic", "true")]
    reference = main(args)
    stopped_dir = tmp_path / "stopped"
    stopped_dir.mkdir()
    monkeypatch.chdir(stopped_dir)
    main(args, callbacks=[StopAt(3)])  # inside epoch 1 (2 batches of 128 an epoch)
    last = stopped_dir / "runs" / "mnist_fast" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = main([*args, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == reference.trainer.global_step == 6
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.total_steps == 6
    for name, weight in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), f"{name} differs from the uninterrupted run"


def test_lightnings_weight_averaging_can_copy_a_cli_built_model(mnist_dir):
    # LightningCLI's optimiser/scheduler factories hold a lock; EMAWeightAveraging deep-copies the model, which used
    # to fail with "cannot pickle '_thread.lock' object". The copy now shares the factories.
    ema = ["--trainer.callbacks+=pytorch_lightning.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay", "0.5"]
    cli = main(["fit", *fast_args(mnist_dir, "--trainer.max_epochs", "3", *ema)])
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.callback_metrics["test/loss"])
    twin = copy.deepcopy(cli.model)
    assert twin.optimizer_factory is cli.model.optimizer_factory
    assert twin.scheduler_factory is cli.model.scheduler_factory
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), cli.model.parameters(), strict=True))
    assert next(twin.parameters()).data_ptr() != next(cli.model.parameters()).data_ptr()
