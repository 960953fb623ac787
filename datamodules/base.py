"""Shared machinery for image datasets small enough to live in memory as ``uint8`` tensors.

A dataset is decoded once into an ``(N, C, H, W)`` ``uint8`` tensor. A batch is one tensor slice
(``__getitems__``, no per-sample Python work); the float conversion and normalisation happen once per
batch in ``on_after_batch_transfer``, i.e. on the GPU when there is one, where moving ``uint8`` also costs
a quarter of the bytes of ``float32``. Normalisation statistics come from the training split only and are
applied unchanged to validation, test and predict batches (a requirement of the notes).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.augment import BatchAugment, SampleAugment

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


def collate_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``__getitems__`` already returns a batch: nothing left to collate."""
    return batch


def training_seed() -> int:
    """The run's seed as ``seed_everything`` recorded it (``$PL_GLOBAL_SEED``), else 0, identical on every rank.

    Lightning seeds its own ``DistributedSampler`` the same way, so every rank draws the same permutation.
    """
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _resized(order: list[int], size: int) -> list[int]:
    """``order`` cut to ``size``, or padded by repeating it from the start (``DistributedSampler``'s padding)."""
    if size <= len(order):
        return order[:size]
    return (order * math.ceil(size / len(order)))[:size]


class ResumableSampler(DistributedSampler):
    """The training order: a function of ``(seed, epoch)``, sharded across ranks, resumable in mid-epoch.

    It is :class:`~torch.utils.data.DistributedSampler` (same permutation ``randperm(n)`` seeded with
    ``seed + epoch``, same padding, same sharding: rank ``r`` of ``W`` takes positions ``r, r + W, ...``) with a
    start position: after a restore the epoch continues at the first sample that no rank has trained on. The
    position counts samples across all ranks, so it maps onto any world size; with the world size of the
    interrupted run every rank continues exactly where it stopped.

    Being a ``DistributedSampler``, it is left in place by Lightning's ``use_distributed_sampler`` (which would
    otherwise wrap or replace it); :meth:`ImageDataModule.train_dataloader` gives it the world size and rank.
    ``len()`` is the full epoch's per-rank count even when resuming: Lightning counts the batches the
    interrupted epoch already did and only asks for the rest.

    Args:
        dataset: The dataset to sample (only its length is used).
        num_replicas: Processes sharing each epoch (the world size); 1 without DDP.
        rank: Global rank of this process.
        shuffle: Shuffle every epoch; ``False`` keeps the dataset order.
        seed: Shuffle seed, identical on every rank (see :func:`training_seed`).
        drop_last: Drop the tail that does not split evenly across ranks instead of padding with repeats.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0  # samples of this epoch's order (all ranks together) already trained on

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts at its beginning; the same epoch keeps a restored start
            self.start = 0
        super().set_epoch(epoch)

    def epoch_order(self) -> list[int]:
        """All ranks' samples of the current epoch, in order: rank ``r`` takes ``order[r::num_replicas]``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
        else:
            order = list(range(len(self.dataset)))
        return _resized(order, self.total_size)

    def __iter__(self) -> Iterator[int]:
        rest = self.epoch_order()[self.start :]
        if rest and len(rest) % self.num_replicas:
            # Only after a restore on a different world size: give every rank the same number of samples.
            size = len(rest) // self.num_replicas if self.drop_last else math.ceil(len(rest) / self.num_replicas)
            rest = _resized(rest, size * self.num_replicas)
        return iter(rest[self.rank :: self.num_replicas])


class ResumablePosition:
    """The position in the epoch of a loader drawn by a :class:`ResumableSampler`, as a checkpointable state.

    Lightning's fit loop saves ``state_dict()`` of every training dataloader that has one into each checkpoint
    (``loops.fit_loop.state_dict.combined_loader``) and, when ``fit`` restores a checkpoint, calls
    ``load_state_dict()`` before the first batch is drawn. The state is the sampler's epoch, seed and position
    plus the loader's generator: a restored loader yields exactly the batches the interrupted run had not trained
    on yet, in the same order. Batches are counted as the loader yields them, which is when Lightning consumes
    them (it prefetches nothing from loaders with a length), so worker prefetching does not distort the count.
    With any other sampler the state is empty. A loader class mixes this in and wraps its batches in
    :meth:`_counted`; it has ``sampler``, ``batch_size`` and ``generator`` attributes.
    """

    sampler: Any
    batch_size: int | None
    generator: torch.Generator | None
    _iter_epoch: int | None = None  # epoch of the iteration in progress
    _iter_start = 0  # sampler position at which it began
    _yielded = 0  # batches it has yielded

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        # A generator: the sampler is read when the first batch is requested, i.e. after Lightning's set_epoch().
        sampler = self.sampler
        if isinstance(sampler, ResumableSampler):
            self._iter_epoch, self._iter_start, self._yielded = sampler.epoch, sampler.start, 0
        for batch in batches:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler) or self.batch_size is None:
            return {}
        position = sampler.start
        if self._iter_epoch == sampler.epoch:  # else the epoch's iteration has not begun yet
            position = self._iter_start + self._yielded * self.batch_size * sampler.num_replicas
        state = {
            "epoch": sampler.epoch,
            "position": min(position, sampler.total_size),
            "seed": sampler.seed,
            "num_replicas": sampler.num_replicas,
        }
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sampler = self.sampler
        if not state_dict or not isinstance(sampler, ResumableSampler):
            return
        if state_dict["num_replicas"] != sampler.num_replicas:
            rank_zero_warn(
                f"Resuming on {sampler.num_replicas} processes a run that trained on {state_dict['num_replicas']}: "
                "the rest of the interrupted epoch is re-sharded over the new processes (no sample is skipped; a "
                "few may repeat), so the run will not match an uninterrupted one exactly."
            )
        # The saved seed wins: the resumed run continues the interrupted run's sequence of epoch orders.
        sampler.seed = state_dict["seed"]
        sampler.epoch = state_dict["epoch"]
        sampler.start = state_dict["position"]
        self._iter_epoch = None
        if self.generator is not None and "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])


