"""Our experiments against plain PyTorch loops and per-sample pipelines, side by side, as Markdown tables.

    python scripts/benchmark.py                 # both suites, 5 alternating repetitions: medians and best runs
    python scripts/benchmark.py --suite cifar   # one suite (mnist | cifar)
    python scripts/benchmark.py --quick         # tiny data, one repetition: checks that it runs (CI)
    python scripts/benchmark.py --same-process  # every run in this one process (finer on a noisy machine)

**MNIST suite** (seconds per epoch).

Every pipeline trains the book MLP (784-256-256-10, dropout .45, Adam) for ``--epochs`` epochs on 55,000 training
and 5,000 validation images at batch 128 and reports its fastest epoch (training + validation) after the first, so
start-up, imports, one-off decoding and warm-up are excluded. Each measurement runs in a fresh process; the
pipelines alternate within each repetition so drifts of the machine hit all of them alike. The table gives the
median over repetitions and the fastest repetition: on a shared 2-core VM the same process can run 1.5x slower
from one launch to the next, and the fastest repetition is the one least disturbed. ``--same-process`` runs every
repetition in the benchmark's own process instead (the pipelines still alternate), so a change of the machine's
speed between process launches no longer lands on one pipeline only.

- ``plain``: a hand-written loop over pre-normalised float tensors already in memory, with PyTorch's defaults
  (``nn.Dropout``, ``torch.optim.Adam``): the floor a researcher writes.
- ``plain_template_kernels``: the same loop with the two kernels the template picks, its CPU dropout
  (``lightning_modules.layers.Dropout``) and fused Adam: against it, the template's ratio is the cost of Lightning
  and of the template's logging, metrics and callbacks alone.
- ``lightning_minimal``: the same model, data and validation in a minimal LightningModule run by a bare
  ``Trainer`` (no metric objects, logging, callbacks or checkpoints): Lightning's own per-step cost.
- ``template``: ``configs/mnist/mlp.yaml`` through the CLI, i.e. the real experiment: MNISTDataModule reading IDX
  files, torchmetrics, CSV + TensorBoard logging, checkpointing, early stopping and EMA curves (progress bar off).
- ``per_sample``: the common torchvision path: uint8 array -> PIL image -> ToTensor -> Normalize per sample, default
  collate, then the same plain loop.
- ``per_sample_lightning``: the same data path under Lightning, with a module in the style of
  lightning-hydra-template's MNIST module (torchmetrics accuracy and mean loss called and logged at every step,
  ``ReduceLROnPlateau``, best-model checkpointing and early stopping; no logger or progress bar): the kind of
  pipeline the issue's "per-sample" anchor is.

A second table pairs epochs instead of runs: each epoch of ``lightning_minimal`` and ``template`` is followed, in
the same process, by one epoch of each plain loop, and each ratio is the median over those pairs. On this VM, whose
speed drifts by tens of percent between launches and over minutes, it is the steadier of the two ratios.

The plain loops run as in a process without Lightning: importing Lightning makes ``torch.cuda.is_available()`` an
NVML probe that a GPU-less machine repeats at every optimiser step (0.3 ms), which the template switches off when
training starts and the minimal module, as Lightning ships, keeps.

Every pipeline trains on one GPU when there is one (clocks read after ``torch.cuda.synchronize()``), else on the CPU.
The data are random ``uint8`` images in MNIST's shape (speed does not depend on the pixels), written as IDX files
for the template; no download is needed.

**CIFAR-10 suite** (training images per second, ResNet20 v1, batch 32, the book's shift + flip augmentation).
Each pipeline trains ``--steps`` timed steps after a few warm-up steps, each in a fresh process:

- ``plain``: a hand-written loop with the same network, loss, L2 penalty, Adam and ``BatchAugment`` over a ``uint8``
  tensor in memory (per-pixel mean subtraction per batch).
- ``template``: ``configs/cifar10/resnet20_v1.yaml`` through the CLI (fake CIFAR-10 pickles in torchvision's
  layout): every callback of the recipe, logging, metrics and checkpointing.
- ``loader``: the template's training data path alone (batches + normalisation + augmentation, no model), the
  ceiling the data path puts on training speed.
- ``loader_albumentations``: the same with the per-sample albumentations path (``SampleAugment("book")``, in the
  main process) instead of the batch augmentation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("plain", "plain_template_kernels", "lightning_minimal", "template", "per_sample", "per_sample_lightning")
CIFAR_PIPELINES = ("plain", "template", "loader", "loader_albumentations")
BATCH = 128
CIFAR_BATCH = 32
CIFAR_WARMUP = 5


def make_data(n_train: int, n_test: int, directory: Path) -> Path:
    """MNIST-shaped random data as IDX files in torchvision's raw layout under ``directory``."""
    raw = directory / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            array = rng.integers(0, 256 if kind.startswith("images") else 10, shape, dtype=np.uint8)
            header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())
    return directory


