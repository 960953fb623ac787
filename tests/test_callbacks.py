"""The callbacks change the lr exactly as specified, smooth and plot curves, draw activation maps without
leaving hooks behind, and write their pictures where the run's files and loggers are."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image
import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from matplotlib.figure import Figure
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ActivationMaps, EpochLRSchedule, ReduceLROnPlateauCallback, SmoothedCurves, save_and_log_figure
from datamodules import DigitsDataModule
from lightning_modules import CNNClassifier

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Scripted(pl.LightningModule):
    """Logs preset epoch values (``values[key][epoch]``, the last one repeating) and records the lr per epoch."""

    def __init__(self, train: dict | None = None, val: dict | None = None, lr: float = 0.1) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.train_values = train if train is not None else {"train/loss": [1.0]}
        self.val_values = val if val is not None else {"val/loss": [1.0]}
        self.lr = lr
        self.lrs: list[float] = []

    def _log_values(self, values: dict[str, list[float]]) -> None:
        for key, seq in values.items():
            self.log(key, seq[min(self.current_epoch, len(seq) - 1)], on_step=False, on_epoch=True, sync_dist=True)

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        self._log_values(self.train_values)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self._log_values(self.val_values)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)


def make_trainer(tmp_path: Path, callbacks: list, max_epochs: int, **kwargs) -> pl.Trainer:
    options = dict(
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    return quiet_trainer(tmp_path, callbacks=callbacks, **{**options, **kwargs})


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    assert matplotlib.image.imread(path).ndim == 3


def read_csv_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---- ReduceLROnPlateauCallback -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # constant val/loss: epoch 0 sets the best, epochs 1-2 are bad -> cut after epoch 2, then every 2
        ({}, [0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]),
        # one cooldown epoch after each cut is not counted
        ({"cooldown": 1}, [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]),
        # never below min_lr; at min_lr no further cut
        ({"min_lr": 0.03}, [0.1, 0.1, 0.1, 0.05, 0.05, 0.03, 0.03, 0.03]),
    ],
)
def test_plateau_cuts_after_patience(tmp_path, kwargs, expected):
    model = Scripted(val={"val/loss": [1.0]})
    callback = ReduceLROnPlateauCallback(patience=2, factor=0.5, min_delta=0.0, verbose=False, **kwargs)
    make_trainer(tmp_path, [callback], max_epochs=len(expected)).fit(model)
    assert model.lrs == pytest.approx(expected)


def test_plateau_improvement_resets_and_auto_mode(tmp_path):
    # val/acc (auto -> max) improves, then stalls from epoch 3 on: bad epochs 4, 5 -> cut after epoch 5
    model = Scripted(val={"val/acc": [0.1, 0.2, 0.3, 0.4, 0.4, 0.35]}, lr=1.0)
    callback = ReduceLROnPlateauCallback(monitor="val/acc", patience=2, verbose=False)
    trainer = make_trainer(tmp_path, [callback], max_epochs=7, num_sanity_val_steps=1)  # sanity check ignored
    trainer.fit(model)
    assert callback.mode == "max"
    assert model.lrs == pytest.approx([1.0] * 6 + [0.1])
    assert callback.num_reductions == 1
    assert trainer.callback_metrics["lr"].item() == pytest.approx(0.1)  # the lr is logged as `lr`


def test_plateau_min_delta(tmp_path):
    # improvements of 0.01 are below min_delta=0.05: bad epochs 1, 2 -> cut after epoch 2
    model = Scripted(val={"val/loss": [1.0, 0.99, 0.98, 0.97]})
    callback = ReduceLROnPlateauCallback(patience=2, min_delta=0.05, verbose=False)
    make_trainer(tmp_path, [callback], max_epochs=4).fit(model)
    assert model.lrs == pytest.approx([0.1, 0.1, 0.1, 0.01])


def test_plateau_missing_monitor_names_available_keys(tmp_path):
    callback = ReduceLROnPlateauCallback(monitor="val/nope")
    with pytest.raises(RuntimeError, match=r"val/nope.*val/loss"):
        make_trainer(tmp_path, [callback], max_epochs=1).fit(Scripted())


@pytest.mark.parametrize(
    "kwargs", [{"factor": 1.0}, {"factor": 0.0}, {"patience": -1}, {"mode": "up"}, {"min_lr": -1.0}]
)
def test_plateau_rejects_bad_args(kwargs):
    with pytest.raises(ValueError):
        ReduceLROnPlateauCallback(**kwargs)


def test_plateau_state_dict_round_trip():
    callback = ReduceLROnPlateauCallback(patience=3)
    callback.best, callback.wait, callback.cooldown_counter, callback.num_reductions = 0.5, 2, 1, 4
    restored = ReduceLROnPlateauCallback(patience=3)
    restored.load_state_dict(callback.state_dict())
    assert (
        restored.state_dict()
        == callback.state_dict()
        == {"best": 0.5, "wait": 2, "cooldown_counter": 1, "num_reductions": 4}
    )


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resumed_run_continues_lr_counting(tmp_path):
    """3 epochs, checkpoint, resume to 8: the same lrs as one uninterrupted 8-epoch run."""

    def callbacks():
        return [
            ReduceLROnPlateauCallback(patience=2, factor=0.5, min_delta=0.0, verbose=False),
            EpochLRSchedule(milestones=[4], factors=[0.1], verbose=False),
        ]

    full = Scripted()
    make_trainer(tmp_path / "full", callbacks(), max_epochs=8).fit(full)

    first = Scripted()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path / "a", [*callbacks(), checkpoint], max_epochs=3, enable_checkpointing=True).fit(first)
    second = Scripted()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path / "b", [*callbacks(), checkpoint], max_epochs=8, enable_checkpointing=True)
    trainer.fit(second, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert first.lrs + second.lrs == pytest.approx(full.lrs)
    assert full.lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.005, 0.0025, 0.0025, 0.00125])


# ---- EpochLRSchedule -------------------------------------------------------------------------------------
def test_epoch_schedule_sets_base_times_factor(tmp_path):
    model = Scripted(lr=0.1)
    callback = EpochLRSchedule(milestones=[1, 3], factors=[0.1, 0.01], verbose=False)
    make_trainer(tmp_path, [callback], max_epochs=5).fit(model)
    assert model.lrs == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001])
    assert callback.base_lrs == [0.1]
    assert callback.current_factor == 0.01
    assert callback.factor_at(0) == 1.0 and callback.factor_at(2) == 0.1 and callback.factor_at(100) == 0.01


def test_epoch_schedule_keeps_plateau_cut(tmp_path):
    # plateau cut (x0.5) after epoch 2; the milestone at epoch 4 multiplies by 0.01 / 0.1 and keeps it
    model = Scripted(val={"val/loss": [3.0, 2.0, 2.0, 1.0, 0.5, 0.25]}, lr=0.1)
    callbacks = [
        EpochLRSchedule(milestones=[1, 4], factors=[0.1, 0.01], verbose=False),
        ReduceLROnPlateauCallback(patience=1, factor=0.5, min_delta=0.0, verbose=False),
    ]
    make_trainer(tmp_path, callbacks, max_epochs=6).fit(model)
    assert model.lrs == pytest.approx([0.1, 0.01, 0.01, 0.005, 0.0005, 0.0005])


@pytest.mark.parametrize(
    ("milestones", "factors", "match"),
    [
        ([80, 120], [0.1], "one factor per milestone"),
        ([120, 80], [0.1, 0.01], "strictly increasing"),
        ([80, 80], [0.1, 0.01], "strictly increasing"),
        ([80], [0.0], "> 0"),
        ([], [], "at least one"),
    ],
)
def test_epoch_schedule_rejects_bad_args(milestones, factors, match):
    with pytest.raises(ValueError, match=match):
        EpochLRSchedule(milestones=milestones, factors=factors)


# ---- SmoothedCurves --------------------------------------------------------------------------------------
def test_smoothed_curves_values_and_figure(tmp_path):
    acc = [0.1, 0.5, 0.3, 0.9]
    loss = [2.0, 1.0, 1.5, 0.5]
    model = Scripted(train={"train/loss": loss}, val={"val/acc": acc, "val/loss": loss[::-1]})
    callback = SmoothedCurves(factor=0.8)
    logger = CSVLogger(tmp_path)
    make_trainer(tmp_path, [callback], max_epochs=4, logger=logger).fit(model)

    hand = [0.1, 0.8 * 0.1 + 0.2 * 0.5]
    hand.append(0.8 * hand[-1] + 0.2 * 0.3)
    hand.append(0.8 * hand[-1] + 0.2 * 0.9)
    assert callback.smoothed["val/acc"] == pytest.approx(hand, rel=1e-6)
    assert callback.smoothed["train/loss"] == pytest.approx([2.0, 1.8, 1.74, 1.492], rel=1e-6)
    assert set(callback.history) == {"train/loss", "val/acc", "val/loss"}
    assert callback.epochs["val/acc"] == [0, 1, 2, 3]

    logged = [float(row["val/acc_ema"]) for row in read_csv_metrics(logger) if row.get("val/acc_ema")]
    assert logged == pytest.approx(hand, rel=1e-6)
    assert_png(Path(logger.log_dir) / "curves.png")


def test_smoothed_curves_sparse_validation_and_resume(tmp_path):
    model = Scripted(train={"train/loss": [4.0, 3.0, 2.0, 1.0]}, val={"val/loss": [10.0, 20.0, 30.0, 40.0]})
    callback = SmoothedCurves(factor=0.5, keys=["train/loss", "val/loss"])
    make_trainer(tmp_path, [callback], max_epochs=4, check_val_every_n_epoch=2).fit(model)
    assert callback.epochs["train/loss"] == [0, 1, 2, 3]
    assert callback.epochs["val/loss"] == [1, 3]  # no stale repeats in epochs without validation
    assert callback.smoothed["val/loss"] == pytest.approx([20.0, 30.0])

    restored = SmoothedCurves(factor=0.5, keys=["train/loss", "val/loss"])
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history and restored.smoothed == callback.smoothed
    assert_png(tmp_path / "curves.png")  # no logger: the run folder is default_root_dir


def test_smoothed_curves_without_validation(tmp_path):
    model = Scripted(train={"train/loss": [1.0, 0.5, 0.25], "train/acc": [0.2, 0.4, 0.8]})
    callback = SmoothedCurves()
    make_trainer(tmp_path, [callback], max_epochs=3, limit_val_batches=0).fit(model)
    assert set(callback.history) == {"train/loss", "train/acc"}
    assert_png(tmp_path / "curves.png")


def test_smoothed_curves_rejects_bad_factor():
    with pytest.raises(ValueError, match="factor"):
        SmoothedCurves(factor=1.0)


# ---- ActivationMaps --------------------------------------------------------------------------------------
def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_activation_maps_for_every_conv(tmp_path):
    model = CNNClassifier(filters=(4, 8))
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    callback = ActivationMaps(every_n_epochs=2, max_channels=6)
    trainer = make_trainer(tmp_path, [callback], max_epochs=3, limit_train_batches=2)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))

    assert callback._sample.dtype == torch.float32 and callback._sample.shape == (1, 1, 28, 28)
    assert callback._sample.min() >= 0.0 and callback._sample.max() <= 1.0  # normalised by the datamodule
    written = sorted(p.name for p in (tmp_path / "activations").iterdir())
    assert written == sorted(f"{name}_epoch001.png" for name in convs)  # epochs 0 and 2 are skipped
    for name in written:
        assert_png(tmp_path / "activations" / name)
    assert no_hooks(model)
    assert model.training


def test_activation_maps_remove_hooks_when_forward_fails():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(), Boom())
    model[1].eval()  # a module in eval mode on purpose stays so
    with pytest.raises(RuntimeError, match="boom"):
        ActivationMaps().feature_maps(model, torch.rand(1, 1, 8, 8), ["0"])
    assert no_hooks(model)
    assert model.training and model[0].training and not model[1].training


def test_activation_maps_unknown_layer(tmp_path):
    model = CNNClassifier(filters=(4, 8))
    with pytest.raises(ValueError, match=r"net\.nope.*net\.0\.0"):
        ActivationMaps(layers=["net.nope"]).resolve_layers(model)
    trainer = make_trainer(tmp_path, [ActivationMaps(layers=["net.nope"])], max_epochs=1)
    with pytest.raises(ValueError, match=r"net\.nope"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))


def test_activation_maps_named_layer_grid(tmp_path):
    out = torch.arange(2 * 5 * 3 * 3, dtype=torch.float32).reshape(2, 5, 3, 3)
    grid = ActivationMaps(num_images=2, max_channels=4, min_map_size=6).grid(out)
    assert grid.shape == (3, 2 * 6 + 3 * 2, 4 * 6 + 5 * 2)  # a row per sample, maps enlarged 3 -> 6
    assert grid.min() >= 0 and grid.max() <= 1


def test_activation_maps_without_convs_warns(tmp_path):
    with pytest.warns(UserWarning, match="no nn.Conv2d"):
        make_trainer(tmp_path, [ActivationMaps()], max_epochs=1).fit(Scripted())
    assert not (tmp_path / "activations").exists()


# ---- images helper ---------------------------------------------------------------------------------------
def test_save_and_log_figure_to_run_dir_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [], max_epochs=1, logger=[tensorboard, csv_logger])
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    path = save_and_log_figure(trainer, fig, "plots/line", step=3)
    grid = torch.rand(3, 10, 12)
    tensor_path = save_and_log_figure(trainer, grid, "grid")

    assert path == Path(tensorboard.log_dir) / "plots" / "line.png"
    assert_png(path)
    assert_png(tensor_path)
    assert Image.open(tensor_path).size == (12, 10)
    tensorboard.experiment.flush()
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert {"plots/line", "grid"} <= set(events.Tags()["images"])
    assert events.Images("plots/line")[0].step == 3


def test_save_and_log_figure_wandb_and_non_zero_rank(tmp_path, monkeypatch):
    calls = []

    class RecordingWandb(WandbLogger):  # records instead of starting a W&B run
        def log_image(self, key, images, step=None, **kwargs):
            calls.append((key, images, step))

    trainer = make_trainer(tmp_path, [], max_epochs=1, logger=RecordingWandb(offline=True, save_dir=str(tmp_path)))
    path = save_and_log_figure(trainer, torch.rand(1, 4, 5), "maps/x", tag="maps")
    assert path == tmp_path / "maps" / "x.png"
    ((key, images, step),) = calls
    assert key == "maps" and step == 0 and images[0].shape == (4, 5, 3)

    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    assert save_and_log_figure(trainer, Figure(), "other") is None
    assert not (tmp_path / "other.png").exists() and len(calls) == 1


def test_save_and_log_figure_writes_nothing_under_fast_dev_run(tmp_path):
    """fast_dev_run has no loggers, so the run folder would be the working directory: the picture is drawn only."""
    drawn = []

    class Spy(Figure):
        def draw(self, renderer):
            drawn.append(True)
            return super().draw(renderer)

    trainer = make_trainer(tmp_path, [], max_epochs=1, fast_dev_run=1)
    assert save_and_log_figure(trainer, Spy(), "curves") is None
    assert drawn and list(tmp_path.iterdir()) == []