class ResumableDataLoader(ResumablePosition, DataLoader):
    """A ``DataLoader`` whose position in the epoch travels with Lightning's checkpoints (see
    :class:`ResumablePosition`); with any sampler but a :class:`ResumableSampler` an ordinary ``DataLoader``."""

    def __iter__(self) -> Iterator[Any]:
        return self._counted(super().__iter__())


class DeviceBatchLoader(ResumablePosition):
    """Training batches cut from a copy of the dataset that lives on the training device (airbench style).

    The images and labels move to the device once (already normalised when the datamodule can afford the float
    copy, see ``ImageDataModule.device_resident``); each batch is then one indexing op on the device: no DataLoader
    machinery, no per-batch host-to-device copy or normalisation. The order is the :class:`ResumableSampler`'s
    (same seeded permutation, same per-rank shard, same mid-epoch resume), so it yields exactly the batches a
    :class:`ResumableDataLoader` over the same sampler would.

    Args:
        dataset: The in-memory training set.
        batch_size: Per-device batch size (the last batch may be smaller, as ``drop_last=False``).
        sampler: The order of the epoch (its ``set_epoch`` is called by Lightning through ``loader.sampler``).
        resident: Returns ``(images, labels)`` on the training device, asked at each epoch start (the owner
            caches them); default: the dataset's own tensors.
    """

    generator = None

    def __init__(
        self,
        dataset: InMemoryImageDataset,
        batch_size: int,
        sampler: ResumableSampler,
        resident: Callable[[], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = sampler
        self.resident = resident or (lambda: (dataset.images, dataset.targets))

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, targets = self.resident()
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long).to(images.device, non_blocking=True)
        for index in order.split(self.batch_size):
            yield images[index], targets[index]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self._counted(self._batches())


def trainer_shard(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(world size, global rank) for a training sampler: Lightning's values under DDP, else (1, 0).

    With ``Trainer(use_distributed_sampler=False)`` every rank gets the whole epoch, as Lightning would do.
    """
    kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
    if not kwargs or not trainer._accelerator_connector.use_distributed_sampler:
        return 1, 0
    return kwargs["num_replicas"], kwargs["rank"]


def training_sampler(dataset: Dataset, trainer: pl.Trainer | None) -> ResumableSampler:
    """The training order of every datamodule: seeded by the run's seed, sharded over the trainer's ranks."""
    num_replicas, rank = trainer_shard(trainer)
    return ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=training_seed())


def slicing_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    trainer: pl.Trainer | None = None,
    num_workers: int = 0,
    pin_memory: bool = True,
    sampler: ResumableSampler | None = None,
) -> DataLoader:
    """The datamodules' loader recipe for datasets with ``__getitems__`` (a batch is one slice, no collate).

    Training loaders are :class:`ResumableDataLoader` over ``sampler`` (default :func:`training_sampler`: order =
    f(seed, epoch), per-rank shards, mid-epoch resume); evaluation loaders keep the dataset order unless a
    ``sampler`` is given. Every loader draws its workers' base seed from its own generator, never from the global
    RNG: creating a loader iterator must not shift the dropout masks (a resumed run creates its iterators at
    other times).
    """
    if train and sampler is None:
        sampler = training_sampler(dataset, trainer)
    loader_class = ResumableDataLoader if sampler is not None else DataLoader
    return loader_class(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_batch,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(training_seed()),
    )


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
            with a seeded shuffle. The official test split stays the test split.
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
            (:class:`DeviceBatchLoader`): the fastest path for data this size. It applies when ``num_workers`` is 0
            and there is no ``sample_augment`` (those run in a DataLoader on the host); ``False`` uses a
            ``DataLoader`` always. Same batches, same order, same resume either way.
        seed: Seed of the train/val split, independent of the training seed. The order of the training
            batches follows the run's seed (``seed_everything``) and the epoch: see :class:`ResumableSampler`.
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
    ) -> None:
        super().__init__()
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
