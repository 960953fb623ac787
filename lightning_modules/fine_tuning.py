"""Fine-tuning of a pretrained base: train the new head first, then unfreeze the base's last blocks, gently.

:class:`TransferFinetuning` is Lightning's ``BaseFinetuning`` for
:class:`~lightning_modules.transfer.TransferClassifier`, which adds it itself in ``finetune`` mode and holds the
settings (``unfreeze_at_epoch``, ``unfreeze_blocks``, ``finetune_lr_factor``, ``train_bn``).
:func:`add_param_group` adds the unfrozen parameters to a live optimiser and lets the schedulers built before know the
new group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

if TYPE_CHECKING:
    from lightning_modules.transfer import TransferClassifier

__all__ = ["TransferFinetuning", "add_param_group", "extend_schedulers"]


class TransferFinetuning(BaseFinetuning):
    """Freeze the base before training; from epoch ``unfreeze_at_epoch`` on, train its last ``unfreeze_blocks``.

    The unfreezing itself is :meth:`TransferClassifier.start_finetuning
    <lightning_modules.transfer.TransferClassifier.start_finetuning>`. ``BaseFinetuning`` records the optimiser's
    param groups in checkpoints and rebuilds them when a fit resumes; this callback then unfreezes the blocks again
    (at the start of any epoch from the unfreeze epoch on, and at the start of a fit resumed in mid-epoch) without
    adding their parameters twice.
    """

    def freeze_before_training(self, pl_module: TransferClassifier) -> None:
        pl_module.freeze_base()

    def on_train_start(self, trainer: pl.Trainer, pl_module: TransferClassifier) -> None:
        # A fit resumed in mid-epoch does not run on_train_epoch_start for that epoch: unfreeze here too when due.
        for optimizer in trainer.optimizers:
            self.finetune_function(pl_module, trainer.current_epoch, optimizer)

    def finetune_function(self, pl_module: TransferClassifier, epoch: int, optimizer: Optimizer) -> None:
        if epoch >= pl_module.hparams.unfreeze_at_epoch:
            trainer = pl_module.trainer
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
            pl_module.start_finetuning(optimizer, schedulers)


def add_param_group(
    optimizer: Optimizer, params: Sequence[nn.Parameter], lr: float, schedulers: Iterable[object] = ()
) -> None:
    """Add ``params`` to ``optimizer`` as a new param group with ``lr`` (also its ``initial_lr``), and extend the
    ``schedulers`` of that optimizer to the new group (:func:`extend_schedulers`)."""
    optimizer.add_param_group({"params": list(params), "lr": lr, "initial_lr": lr})
    extend_schedulers(schedulers, len(optimizer.param_groups), lr)


def extend_schedulers(schedulers: Iterable[object], num_groups: int, lr: float) -> None:
    """Let schedulers created before a param group was added handle it (PyTorch's keep per-group lists).

    ``ReduceLROnPlateau`` repeats its last ``min_lrs``; other schedulers start the group at ``base_lrs`` ``lr`` and
    repeat their last ``lr_lambdas``. A scheduler's ``get_last_lr()`` lists the new group from its next step on.
    """
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            while len(scheduler.min_lrs) < num_groups:
                scheduler.min_lrs.append(scheduler.min_lrs[-1])
        elif isinstance(scheduler, LRScheduler):
            while len(scheduler.base_lrs) < num_groups:
                scheduler.base_lrs.append(lr)
            lambdas = getattr(scheduler, "lr_lambdas", None)
            while lambdas is not None and len(lambdas) < num_groups:
                lambdas.append(lambdas[-1])
