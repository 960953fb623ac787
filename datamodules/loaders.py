"""The training order and the loaders of every datamodule: seeded, sharded over DDP ranks, resumable in mid-epoch.

- :class:`ResumableSampler`: the order of an epoch as a function of ``(seed, epoch)`` (``DistributedSampler``'s
  permutation, padding and sharding) with a start position, so a restored run continues mid-epoch.
- :class:`ResumablePosition`: that position as a checkpointable loader state (Lightning saves and restores it).
- :class:`ResumableDataLoader`: a ``DataLoader`` carrying that state; :class:`DeviceBatchLoader`: the same batches
  cut from a copy of the training set on the training device (no DataLoader machinery).
- :func:`slicing_loader`: the datamodules' loader recipe for datasets with ``__getitems__`` (a batch is one slice).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from compat import uses_distributed_sampler

if TYPE_CHECKING:
    from datamodules.base import InMemoryImageDataset


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
    otherwise wrap or replace it); :func:`training_sampler` gives it the trainer's world size and rank.
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
    copy, see ``ImageDataModule(device_resident=...)``); each batch is then one indexing op on the device: no DataLoader
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
    # ``distributed_sampler_kwargs`` answers for the strategy, not for the flag, which has no public getter.
    if not kwargs or not uses_distributed_sampler(trainer):
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
