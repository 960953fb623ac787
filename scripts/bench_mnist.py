"""The MNIST suite of ``scripts/benchmark.py``: the book MLP trained by each pipeline, timed per epoch.

Each ``run_*`` function trains ``epochs`` epochs on the IDX files in ``data_dir`` (the last ``len - val_size``
training images; the first ``val_size`` validate) and returns the seconds of each epoch (training + validation).
:data:`MNIST_RUNS` names them as the benchmark's table does; :func:`run_paired` follows each epoch of a Lightning
pipeline by one epoch of each plain loop. The pipelines are described in ``scripts/benchmark.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from bench_common import as_without_lightning, device, fit_config, synchronize
from PIL import Image
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision import transforms

PIPELINES = ("plain", "plain_template_kernels", "lightning_minimal", "template", "per_sample", "per_sample_lightning")
PAIRED_PIPELINES = ("lightning_minimal", "template")
BATCH = 128


def load_split(data_dir: Path, val_size: int) -> tuple[Tensor, ...]:
    """``(x_train, y_train, x_val, y_val)``: ``uint8`` images and labels as :class:`MNISTDataModule` reads them."""
    from datamodules import MNISTDataModule

    images, labels = MNISTDataModule(data_dir=str(data_dir)).load_split("train")
    return images[val_size:], labels[val_size:], images[:val_size], labels[:val_size]


def book_mlp(template_kernels: bool = False) -> nn.Module:
    """The book MLP in plain ``torch.nn`` layers, or with ``template_kernels`` the template's own ``MLP`` with the
    CPU dropout the CLI swaps in (:class:`~lifecycle.speedups.ThresholdDropout`, faster on the CPU)."""
    if template_kernels:
        from lifecycle.speedups import use_threshold_dropout
        from lightning_modules.mlp import MLP

        model = MLP(784, (256, 256), 10, dropout=0.45, act="relu")
        use_threshold_dropout(model)
        return model
    hidden = [nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.45), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.45)]
    return nn.Sequential(nn.Flatten(), *hidden, nn.Linear(256, 10))


# ---- plain loops ----------------------------------------------------------------------------------------------------


class PlainLoop:
    """The book MLP trained and validated by a hand-written loop, one epoch per :meth:`epoch` call; PyTorch's
    defaults, or with ``template_kernels`` the kernels the template's config picks (its dropout, fused Adam).

    ``batches_of(n)`` yields the training batches of one epoch over ``n`` images, on the device.
    """

    def __init__(
        self,
        batches_of: Callable[[int], Iterator[tuple[Tensor, Tensor]]],
        n_train: int,
        x_val: Tensor,
        y_val: Tensor,
        template_kernels: bool = False,
    ) -> None:
        self.batches_of, self.n_train, self.x_val, self.y_val = batches_of, n_train, x_val, y_val
        self.model = book_mlp(template_kernels).to(device())
        fused = True if template_kernels else None  # None: PyTorch's default choice
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, eps=1e-7, fused=fused)
        self.loss_fn = nn.CrossEntropyLoss()

    def epoch(self) -> float:
        """One training epoch and its validation; returns the seconds they took."""
        model, optimizer, x_val, y_val = self.model, self.optimizer, self.x_val, self.y_val
        with as_without_lightning():
            start = time.perf_counter()
            model.train()
            for x, y in self.batches_of(self.n_train):
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                correct = sum(
                    (model(x_val[i : i + BATCH]).argmax(1) == y_val[i : i + BATCH]).sum()
                    for i in range(0, len(x_val), BATCH)
                )
            float(correct)  # waits for the device
            return time.perf_counter() - start


def plain_loop(data_dir: Path, val_size: int, template_kernels: bool = False) -> PlainLoop:
    """The plain reference: batches cut from pre-normalised float tensors in the device's memory."""
    x_train, y_train, x_val, y_val = (t.to(device()) for t in load_split(data_dir, val_size))
    x_train, x_val = x_train.float() / 255, x_val.float() / 255

    def batches(n: int) -> Iterator[tuple[Tensor, Tensor]]:
        perm = torch.randperm(n, device=x_train.device)
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            yield x_train[idx], y_train[idx]

    return PlainLoop(batches, len(x_train), x_val, y_val, template_kernels)


def run_plain(data_dir: Path, val_size: int, epochs: int, template_kernels: bool = False) -> list[float]:
    loop = plain_loop(data_dir, val_size, template_kernels)
    return [loop.epoch() for _ in range(epochs)]


class PerSampleDataset(Dataset):
    """Images decoded per sample, the common torchvision path: uint8 array -> PIL image -> ToTensor -> Normalize."""

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images.squeeze(1).numpy(), labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[i], mode="L")), self.labels[i]


def per_sample_datasets(data_dir: Path, val_size: int) -> tuple[PerSampleDataset, PerSampleDataset]:
    """The training and validation sets, decoded per sample."""
    x_train, y_train, x_val, y_val = load_split(data_dir, val_size)
    return PerSampleDataset(x_train, y_train), PerSampleDataset(x_val, y_val)


