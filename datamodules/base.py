"""Shared machinery for image datasets small enough to live in memory as ``uint8`` tensors.

A dataset is decoded once into an ``(N, C, H, W)`` ``uint8`` tensor. A batch is one tensor slice
(``__getitems__``, no per-sample Python work); the float conversion and normalisation happen once per
batch in ``on_after_batch_transfer``, i.e. on the GPU when there is one, where moving ``uint8`` also costs
a quarter of the bytes of ``float32``. Normalisation statistics come from the training split only and are
applied unchanged to validation, test and predict batches (a requirement of the notes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

Normalization = Literal["scale", "standardize"]
TargetFormat = Literal["index", "one_hot"]


class DataNotFoundError(FileNotFoundError):
    """The dataset is neither on disk nor downloadable; the message says which files to put where."""


class CorruptDataError(ValueError):
    """A dataset file exists but cannot be decoded; the message names the file and the fix."""


def default_data_dir() -> str:
    """``$DATA_DIR`` when set (clusters point every job at one shared copy), else ``./data``."""
    return os.environ.get("DATA_DIR", "data")


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


def collate_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``__getitems__`` already returns a batch: nothing left to collate."""
    return batch


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


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded shuffled split of ``range(n)`` into (train, val); ``val_size`` is a count or a fraction."""
    n_val = round(val_size * n) if isinstance(val_size, float) else int(val_size)
    if not 0 <= n_val < n:
        raise ValueError(
            f"val_size={val_size} asks for {n_val} validation samples out of {n} training samples; "
            "pass a count below the training-set size or a fraction in [0, 1)."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


class ImageDataModule(pl.LightningDataModule):
    """Base for image classification datasets held in memory as ``uint8`` tensors.

    Subclasses set ``num_classes``, ``dims`` and ``classes`` and implement :meth:`load_split`, returning
    ``(uint8 images (N, C, H, W), int64 labels)`` for ``"train"`` or ``"test"``. Downloads belong in
    ``prepare_data``.

    Args:
        data_dir: Folder holding the dataset (default ``$DATA_DIR`` or ``./data``).
        val_size: Validation samples carved from the official training split (count or fraction),
            with a seeded shuffle. The official test split stays the test split.
        batch_size: Per-device batch size: under DDP the global batch is ``batch_size x world size``.
        eval_batch_size: Batch size for validation/test/predict (default: ``batch_size``).
        num_workers: DataLoader workers. 0 is fastest for in-memory tensors.
        pin_memory: Pin batches for faster host-to-GPU copies (ignored without a GPU).
        normalize: ``"scale"`` divides pixels by 255 (the book); ``"standardize"`` subtracts the per-channel
            mean and divides by the std, both computed on the training split only.
        target_format: ``"index"`` gives integer labels, ``"one_hot"`` float one-hot rows (the model picks
            the matching loss either way).
        channels_last: Hand batches to the model in ``channels_last`` memory format (faster convs on GPUs).
        seed: Seed of the train/val split, independent of the training seed.
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
        target_format: TargetFormat = "index",
        channels_last: bool = False,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if normalize not in ("scale", "standardize"):
            raise ValueError(f"normalize={normalize!r}: choose 'scale' (pixels / 255) or 'standardize'.")
        if target_format not in ("index", "one_hot"):
            raise ValueError(f"target_format={target_format!r}: choose 'index' or 'one_hot'.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
        self.train_set: InMemoryImageDataset | None = None
        self.val_set: InMemoryImageDataset | None = None
        self.test_set: InMemoryImageDataset | None = None
        self.mean: Tensor | None = None  # per-channel, pixel units, from the training split only
        self.std: Tensor | None = None
        self._device_stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

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
        train_idx, val_idx = split_indices(len(images), self.hparams.val_size, self.hparams.seed)
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
        return channel_stats(train_images)

    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        self.mean, self.std = mean.float(), std.float()
        self._device_stats.clear()

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run for this stage")
        batch_size = self.hparams.batch_size if train else self.hparams.eval_batch_size or self.hparams.batch_size
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            num_workers=workers,
            collate_fn=collate_batch,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, train=False) if self.val_set is not None and len(self.val_set) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def normalize_images(self, images: Tensor) -> Tensor:
        """``uint8`` batch -> normalised ``float32``, on the batch's device."""
        if self.mean is None or self.std is None:
            raise RuntimeError("normalisation statistics are not set: call setup() first")
        stats = self._device_stats.get(images.device)
        if stats is None:
            shape = (1, -1, 1, 1)
            stats = (self.mean.to(images.device).view(shape), self.std.to(images.device).view(shape))
            self._device_stats[images.device] = stats
        out = (images.float() - stats[0]) / stats[1]
        if self.hparams.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, targets = batch
        if images.dtype != torch.uint8:  # already preprocessed (e.g. a user-supplied float batch)
            return batch
        if self.hparams.target_format == "one_hot":
            targets = F.one_hot(targets, self.num_classes).float()
        return self.normalize_images(images), targets

    # The statistics travel with checkpoints, so a restored run normalises exactly as in training.
    def state_dict(self) -> dict:
        return {} if self.mean is None else {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state_dict: dict) -> None:
        if "mean" in state_dict:
            self.set_stats(state_dict["mean"], state_dict["std"])