def load_split(data_dir: Path, val_size: int) -> tuple[torch.Tensor, ...]:
    from datamodules import MNISTDataModule

    images, labels = MNISTDataModule(data_dir=str(data_dir)).load_split("train")
    return images[val_size:], labels[val_size:], images[:val_size], labels[:val_size]


def device() -> torch.device:
    """Where every pipeline trains: the GPU when there is one (as the configs' ``accelerator: auto``), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    """Wait for the GPU's queued work before reading a clock (nothing to wait for on the CPU)."""
    if device().type == "cuda":
        torch.cuda.synchronize()


def book_mlp(template_kernels: bool = False) -> nn.Module:
    """The book MLP in plain ``torch.nn`` layers, or with ``template_kernels`` the template's own ``MLP`` (its
    :class:`~lightning_modules.layers.Dropout`, faster on the CPU)."""
    if template_kernels:
        from lightning_modules.mlp import MLP

        return MLP(784, (256, 256), 10, dropout=0.45, act="relu")
    hidden = [nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.45), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.45)]
    return nn.Sequential(nn.Flatten(), *hidden, nn.Linear(256, 10))


@contextlib.contextmanager
def as_without_lightning():
    """Run a reference loop as in a process that never imported Lightning: Lightning's import switches
    ``torch.cuda.is_available()`` to an NVML probe that a GPU-less machine repeats at every optimiser step
    (:func:`~lightning_modules.base.use_runtime_cuda_check_without_gpu`), a cost plain PyTorch does not pay."""
    from lightning_modules.base import NVML_CUDA_CHECK, use_runtime_cuda_check_without_gpu

    previous = os.environ.get(NVML_CUDA_CHECK)
    use_runtime_cuda_check_without_gpu()
    try:
        yield
    finally:
        if previous is not None:
            os.environ[NVML_CUDA_CHECK] = previous


class PlainLoop:
    """The book MLP trained and validated by a hand-written loop, one epoch per :meth:`epoch` call; PyTorch's
    defaults, or with ``template_kernels`` the kernels the template's config picks (its dropout, fused Adam)."""

    def __init__(
        self, batches_of, n_train: int, x_val: torch.Tensor, y_val: torch.Tensor, template_kernels: bool = False
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

    def batches(n):
        perm = torch.randperm(n, device=x_train.device)
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            yield x_train[idx], y_train[idx]

    return PlainLoop(batches, len(x_train), x_val, y_val, template_kernels)


def run_plain(data_dir: Path, val_size: int, epochs: int, template_kernels: bool = False) -> list[float]:
    loop = plain_loop(data_dir, val_size, template_kernels)
    return [loop.epoch() for _ in range(epochs)]


def per_sample_datasets(data_dir: Path, val_size: int):
    """Training and validation sets decoded per sample: uint8 array -> PIL image -> ToTensor -> Normalize."""
    from PIL import Image
    from torch.utils.data import Dataset
    from torchvision import transforms

    x_train, y_train, x_val, y_val = load_split(data_dir, val_size)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])

    class PerSample(Dataset):
        def __init__(self, images, labels):
            self.images, self.labels = images.squeeze(1).numpy(), labels.tolist()

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(self.images[i], mode="L")), self.labels[i]

    return PerSample(x_train, y_train), PerSample(x_val, y_val)


