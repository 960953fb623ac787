"""The base of the image datamodules: datasets small enough to live in memory as ``uint8`` tensors.

A dataset is decoded once into an ``(N, C, H, W)`` ``uint8`` tensor. A batch is one tensor slice
(``__getitems__``, no per-sample Python work); the float conversion and normalisation happen once per
batch in ``on_after_batch_transfer``, i.e. on the GPU when there is one, where moving ``uint8`` also costs
a quarter of the bytes of ``float32``. Normalisation statistics come from the training split only and are
applied unchanged to validation, test and predict batches (a requirement of the notes).

The training order and the loaders (seeded, DDP-sharded, resumable in mid-epoch) are :mod:`datamodules.loaders`;
the train/val split and the k-fold options are :mod:`datamodules.splits`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.augment import BatchAugment, SampleAugment
from datamodules.loaders import (  # noqa: F401  (Resumable*, collate_batch: still importable from here)
    DeviceBatchLoader,
    ResumableDataLoader,
    ResumablePosition,
    ResumableSampler,
    collate_batch,
    slicing_loader,
    training_sampler,
)
from datamodules.splits import check_fold, train_val_indices

Normalization = Literal["scale", "standardize", "per_pixel_mean"]
TargetFormat = Literal["index", "one_hot"]


class DataNotFoundError(FileNotFoundError):
    """The dataset is neither on disk nor downloadable; the message says which files to put where."""


class CorruptDataError(ValueError):
    """A dataset file exists but cannot be decoded; the message names the file and the fix."""


def default_data_dir() -> str:
    """``$DATA_DIR`` when set (clusters point every job at one shared copy), else ``./data``."""
    return os.environ.get("DATA_DIR", "data")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: readers never see half a file.

    The datamodules' caches (decoded images, token ids) are written this way by one process per node in
    ``prepare_data``; the other ranks read them in ``setup``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class InMemoryImageDataset(Dataset):
    """``uint8`` images ``(N, C, H, W)`` with integer labels, batched by slicing.

    ``DataLoader`` calls ``__getitems__`` with a whole batch of indices, so a batch costs one indexing op
    instead of ``batch_size`` Python calls and a collate. Use it with :func:`collate_batch`.
    """

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels: both must come from the same files")
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.targets[index]


class AugmentedDataset(Dataset):
    """A training view of an :class:`InMemoryImageDataset` whose batches pass through a :class:`SampleAugment`.

    The augmentation runs where the batch is assembled: in the DataLoader workers when there are any.
    """

    def __init__(self, dataset: InMemoryImageDataset, augment: SampleAugment) -> None:
        self.dataset = dataset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, target = self.dataset[index]
        return self.augment(image[None])[0], target

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        images, targets = self.dataset.__getitems__(indices)
        return self.augment(images), targets


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-channel mean and std (in pixel units) of ``uint8`` images, from a 256-bin histogram.

    The histogram keeps memory flat: no float copy of the whole dataset is made.
    """
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(mean)
        stds.append(var.sqrt().clamp_min(1e-6))
    return torch.stack(means).float(), torch.stack(stds).float()


