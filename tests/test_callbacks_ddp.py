"""The callbacks under DDP (two CPU processes, gloo, ``ddp_spawn``): no hang, one set of files, and the same lr
decision on every rank. Both tests are slow (``make test-all``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from test_callbacks import Scripted, assert_png, make_trainer, read_csv_metrics

from callbacks import ActivationMaps, EpochLRSchedule, ReduceLROnPlateauCallback, SmoothedCurves
from datamodules import DigitsDataModule
from lightning_modules import CNNClassifier


@pytest.fixture
def fresh_port(monkeypatch):
    """ddp_spawn exports MASTER_PORT in this process; a fresh port per test avoids reusing a closing one."""
    from lightning_fabric.plugins.environments.lightning import find_free_network_port

    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))


@pytest.mark.slow
def test_callbacks_under_ddp(tmp_path, fresh_port):
    """Two CPU processes (gloo): no hang, one set of files, the same lr cut on both ranks."""
    model = CNNClassifier(filters=(4,))
    logger = CSVLogger(tmp_path, version=0)  # else the main process numbers its own version after the workers
    callbacks = [
        ReduceLROnPlateauCallback(monitor="train/loss", mode="max", patience=1, check_on_train_epoch_end=True),
        EpochLRSchedule(milestones=[2], factors=[0.5]),
        SmoothedCurves(),
        ActivationMaps(),
    ]
    trainer = make_trainer(
        tmp_path, callbacks, max_epochs=3, strategy="ddp_spawn", devices=2, logger=logger, limit_train_batches=2
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    run = Path(logger.log_dir)
    assert_png(run / "curves.png")
    assert sorted(p.name for p in (run / "activations").iterdir()) == [f"net.0.0_epoch{e:03d}.png" for e in range(3)]
    lrs = [float(row["lr"]) for row in read_csv_metrics(logger) if row.get("lr")]
    assert len(lrs) == 3 and all(math.isfinite(lr) for lr in lrs)


class RankDependent(Scripted):
    """Unsynced on purpose: rank 0 sees a plateau of val/loss, rank 1 a steady improvement."""

    def validation_step(self, batch, batch_idx):
        value = 1.0 if self.global_rank == 0 else 1.0 / (self.current_epoch + 1)
        self.log("val/loss", value, on_step=False, on_epoch=True)


class AssertSameLR(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        lrs = trainer.strategy.all_gather(torch.tensor(trainer.optimizers[0].param_groups[0]["lr"]))
        assert torch.all(lrs == lrs[0]), f"processes disagree on the lr: {lrs.tolist()}"


@pytest.mark.slow
def test_plateau_decision_follows_rank_zero_under_ddp(tmp_path, fresh_port):
    logger = CSVLogger(tmp_path, version=0)
    callbacks = [ReduceLROnPlateauCallback(patience=1, factor=0.5, min_delta=0.0), AssertSameLR()]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=3, strategy="ddp_spawn", devices=2, logger=logger)
    trainer.fit(RankDependent())
    lrs = [float(row["lr"]) for row in read_csv_metrics(logger) if row.get("lr")]
    assert lrs == pytest.approx([0.1, 0.05, 0.025])  # rank 0's plateau decides for both