def run_per_sample(data_dir: Path, val_size: int, epochs: int) -> list[float]:
    from torch.utils.data import DataLoader

    train, val = per_sample_datasets(data_dir, val_size)
    val_x = torch.stack([val[i][0] for i in range(len(val))])  # built once, outside the timing
    loader = DataLoader(train, batch_size=BATCH, shuffle=True)

    def batches(_n):
        for x, y in loader:
            yield x.to(device(), non_blocking=True), y.to(device(), non_blocking=True)

    loop = PlainLoop(batches, len(train), val_x.to(device()), torch.tensor(val.labels, device=device()))
    return [loop.epoch() for _ in range(epochs)]


def epoch_timer(references: tuple[PlainLoop, ...] = ()):
    """A Lightning callback timing each training epoch; with ``references``, each timed epoch is followed by one
    epoch of each of those loops (built here: Lightning is imported in the child only)."""
    from pytorch_lightning.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.reference_seconds: list[list[float]] = []

        def on_train_epoch_start(self, trainer, pl_module):
            synchronize()
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):  # Lightning 2: after the epoch's validation
            synchronize()
            self.seconds.append(time.perf_counter() - self.start)
            if references:
                self.reference_seconds.append([reference.epoch() for reference in references])

    return EpochTimer()


def run_lightning_minimal(data_dir: Path, val_size: int, epochs: int, timer=None) -> list[float]:
    """Lightning's floor: the plain loop's model, data and validation in a minimal LightningModule (no metrics
    objects, no logging, no callbacks, no checkpoints)."""
    import pytorch_lightning as pl

    x_train, y_train, x_val, y_val = (t.to(device()) for t in load_split(data_dir, val_size))
    x_train, x_val = x_train.float() / 255, x_val.float() / 255

    class Batches:
        def __init__(self, x, y, shuffle):
            self.x, self.y, self.shuffle = x, y, shuffle

        def __len__(self):
            return -(-len(self.x) // BATCH)

        def __iter__(self):
            n, on = len(self.x), self.x.device
            order = torch.randperm(n, device=on) if self.shuffle else torch.arange(n, device=on)
            for i in range(0, len(self.x), BATCH):
                yield self.x[order[i : i + BATCH]], self.y[order[i : i + BATCH]]

    class Minimal(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = book_mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            return (self.net(x).argmax(1) == y).sum()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-7)

    timer = timer or epoch_timer()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Minimal(), Batches(x_train, y_train, True), Batches(x_val, y_val, False))
    return timer.seconds