def run_per_sample(data_dir: Path, val_size: int, epochs: int) -> list[float]:
    train, val = per_sample_datasets(data_dir, val_size)
    val_x = torch.stack([val[i][0] for i in range(len(val))])  # built once, outside the timing
    loader = DataLoader(train, batch_size=BATCH, shuffle=True)

    def batches(_n: int) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in loader:
            yield x.to(device(), non_blocking=True), y.to(device(), non_blocking=True)

    loop = PlainLoop(batches, len(train), val_x.to(device()), torch.tensor(val.labels, device=device()))
    return [loop.epoch() for _ in range(epochs)]


# ---- Lightning pipelines --------------------------------------------------------------------------------------------


class EpochTimer(Callback):
    """Times each training epoch (with its validation); with ``references``, each timed epoch is followed by one
    epoch of each of those loops, whose seconds go to :attr:`reference_seconds`."""

    def __init__(self, references: tuple[PlainLoop, ...] = ()) -> None:
        super().__init__()
        self.references = references
        self.seconds: list[float] = []
        self.reference_seconds: list[list[float]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize()  # Lightning 2: after the epoch's validation
        self.seconds.append(time.perf_counter() - self.start)
        if self.references:
            self.reference_seconds.append([reference.epoch() for reference in self.references])


class DeviceBatches:
    """Batches of ``BATCH`` rows cut from tensors already on the device, shuffled or in order: the plain loop's
    data path, as a loader Lightning can iterate."""

    def __init__(self, x: Tensor, y: Tensor, shuffle: bool) -> None:
        self.x, self.y, self.shuffle = x, y, shuffle

    def __len__(self) -> int:
        return -(-len(self.x) // BATCH)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, on = len(self.x), self.x.device
        order = torch.randperm(n, device=on) if self.shuffle else torch.arange(n, device=on)
        for i in range(0, len(self.x), BATCH):
            yield self.x[order[i : i + BATCH]], self.y[order[i : i + BATCH]]


class MinimalModule(pl.LightningModule):
    """The plain loop's model, loss and validation in a LightningModule with nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.net = book_mlp()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return (self.net(x).argmax(1) == y).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-7)


def run_lightning_minimal(data_dir: Path, val_size: int, epochs: int, timer: EpochTimer | None = None) -> list[float]:
    """Lightning's floor: the plain loop's model, data and validation in a minimal LightningModule (no metrics
    objects, no logging, no callbacks, no checkpoints)."""
    x_train, y_train, x_val, y_val = (t.to(device()) for t in load_split(data_dir, val_size))
    x_train, x_val = x_train.float() / 255, x_val.float() / 255
    timer = timer or EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(MinimalModule(), DeviceBatches(x_train, y_train, True), DeviceBatches(x_val, y_val, False))
    return timer.seconds


class PerStepLogging(pl.LightningModule):
    """A module in the style of lightning-hydra-template's MNIST module: torchmetrics accuracy and mean loss called
    and ``self.log``-ged at every step (epoch aggregation), ``ReduceLROnPlateau`` on the validation loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = book_mlp()
        self.train_acc, self.val_acc = MulticlassAccuracy(10), MulticlassAccuracy(10)
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        getattr(self, f"{stage}_loss")(loss)
        getattr(self, f"{stage}_acc")(logits.argmax(1), y)
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", getattr(self, f"{stage}_acc"), on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-7)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}


def run_per_sample_lightning(
    data_dir: Path, val_size: int, epochs: int, timer: EpochTimer | None = None
) -> list[float]:
    """The per-sample pipeline under Lightning: :class:`PerStepLogging`, checkpointing of the best model and early
    stopping."""
    train, val = per_sample_datasets(data_dir, val_size)
    timer = timer or EpochTimer()
    callbacks = [ModelCheckpoint(monitor="val/acc", mode="max"), EarlyStopping(monitor="val/loss"), timer]
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0, default_root_dir=os.getcwd(),
    )  # fmt: skip
    loaders = DataLoader(train, batch_size=BATCH, shuffle=True), DataLoader(val, batch_size=BATCH)
    trainer.fit(PerStepLogging(), *loaders)
    return timer.seconds


def run_template(data_dir: Path, val_size: int, epochs: int, timer: EpochTimer | None = None) -> list[float]:
    """``configs/mnist/mlp.yaml`` through the CLI."""
    timer = timer or EpochTimer()
    fit_config(
        "configs/mnist/mlp.yaml", timer, "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.val_size", str(val_size), "--trainer.max_epochs", str(epochs),
    )  # fmt: skip
    return timer.seconds


MNIST_RUNS = {
    "plain": run_plain,
    "plain_template_kernels": lambda data_dir, val_size, epochs: run_plain(data_dir, val_size, epochs, True),
    "lightning_minimal": run_lightning_minimal,
    "template": run_template,
    "per_sample": run_per_sample,
    "per_sample_lightning": run_per_sample_lightning,
}


def run_paired(pipeline: str, data_dir: Path, val_size: int, epochs: int) -> list[list[float]]:
    """``[pipeline seconds, plain seconds, plain_template_kernels seconds]`` for each epoch after the first of a
    Lightning pipeline, each epoch followed by one epoch of each plain loop in the same process."""
    timer = EpochTimer((plain_loop(data_dir, val_size), plain_loop(data_dir, val_size, template_kernels=True)))
    MNIST_RUNS[pipeline](data_dir, val_size, epochs, timer)
    pairs = [[mine, *plain] for mine, plain in zip(timer.seconds, timer.reference_seconds, strict=True)]
    return pairs[1:] or pairs