class EvalLoaders:
    """``val/test/predict_dataloader`` of a datamodule with ``val_set`` and ``test_set`` (``val_set`` None or empty:
    no validation) and a ``_loader(dataset, train)`` recipe. List it before ``pl.LightningDataModule``."""

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, train=False) if self.val_set is not None and len(self.val_set) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class ImageDataModule(EvalLoaders, pl.LightningDataModule):
    """Base for image classification datasets held in memory as ``uint8`` tensors.

    Subclasses set ``num_classes``, ``dims`` and ``classes`` and implement :meth:`load_split`, returning
    ``(uint8 images (N, C, H, W), int64 labels)`` for ``"train"`` or ``"test"``. Downloads belong in
    ``prepare_data``.

    Args:
        data_dir: Folder holding the dataset (default ``$DATA_DIR`` or ``./data``).
        val_size: Validation samples carved from the official training split (count or fraction),
            with a seeded shuffle. The official test split stays the test split. Unused when ``fold`` is set.
        batch_size: Per-device batch size: under DDP the global batch is ``batch_size x world size``.
        eval_batch_size: Batch size for validation/test/predict (default: ``batch_size``).
        num_workers: DataLoader workers. 0 is fastest for in-memory tensors.
        pin_memory: Pin batches for faster host-to-GPU copies (ignored without a GPU).
        normalize: ``"scale"`` divides pixels by 255 (the book); ``"standardize"`` subtracts the per-channel
            mean and divides by the std; ``"per_pixel_mean"`` divides by 255 and subtracts the mean image (the
            book's ResNet recipe). Statistics come from the training split only.
        augment: Batch-level augmentation of training batches (after normalisation, on the device), e.g.
            ``datamodules.augment.BatchAugment`` with the book's shifts and flips. Never applied to val/test.
        sample_augment: Per-image albumentations augmentation of training images (``uint8``, in the DataLoader
            workers), ``datamodules.augment.SampleAugment``; for transforms the batch path lacks. Combine with
            ``num_workers`` so the loader keeps up. Never applied to val/test.
        target_format: ``"index"`` gives integer labels, ``"one_hot"`` float one-hot rows (the model picks
            the matching loss either way).
        channels_last: Hand batches to the model in ``channels_last`` memory format (faster convs on GPUs).
        device_resident: Keep the training set on the training device and cut batches there
            (:class:`~datamodules.loaders.DeviceBatchLoader`): the fastest path for data this size. It applies
            when ``num_workers`` is 0 and there is no ``sample_augment`` (those run in a DataLoader on the host);
            ``False`` uses a ``DataLoader`` always. Same batches, same order, same resume either way.
        seed: Seed of the train/val split (and of the folds), independent of the training seed. The order of the
            training batches follows the run's seed (``seed_everything``) and the epoch: see
            :class:`~datamodules.loaders.ResumableSampler`.
        fold: Cross-validation: validate on fold ``fold`` (0-based) of the official training split cut into
            ``num_folds`` seeded, class-stratified folds and train on the others, instead of the ``val_size``
            hold-out (see :mod:`datamodules.splits`). ``None``: no folds.
        num_folds: Number of folds K when ``fold`` is set (at least 2).
        stratify_folds: Keep every fold's class proportions (``StratifiedKFold``); ``False``: plain ``KFold``.
    """

    num_classes: int
    dims: tuple[int, int, int]
    classes: list[str]

    def __init__(
        self,
        data_dir: str | None = None,
        val_size: int | float = 5000,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        normalize: Normalization = "scale",
        augment: BatchAugment | None = None,
        sample_augment: SampleAugment | None = None,
        target_format: TargetFormat = "index",
        channels_last: bool = False,
        device_resident: bool = True,
        seed: int = 42,
        fold: int | None = None,
        num_folds: int = 5,
        stratify_folds: bool = True,
    ) -> None:
        super().__init__()
        check_fold(fold, num_folds)
        if normalize not in ("scale", "standardize", "per_pixel_mean"):
            raise ValueError(
                f"normalize={normalize!r}: choose 'scale' (pixels / 255), 'standardize' or 'per_pixel_mean'."
            )
        if target_format not in ("index", "one_hot"):
            raise ValueError(f"target_format={target_format!r}: choose 'index' or 'one_hot'.")
        self.save_hyperparameters(ignore=["augment", "sample_augment"])
        self.augment = augment
        self.sample_augment = sample_augment
        self.data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
        self.train_set: InMemoryImageDataset | None = None
        self.val_set: InMemoryImageDataset | None = None
        self.test_set: InMemoryImageDataset | None = None
        self.mean: Tensor | None = None  # (C,) or (C, H, W), pixel units, from the training split only
        self.std: Tensor | None = None
        self._device_stats: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._resident: tuple | None = None  # (train_set, images, labels) on the device, for DeviceBatchLoader

    # ---- to implement ------------------------------------------------------------------------------
    def load_split(self, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # ---- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_set is None:
            self._setup_train_val()
        if stage in ("test", "predict") and self.test_set is None:
            if self.mean is None and self.hparams.normalize == "scale":
                self.set_stats(*self._compute_stats(None))
            elif self.mean is None:  # statistics come from the training split, even for a test-only run
                self._setup_train_val()
            self.test_set = self._dataset(*self.load_split("test"))

    def _setup_train_val(self) -> None:
        images, labels = self.load_split("train")
        hp = self.hparams
        train_idx, val_idx = train_val_indices(
            labels, hp.val_size, hp.seed, fold=hp.fold, num_folds=hp.num_folds, stratify=hp.stratify_folds
        )
        self.train_set = self._dataset(images[train_idx], labels[train_idx])
        self.val_set = self._dataset(images[val_idx], labels[val_idx])
        if self.mean is None:
            self.set_stats(*self._compute_stats(self.train_set.images))

    def _dataset(self, images: Tensor, labels: Tensor) -> InMemoryImageDataset:
        if tuple(images.shape[1:]) != tuple(self.dims):
            raise CorruptDataError(
                f"{type(self).__name__} expects images of shape {self.dims} (C, H, W) but the files hold "
                f"{tuple(images.shape[1:])}; check that data_dir={self.data_dir} holds this dataset."
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise CorruptDataError(
                f"{type(self).__name__} has {self.num_classes} classes but the label files hold values in "
                f"[{int(labels.min())}, {int(labels.max())}]; the files in {self.data_dir} are not this dataset."
            )
        return InMemoryImageDataset(images, labels)

    def _compute_stats(self, train_images: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.hparams.normalize == "scale":
            return torch.zeros(self.dims[0]), torch.full((self.dims[0],), 255.0)
        if self.hparams.normalize == "per_pixel_mean":  # (x / 255) - mean(x_train / 255), as the book
            mean = torch.zeros(self.dims, dtype=torch.float64)
            for chunk in train_images.split(4096):  # no float copy of the whole split
                mean += chunk.double().sum(0)
            return (mean / len(train_images)).float(), torch.full((self.dims[0],), 255.0)
        return channel_stats(train_images)

    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        self.mean, self.std = mean.float(), std.float()
        self._device_stats.clear()
        self._resident = None  # normalised with the old statistics

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader | DeviceBatchLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run for this stage")
        batch_size = self.hparams.batch_size if train else self.hparams.eval_batch_size or self.hparams.batch_size
        device_path = self.hparams.device_resident and self.hparams.num_workers == 0
        if train and device_path and isinstance(dataset, InMemoryImageDataset):
            sampler = training_sampler(dataset, self.trainer)
            return DeviceBatchLoader(dataset, batch_size, sampler, resident=self._resident_train_set)
        return slicing_loader(
            dataset,
            batch_size,
            train=train,
            trainer=self.trainer,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
        )

    def _device(self) -> torch.device:
        """The device training runs on (the trainer's root device), CPU without a trainer."""
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    # A float copy of the training set up to this size is normalised once on the device (MNIST 172 MB, CIFAR-10
    # 550 MB); larger sets stay uint8 there and are normalised batch by batch.
    normalized_cache_bytes = 2**30

    def _resident_train_set(self) -> tuple[Tensor, Tensor]:
        """The training set on the training device, normalised once when it fits ``normalized_cache_bytes``."""
        device, dataset = self._device(), self.train_set
        if self._resident is None or self._resident[0] is not dataset or self._resident[1].device != device:
            images, targets = dataset.images.to(device), dataset.targets.to(device)
            if images.numel() * 4 <= self.normalized_cache_bytes:
                images = torch.cat([self.normalize_images(chunk) for chunk in images.split(4096)])
            self._resident = (dataset, images, targets)
        return self._resident[1:]

    def train_dataloader(self) -> DataLoader | DeviceBatchLoader:
        """Shuffled by a :class:`ResumableSampler` (order = f(seed, epoch), per-rank shards, mid-epoch resume),
        cut on the device (:class:`DeviceBatchLoader`) or by a :class:`ResumableDataLoader`."""
        dataset = self.train_set
        if dataset is not None and self.sample_augment is not None:
            dataset = AugmentedDataset(dataset, self.sample_augment)
        return self._loader(dataset, train=True)

    def normalize_images(self, images: Tensor) -> Tensor:
        """``uint8`` batch -> normalised ``float32``, on the batch's device."""
        if self.mean is None or self.std is None:
            raise RuntimeError("normalisation statistics are not set: call setup() first")
        stats = self._device_stats.get(images.device)
        if stats is None:
            # (C,) statistics broadcast per channel, (C, H, W) ones per pixel.
            stats = tuple(
                t.to(images.device).view(1, -1, 1, 1) if t.dim() == 1 else t.to(images.device).unsqueeze(0)
                for t in (self.mean, self.std)
            )
            self._device_stats[images.device] = stats
        out = images.float().sub_(stats[0]).div_(stats[1])
        if self.hparams.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, list | tuple) or len(batch) != 2:
            return batch  # not an (images, labels) pair, e.g. Lightning's model summary passing example_input_array
        images, targets = batch
        if self.hparams.target_format == "one_hot" and not targets.is_floating_point():
            targets = F.one_hot(targets, self.num_classes).float()
        if images.dtype == torch.uint8:  # float batches are normalised already (DeviceBatchLoader, a user's batch)
            images = self.normalize_images(images)
        if self.augment is not None and self.trainer is not None and self.trainer.training:
            images = self.augment(images)
        return images, targets

    # The statistics travel with checkpoints, so a restored run normalises exactly as in training.
    def state_dict(self) -> dict:
        return {} if self.mean is None else {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state_dict: dict) -> None:
        if "mean" in state_dict:
            self.set_stats(state_dict["mean"], state_dict["std"])