def run_per_sample_lightning(data_dir: Path, val_size: int, epochs: int, timer=None) -> list[float]:
    """The per-sample pipeline under Lightning, with a module in the style of lightning-hydra-template's MNIST
    module: torchmetrics accuracy and mean loss called and ``self.log``-ged at every step (epoch aggregation),
    ``ReduceLROnPlateau`` on the validation loss, checkpointing of the best model and early stopping."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from torch.utils.data import DataLoader
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    train, val = per_sample_datasets(data_dir, val_size)

    class PerStepLogging(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = book_mlp()
            self.train_acc, self.val_acc = MulticlassAccuracy(10), MulticlassAccuracy(10)
            self.train_loss, self.val_loss = MeanMetric(), MeanMetric()

        def _step(self, batch, stage):
            x, y = batch
            logits = self.net(x)
            loss = nn.functional.cross_entropy(logits, y)
            getattr(self, f"{stage}_loss")(loss)
            getattr(self, f"{stage}_acc")(logits.argmax(1), y)
            self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), on_step=False, on_epoch=True, prog_bar=True)
            self.log(f"{stage}/acc", getattr(self, f"{stage}_acc"), on_step=False, on_epoch=True, prog_bar=True)
            return loss

        def training_step(self, batch, batch_idx):
            return self._step(batch, "train")

        def validation_step(self, batch, batch_idx):
            self._step(batch, "val")

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-7)
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=10)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}

    timer = timer or epoch_timer()
    callbacks = [ModelCheckpoint(monitor="val/acc", mode="max"), EarlyStopping(monitor="val/loss"), timer]
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0, default_root_dir=os.getcwd(),
    )  # fmt: skip
    loaders = DataLoader(train, batch_size=BATCH, shuffle=True), DataLoader(val, batch_size=BATCH)
    trainer.fit(PerStepLogging(), *loaders)
    return timer.seconds


def fit_config(config: str, timer, *overrides: str) -> None:
    """``fit`` one of our configs through the CLI (``scripts/train.py``) with ``timer`` among its callbacks."""
    from train import main

    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    quiet += ["--trainer.devices", "1"]  # one device, like the references (a multi-GPU node would start DDP)
    cli = main(["-c", str(ROOT / config), *overrides, *quiet], run=False)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def run_template(data_dir: Path, val_size: int, epochs: int, timer=None) -> list[float]:
    timer = timer or epoch_timer()
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
PAIRED_PIPELINES = ("lightning_minimal", "template")


def run_paired(pipeline: str, data_dir: Path, val_size: int, epochs: int) -> list[list[float]]:
    """``[pipeline seconds, plain seconds, plain_template_kernels seconds]`` for each epoch after the first of a
    Lightning pipeline, each epoch followed by one epoch of each plain loop in the same process."""
    timer = epoch_timer((plain_loop(data_dir, val_size), plain_loop(data_dir, val_size, template_kernels=True)))
    MNIST_RUNS[pipeline](data_dir, val_size, epochs, timer)
    pairs = [[mine, *plain] for mine, plain in zip(timer.seconds, timer.reference_seconds, strict=True)]
    return pairs[1:] or pairs


# ---- CIFAR-10 suite -------------------------------------------------------------------------------------------------


def make_cifar(n_train: int, directory: Path) -> Path:
    """Random CIFAR-10-shaped data as torchvision's pickles under ``directory/cifar-10-batches-py``."""
    import pickle

    folder = directory / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_batch = n_train // 5
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", 100)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": rng.integers(0, 10, n).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return directory


def _no_md5() -> None:
    """The random pickles cannot match CIFAR-10's md5 sums: check that the files exist, not their hashes."""
    import os

    from torchvision.datasets import cifar

    cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)


def cifar_datamodule(data_dir: Path, sample_augment: bool = False):
    from datamodules import CIFAR10DataModule
    from datamodules.augment import BatchAugment, SampleAugment

    _no_md5()
    book = BatchAugment(width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True)
    dm = CIFAR10DataModule(
        data_dir=str(data_dir),
        val_size=100,
        batch_size=CIFAR_BATCH,
        normalize="per_pixel_mean",
        augment=None if sample_augment else book,
        sample_augment=SampleAugment("book") if sample_augment else None,
    )
    dm.setup("fit")
    return dm


def cifar_plain(data_dir: Path, steps: int) -> float:
    from datamodules.augment import BatchAugment
    from lightning_modules.resnet import ResNetClassifier

    images, labels = (t.to(device()) for t in cifar_datamodule(data_dir).load_split("train"))
    mean = images.double().mean(0).float() / 255
    model = ResNetClassifier(version=1, depth=20, l2=1e-4, num_classes=10, input_shape=(3, 32, 32)).to(device())
    net = model.net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    augment = BatchAugment(width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True)
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


def cifar_template(data_dir: Path, steps: int) -> float:
    from pytorch_lightning.callbacks import Callback

    _no_md5()

    class StepTimer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == CIFAR_WARMUP:
                synchronize()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == CIFAR_WARMUP + steps - 1:
                synchronize()
                self.end = time.perf_counter()

    timer = StepTimer()
    fit_config(
        "configs/cifar10/resnet20_v1.yaml", timer, "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.val_size", "100", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", str(CIFAR_WARMUP + steps), "--trainer.limit_val_batches", "0",
    )  # fmt: skip
    return steps * CIFAR_BATCH / (timer.end - timer.start)


def cifar_loader(data_dir: Path, steps: int, sample_augment: bool = False) -> float:
    """The template's training data path without a model: ``train_dataloader`` + ``on_after_batch_transfer``."""
    from unittest import mock

    dm = cifar_datamodule(data_dir, sample_augment)
    dm.trainer = mock.Mock(training=True, strategy=mock.Mock(root_device=device()))
    dm.trainer._accelerator_connector.use_distributed_sampler = False
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


