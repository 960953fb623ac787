"""Trend-divergence stopping: fires where the train/val trends part, not on noise; restores the best epoch."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from callbacks.trend_stopping import TrendDivergenceStopping, trend_t_statistic


def scripted_curves(epochs: int = 40, turn: int = 12, noise: float = 0.01, seed: int = 0):
    """Train loss falls all along; val loss falls until ``turn``, then rises (overfitting), plus noise."""
    g = torch.Generator().manual_seed(seed)
    train = [0.8 * 0.93**e + noise / 2 * float(torch.randn((), generator=g)) for e in range(epochs)]
    val = [0.5 + 0.002 * (e - turn) ** 2 + noise * float(torch.randn((), generator=g)) for e in range(epochs)]
    return train, val


def run_rule(train, val, **kwargs) -> TrendDivergenceStopping:
    rule = TrendDivergenceStopping(**kwargs)
    for epoch, (t, v) in enumerate(zip(train, val, strict=True)):
        if rule.update(epoch, t, v):
            rule.stopped_epoch = epoch
            break
    return rule


def test_t_statistic_signs():
    assert trend_t_statistic([1, 2, 3, 4]) == math.inf
    assert trend_t_statistic([4.0, 3.1, 1.9, 1.0, 0.1]) < -10
    assert trend_t_statistic([1.0, 1.0, 1.0]) == 0.0
    assert trend_t_statistic([1.0, 2.0]) == 0.0


def test_fires_shortly_after_the_validation_curve_turns():
    rule = run_rule(*scripted_curves(turn=12))
    assert rule.stopped_epoch is not None and 15 <= rule.stopped_epoch <= 22
    assert 10 <= rule.best_epoch <= 15  # the smoothed val minimum: where the trends parted
    assert rule.divergence_epoch <= rule.stopped_epoch


def test_mode_max_for_accuracies():
    train, val = scripted_curves(turn=12)
    rule = run_rule([-t for t in train], [-v for v in val], mode="max")
    assert rule.stopped_epoch is not None and 15 <= rule.stopped_epoch <= 22


def test_noisy_flat_curves_never_fire():
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        train = (0.3 + 0.05 * torch.randn(60, generator=g)).tolist()
        val = (0.4 + 0.05 * torch.randn(60, generator=g)).tolist()
        assert run_rule(train, val).stopped_epoch is None, f"fired on flat noise (seed {seed})"


def test_both_curves_worsening_or_both_improving_is_not_divergence():
    rising = [0.1 * e for e in range(30)]
    falling = [3.0 - 0.1 * e for e in range(30)]
    assert run_rule(rising, rising).stopped_epoch is None  # an optimisation problem, not overfitting
    assert run_rule(falling, falling).stopped_epoch is None  # still learning


class ScriptedModule(pl.LightningModule):
    """Logs the scripted train/val values of each epoch; its single weight records the epoch it was set in."""

    def __init__(self, train, val):
        super().__init__()
        self.train_values, self.val_values = train, val
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        self.log("train/loss", self.train_values[self.current_epoch], on_epoch=True, on_step=False)
        return (self.weight * batch[0]).sum() * 0

    def on_train_epoch_start(self):
        with torch.no_grad():
            self.weight.fill_(self.current_epoch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.val_values[self.current_epoch], on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_stops_the_trainer_and_restores_the_best_epoch_weights(tmp_path):
    train, val = scripted_curves(epochs=40, turn=12)
    module = ScriptedModule(train, val)
    loader = DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)
    callback = TrendDivergenceStopping()
    trainer = quiet_trainer(tmp_path, max_epochs=40, callbacks=[callback], num_sanity_val_steps=0)
    trainer.fit(module, loader, loader)
    assert callback.stopped_epoch is not None and trainer.current_epoch == callback.stopped_epoch + 1 < 40
    assert float(module.weight) == callback.best_epoch  # the best smoothed-val epoch's weights are back


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="at least 3"):
        TrendDivergenceStopping(window=2)
    with pytest.raises(ValueError, match="'min'"):
        TrendDivergenceStopping(mode="lower")
