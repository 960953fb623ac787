"""The CIFAR-10 suite of ``scripts/benchmark.py``: ResNet20 v1 training (and its data path alone), in images/s.

Each entry of :data:`CIFAR_RUNS` takes the folder holding fake ``cifar-10-batches-py`` pickles and a number of
timed steps (after :data:`CIFAR_WARMUP` warm-up steps) and returns training images per second; :func:`run_cifar`
runs one with torchvision's md5 check relaxed for the fake files. The pipelines are described in
``scripts/benchmark.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from bench_common import as_without_lightning, device, fit_config, synchronize
from pytorch_lightning.callbacks import Callback
from torch import nn

from datamodules import CIFAR10DataModule
from datamodules.augment import BatchAugment, SampleAugment
from datamodules.synthetic import cifar10_md5_ignored

CIFAR_PIPELINES = ("plain", "template", "loader", "loader_albumentations")
CIFAR_BATCH = 32
CIFAR_WARMUP = 5
CIFAR_VAL_SIZE = 100


def book_augment() -> BatchAugment:
    """The book's augmentation: shifts of up to 10% of the width and height, horizontal flips."""
    return BatchAugment(width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True)


def cifar_datamodule(data_dir: Path, sample_augment: bool = False) -> CIFAR10DataModule:
    """The recipe's datamodule, set up for ``fit``: batch augmentation, or the per-sample albumentations path."""
    dm = CIFAR10DataModule(
        data_dir=str(data_dir),
        val_size=CIFAR_VAL_SIZE,
        batch_size=CIFAR_BATCH,
        normalize="per_pixel_mean",
        augment=None if sample_augment else book_augment(),
        sample_augment=SampleAugment("book") if sample_augment else None,
    )
    dm.setup("fit")
    return dm


def cifar_plain(data_dir: Path, steps: int) -> float:
    """A hand-written loop: the same network, loss, L2 penalty, Adam and augmentation over ``uint8`` images in the
    device's memory (per-pixel mean subtraction per batch)."""
    from lightning_modules.resnet import ResNetClassifier

    images, labels = (t.to(device()) for t in cifar_datamodule(data_dir).load_split("train"))
    mean = images.double().mean(0).float() / 255
    model = ResNetClassifier(version=1, depth=20, l2=1e-4, num_classes=10, input_shape=(3, 32, 32)).to(device())
    net = model.net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    augment = book_augment()
    loss_fn = nn.CrossEntropyLoss()
    perm = torch.randperm(len(images), device=images.device)
    start = 0.0
    with as_without_lightning():
        for step in range(CIFAR_WARMUP + steps):
            if step == CIFAR_WARMUP:
                synchronize()
                start = time.perf_counter()
            idx = perm[(step * CIFAR_BATCH) % len(perm) :][:CIFAR_BATCH]
            x = augment(images[idx].float() / 255 - mean)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), labels[idx]) + model.regularization_loss()
            loss.backward()
            optimizer.step()
        synchronize()
    return steps * CIFAR_BATCH / (time.perf_counter() - start)


class StepTimer(Callback):
    """Clocks the ``steps`` training steps that follow the first :data:`CIFAR_WARMUP` ones."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.start = self.end = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == CIFAR_WARMUP:
            synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == CIFAR_WARMUP + self.steps - 1:
            synchronize()
            self.end = time.perf_counter()


def cifar_template(data_dir: Path, steps: int) -> float:
    """``configs/cifar10/resnet20_v1.yaml`` through the CLI: every callback of the recipe, logging, metrics and
    checkpointing."""
    timer = StepTimer(steps)
    fit_config(
        "configs/cifar10/resnet20_v1.yaml", timer, "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.val_size", str(CIFAR_VAL_SIZE), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", str(CIFAR_WARMUP + steps), "--trainer.limit_val_batches", "0",
    )  # fmt: skip
    return steps * CIFAR_BATCH / (timer.end - timer.start)


def loader_trainer() -> pl.Trainer:
    """A trainer that only places the data: one device (this benchmark's), no sharding of the training set, in the
    training stage (so that the datamodule augments its batches)."""
    trainer = pl.Trainer(
        accelerator=device().type, devices=1, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.training = True
    return trainer


def cifar_loader(data_dir: Path, steps: int, sample_augment: bool = False) -> float:
    """The template's training data path without a model: ``train_dataloader`` + ``on_after_batch_transfer``."""
    dm = cifar_datamodule(data_dir, sample_augment)
    dm.trainer = loader_trainer()
    batches = iter(dm.train_dataloader())
    count, start = 0, 0.0
    for step in range(CIFAR_WARMUP + steps):
        if step == CIFAR_WARMUP:
            synchronize()
            start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(dm.train_dataloader())
            batch = next(batches)
        x, _ = dm.on_after_batch_transfer([t.to(device(), non_blocking=True) for t in batch], 0)
        count += len(x) if step >= CIFAR_WARMUP else 0
    synchronize()
    return count / (time.perf_counter() - start)


CIFAR_RUNS = {
    "plain": cifar_plain,
    "template": cifar_template,
    "loader": cifar_loader,
    "loader_albumentations": lambda data_dir, steps: cifar_loader(data_dir, steps, sample_augment=True),
}


def run_cifar(pipeline: str, data_dir: Path, steps: int) -> float:
    """Images per second of one pipeline; the fake pickles cannot match CIFAR-10's md5 sums, so only their
    existence is checked meanwhile."""
    with cifar10_md5_ignored():
        return CIFAR_RUNS[pipeline](data_dir, steps)