def run_pipeline(
    suite: str, pipeline: str, data_dir: Path, val_size: int, epochs: int, steps: int
) -> float | list[list[float]]:
    """One measurement in this process: MNIST seconds per epoch (the fastest after the first), CIFAR images/s, or
    for ``paired`` the ``[pipeline, plain]`` seconds of each epoch (:func:`run_paired`).

    Every pipeline starts from the CUDA check importing Lightning leaves; the plain references switch it back as
    a process without Lightning would have it (:func:`as_without_lightning`), the template switches it itself when
    training starts (on a GPU-less machine), the minimal module keeps it.
    """
    from lightning_modules.base import NVML_CUDA_CHECK

    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    os.environ[NVML_CUDA_CHECK] = "1"
    if suite == "cifar":
        return CIFAR_RUNS[pipeline](data_dir, steps)
    if suite == "paired":
        return run_paired(pipeline, data_dir, val_size, epochs)
    seconds = MNIST_RUNS[pipeline](data_dir, val_size, epochs)
    return min(seconds[1:] or seconds)


def measure(
    suite: str, pipeline: str, data_dir: Path, val_size: int, epochs: int, steps: int, same_process: bool = False
) -> float | list[list[float]]:
    """One measurement in a fresh process, or in this one with ``same_process``; either way it runs in
    ``data_dir``, so the template's ``runs/`` folder is thrown away with it."""
    if same_process:
        previous = os.getcwd()
        os.chdir(data_dir)
        try:
            return run_pipeline(suite, pipeline, data_dir, val_size, epochs, steps)
        finally:
            os.chdir(previous)
    command = [sys.executable, __file__, "--child-suite", suite, "--child", pipeline, "--data-dir", str(data_dir)]
    command += ["--val-size", str(val_size), "--epochs", str(epochs), "--steps", str(steps)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=data_dir).stdout
    return json.loads(out.strip().splitlines()[-1])["value"]


def alternate(suite: str, pipelines: tuple[str, ...], reps: int, **kwargs) -> dict[str, list]:
    """``reps`` measurements per pipeline (see :func:`measure`); the pipelines alternate within each repetition."""
    values: dict[str, list] = {p: [] for p in pipelines}
    for rep in range(reps):
        for pipeline in pipelines:
            values[pipeline].append(measure(suite, pipeline, **kwargs))
            value = values[pipeline][-1]
            if isinstance(value, float):
                shown = f"{value:.3f}"
            else:  # paired: the seconds of each epoch and of the plain epochs after it
                shown = " ".join("/".join(f"{v:.3f}" for v in epoch) for epoch in value)
            print(f"{suite} rep {rep + 1}/{reps} {pipeline}: {shown}", file=sys.stderr)
    return values


def print_table(values: dict[str, list[float]], unit: str, higher_is_better: bool, digits: int) -> dict[str, float]:
    """Markdown table of the median and the best repetition of each pipeline, each also as a ratio to ``plain``;
    returns the medians."""
    best = max if higher_is_better else min
    medians = {p: statistics.median(v) for p, v in values.items()}
    bests = {p: best(v) for p, v in values.items()}
    print(f"| pipeline | {unit}, median | vs plain loop | {unit}, best run | vs plain loop, best runs |")
    print("| --- | --- | --- | --- | --- |")
    for p in values:
        ratios = medians[p] / medians["plain"], bests[p] / bests["plain"]
        print(f"| {p} | {medians[p]:.{digits}f} | {ratios[0]:.2f} | {bests[p]:.{digits}f} | {ratios[1]:.2f} |")
    return medians


