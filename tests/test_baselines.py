"""Baselines (majority class, mean predictor, naive forecasts), their configs through the CLI, confusion matrices."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer, write_cifar10
from train import main

from callbacks.confusion import ConfusionMatrix
from datamodules import DigitsDataModule
from datamodules.tabular import DiabetesDataModule
from lightning_modules.baseline import (
    BaselineModule,
    average_forecast,
    exponential_smoothing_forecast,
    moving_average_forecast,
    naive_forecast,
)

ROOT = Path(__file__).resolve().parents[1]
NEW_CONFIGS = [
    *sorted((ROOT / "configs" / "baselines").glob("*.yaml")),
    *sorted((ROOT / "configs" / "tabular").glob("*.yaml")),
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_majority_class_gives_the_exact_majority_accuracy(tmp_path):
    data = DigitsDataModule(batch_size=100)
    model = BaselineModule()
    confusion = ConfusionMatrix(normalize="none")
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[confusion])
    trainer.fit(model, datamodule=data)
    counts = torch.bincount(data.train_set.targets, minlength=10)
    majority = int(counts.argmax())
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    expected = float((data.test_set.targets == majority).float().mean())
    assert result["test/acc"] == pytest.approx(expected, abs=1e-6)
    # Its loss is the cross-entropy of the training class prior: what learning only the label counts gives.
    prior = counts.float() / counts.sum()
    assert result["test/loss"] == pytest.approx(float(-prior.log()[data.test_set.targets].mean()), rel=1e-4)
    # The confusion matrix: every test image predicted as the majority class, one full column.
    matrix = confusion.last_matrix
    assert matrix.sum() == len(data.test_set) and matrix[:, majority].sum() == len(data.test_set)
    assert (tmp_path / "confusion" / "test.png").is_file() and (tmp_path / "confusion" / "val.png").is_file()


def test_mean_predictor_and_its_mae(tmp_path):
    data = DiabetesDataModule()
    model = BaselineModule(task="regression", num_classes=1, input_shape=(10,))
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data)
    mean = data.train_set.targets.mean()
    # Validation (which Lightning runs before the epoch-end hook) already scores the fitted mean.
    val_mae = float((data.val_set.targets - mean).abs().mean())
    assert float(trainer.callback_metrics["val/mae"]) == pytest.approx(val_mae, rel=1e-4)
    trainer = quiet_trainer(tmp_path, max_epochs=2)  # a second epoch must not double-count
    trainer.fit(model, datamodule=data)
    assert float(model.constant) == pytest.approx(float(mean), rel=1e-5)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    assert result["test/mae"] == pytest.approx(float((data.test_set.targets - mean).abs().mean()), rel=1e-4)


def test_binary_baseline_predicts_the_prior_logit():
    model = BaselineModule(task="binary")
    model.fit_constant(torch.tensor([30.0, 10.0]))
    assert float(model.constant) == pytest.approx(math.log(10 / 30))
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 1)


def test_naive_forecast_family():
    series = torch.tensor([1.0, 3.0, 2.0, 6.0])
    assert torch.equal(naive_forecast(series), series)
    assert torch.allclose(average_forecast(series), torch.tensor([1.0, 2.0, 2.0, 3.0]))
    assert torch.allclose(moving_average_forecast(series, 2), torch.tensor([1.0, 2.0, 2.5, 4.0]))
    assert torch.allclose(exponential_smoothing_forecast(series, 0.5), torch.tensor([1.0, 2.0, 2.0, 4.0]))
    batch = torch.stack([series, 2 * series])  # forecasts act on the last dimension
    assert torch.allclose(moving_average_forecast(batch, 3)[1], 2 * moving_average_forecast(series, 3))
    with pytest.raises(ValueError, match="window"):
        moving_average_forecast(series, 0)


def test_diabetes_statistics_come_from_the_training_rows_only():
    data = DiabetesDataModule(val_size=0.25)
    data.setup("fit")
    assert torch.allclose(data.mean, data.train_set.features.mean(0))
    x, y = data.on_after_batch_transfer((data.val_set.features, data.val_set.targets), 0)
    assert torch.allclose(x, (data.val_set.features - data.mean) / data.std) and torch.equal(y, data.val_set.targets)
    assert len(data.train_set) + len(data.val_set) == len(data.fold_targets()) == 353
    assert len(data.test_set) == 89


@pytest.mark.parametrize("config", NEW_CONFIGS, ids=lambda p: p.stem)
def test_config_fast_dev_run(config, tmp_path, monkeypatch, mnist_dir):
    args = ["fit", "-c", str(config), "--trainer.fast_dev_run", "2"]
    if "mnist" in config.stem:
        args += ["--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64"]
    if "cifar10" in config.stem:
        from torchvision.datasets import cifar

        monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
        args += ["--data.init_args.data_dir", str(write_cifar10(tmp_path / "cifar")), "--data.init_args.val_size", "20"]
    cli = main(args)
    assert cli.trainer.state.finished
    key = "test/mae" if "diabetes" in config.stem else "test/acc"
    assert key in cli.trainer.callback_metrics and torch.isfinite(cli.trainer.callback_metrics[key])