def print_paired_table(pairs: dict[str, list[list[list[float]]]]) -> None:
    """Markdown table of paired epochs: each pipeline epoch over the epochs of the two plain loops run right after
    it (``plain``, then ``plain_template_kernels``)."""
    print(
        "| pipeline | s / epoch, median | plain loop s / epoch, median | vs plain loop, median of pairs | range "
        "| plain loop with the template's kernels, s / epoch | vs it, median of pairs | range |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for p, runs in pairs.items():
        epochs = [epoch for run in runs for epoch in run]
        cells = [f"{statistics.median(e[0] for e in epochs):.3f}"]
        for ref in (1, 2):
            ratios = [e[0] / e[ref] for e in epochs]
            cells += [f"{statistics.median(e[ref] for e in epochs):.3f}", f"{statistics.median(ratios):.2f}"]
            cells.append(f"{min(ratios):.2f}-{max(ratios):.2f}")
        print(f"| {p} | {' | '.join(cells)} |")


def runs_text(reps: int, same_process: bool) -> str:
    return f"{reps} runs per pipeline " + ("alternating in one process" if same_process else "in fresh processes")


def mnist_suite(quick: bool, reps: int, epochs: int, same_process: bool) -> None:
    n_train, val_size = (1_024, 256) if quick else (60_000, 5_000)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_data(n_train, 256, Path(tmp))
        values = alternate(
            "mnist", PIPELINES, reps, data_dir=data_dir, val_size=val_size, epochs=epochs, steps=0,
            same_process=same_process,
        )  # fmt: skip
        pairs = alternate(
            "paired", PAIRED_PIPELINES, reps, data_dir=data_dir, val_size=val_size, epochs=epochs, steps=0,
            same_process=same_process,
        )  # fmt: skip
    print(
        f"\nMNIST MLP, {n_train - val_size} train + {val_size} val images, batch {BATCH}, "
        f"{runs_text(reps, same_process)}, fastest of epochs 2-{epochs} of each run (epoch 1 when only one), "
        f"torch threads {torch.get_num_threads()}\n"
    )
    medians = print_table(values, "s / epoch", higher_is_better=False, digits=3)
    for reference in ("per_sample", "per_sample_lightning", "plain_template_kernels"):
        print(f"\n{reference} / template (medians): {medians[reference] / medians['template']:.2f}x")
    print(
        f"\nThe same Lightning pipelines with every epoch followed by one epoch of each plain loop in the same process "
        f"({runs_text(reps, same_process)}; the pairs of epochs 2-{epochs}): a change of the machine's speed between "
        "runs or launches hits both sides of a pair alike.\n"
    )
    print_paired_table(pairs)


def cifar_suite(quick: bool, reps: int, steps: int, same_process: bool) -> None:
    n_train = 1_000 if quick else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_cifar(n_train, Path(tmp))
        values = alternate(
            "cifar", CIFAR_PIPELINES, reps, data_dir=data_dir, val_size=100, epochs=1, steps=steps,
            same_process=same_process,
        )  # fmt: skip
    print(
        f"\nCIFAR-10 ResNet20 v1 training, batch {CIFAR_BATCH}, book augmentation (shift 0.1 + flip), {steps} timed "
        f"steps after {CIFAR_WARMUP} warm-up steps, {runs_text(reps, same_process)}, torch threads "
        f"{torch.get_num_threads()}\n"
    )
    print_table(values, "images / s", higher_is_better=True, digits=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("all", "mnist", "cifar"), default="all", help="which table(s) to measure")
    parser.add_argument("--child-suite", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions per pipeline")
    parser.add_argument("--epochs", type=int, default=3, help="MNIST: epochs per run; the fastest after the 1st counts")
    parser.add_argument("--steps", type=int, default=40, help="CIFAR-10: timed training steps per run")
    parser.add_argument("--quick", action="store_true", help="tiny data, one repetition: only checks it runs")
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run every repetition in this one process instead of fresh ones: finer comparisons on a machine whose "
        "speed changes from one process launch to the next",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--val-size", type=int, default=5000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        value = run_pipeline(args.child_suite, args.child, args.data_dir, args.val_size, args.epochs, args.steps)
        print(json.dumps({"pipeline": args.child, "value": value}))
        return
    reps, epochs, steps = (1, 1, 2) if args.quick else (args.reps, args.epochs, args.steps)
    if args.suite in ("all", "mnist"):
        mnist_suite(args.quick, reps, epochs, args.same_process)
    if args.suite in ("all", "cifar"):
        cifar_suite(args.quick, reps, steps, args.same_process)


if __name__ == "__main__":
    main()
