"""Global batch size and the linear learning-rate scaling rule, for runs on many devices.

The datamodules' ``batch_size`` is per device: under DDP every process draws its own batches, so one optimizer
step sees ``batch_size x devices x nodes x accumulate_grad_batches`` samples (the *global* batch).
:func:`batch_size_summary` states that product (``scripts/train.py`` prints it at the start of every fit), and
:class:`GlobalBatchSize` lets a config fix the global batch instead, and optionally scale the learning rate with
it. Both are opt-in: without the callback, a recipe trains exactly as written, per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

__all__ = ["BatchPlan", "GlobalBatchSize", "batch_plan", "batch_size_summary"]


def _get_batch_size(datamodule: Any) -> int | None:
    """The datamodule's per-device ``batch_size`` (in its hyperparameters or as an attribute), if it has one."""
    hparams = getattr(datamodule, "hparams", None) or {}
    value = hparams.get("batch_size", getattr(datamodule, "batch_size", None))
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _set_batch_size(datamodule: Any, value: int) -> None:
    hparams = getattr(datamodule, "hparams", None)
    found = False
    if hparams is not None and "batch_size" in hparams:
        hparams["batch_size"] = value
        found = True
    if isinstance(getattr(datamodule, "batch_size", None), int):
        datamodule.batch_size = value
        found = True
    if not found:
        raise ValueError(
            f"GlobalBatchSize sets the datamodule's per-device batch size, but {type(datamodule).__name__} has no "
            "`batch_size` argument or attribute. Give the datamodule a `batch_size` argument, or remove the callback."
        )


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's samples are spread: ``per_device x devices x nodes x accumulate = global_batch``."""

    per_device: int
    devices: int
    nodes: int
    accumulate: int

    @property
    def processes(self) -> int:
        return self.devices * self.nodes

    @property
    def global_batch(self) -> int:
        return self.per_device * self.devices * self.nodes * self.accumulate

    def __str__(self) -> str:
        accumulate = f" x accumulate_grad_batches {self.accumulate}" if self.accumulate > 1 else ""
        return (
            f"per-device batch {self.per_device} x devices {self.devices} x nodes {self.nodes}{accumulate} "
            f"= global batch {self.global_batch}"
        )


class GlobalBatchSize(Callback):
    """Fix the global batch instead of the per-device one, and/or scale the learning rate linearly with it.

    Add it to a run (``--trainer.callbacks+=callbacks.GlobalBatchSize``) and set one or both arguments. The
    world size is read from the Trainer (``devices x num_nodes``), so the same config gives the same optimisation
    on 1 GPU, 8 GPUs or 4 nodes.

    Args:
        global_batch_size: Samples per optimizer step over all processes. The datamodule's per-device
            ``batch_size`` becomes ``global_batch_size / (devices x num_nodes x accumulate_grad_batches)``; an
            error says so when that is not a whole number. ``None`` keeps the datamodule's ``batch_size``.
        lr_reference_batch: The global batch size the configured learning rate was tuned for (e.g. the
            recipe's single-device batch, 128). At the start of fit every learning rate of every optimizer
            (and the ``initial_lr``/``base_lrs`` of its schedulers) is multiplied by
            ``global batch / lr_reference_batch``, the linear scaling rule (Goyal et al., 2017). ``None``
            (default) leaves the learning rate alone. A resumed fit keeps the learning rates of its checkpoint.
    """

    def __init__(self, global_batch_size: int | None = None, lr_reference_batch: int | None = None) -> None:
        super().__init__()
        if global_batch_size is None and lr_reference_batch is None:
            raise ValueError(
                "GlobalBatchSize does nothing without arguments: set global_batch_size (samples per optimizer "
                "step over all processes) and/or lr_reference_batch (the global batch the lr was tuned for)."
            )
        for name, value in (("global_batch_size", global_batch_size), ("lr_reference_batch", lr_reference_batch)):
            if value is not None and value < 1:
                raise ValueError(f"GlobalBatchSize: {name}={value} must be a positive number of samples.")
        self.global_batch_size = global_batch_size
        self.lr_reference_batch = lr_reference_batch

    def per_device_batch(self, trainer: pl.Trainer, configured: int | None) -> int | None:
        """The per-device batch for ``trainer``: from ``global_batch_size`` if set, else ``configured``."""
        if self.global_batch_size is None:
            return configured
        shards = trainer.num_devices * trainer.num_nodes * trainer.accumulate_grad_batches
        if self.global_batch_size % shards:
            raise ValueError(
                f"GlobalBatchSize: global_batch_size={self.global_batch_size} does not split evenly over devices "
                f"{trainer.num_devices} x nodes {trainer.num_nodes} x accumulate_grad_batches "
                f"{trainer.accumulate_grad_batches} = {shards}. Choose a multiple of {shards}, or change the "
                "number of devices, nodes or accumulated batches."
            )
        return self.global_batch_size // shards

    def lr_factor(self, plan: BatchPlan) -> float:
        return 1.0 if self.lr_reference_batch is None else plan.global_batch / self.lr_reference_batch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if stage != "fit" or self.global_batch_size is None:
            return
        if datamodule is None:
            raise ValueError(
                "GlobalBatchSize needs a LightningDataModule with a `batch_size` (it sets the per-device batch "
                "size); pass one to fit(datamodule=...)."
            )
        per_device = self.per_device_batch(trainer, _get_batch_size(datamodule))
        _set_batch_size(datamodule, per_device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs once the optimizers exist and before a checkpoint's optimizer state is restored, so a resumed
        # fit ends up with the checkpoint's (already scaled) learning rates, never scaled twice.
        if self.lr_reference_batch is None:
            return
        plan = batch_plan(trainer, getattr(trainer, "datamodule", None))
        if plan is None:
            raise ValueError(
                "GlobalBatchSize(lr_reference_batch=...) needs the global batch size, but the datamodule has no "
                "`batch_size`: set global_batch_size too."
            )
        factor = self.lr_factor(plan)
        old, new = [], []
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                old.append(float(group["lr"]))
                for key in ("lr", "initial_lr"):
                    if key in group:
                        _scale(group, key, factor)
                new.append(float(group["lr"]))
        for config in trainer.lr_scheduler_configs:
            base_lrs = getattr(config.scheduler, "base_lrs", None)
            if base_lrs is not None:
                config.scheduler.base_lrs = [lr * factor for lr in base_lrs]
        rank_zero_info(
            f"GlobalBatchSize: lr x {factor:g} (global batch {plan.global_batch} / lr_reference_batch "
            f"{self.lr_reference_batch}): {', '.join(f'{lr:.3g}' for lr in old)} -> "
            f"{', '.join(f'{lr:.3g}' for lr in new)}"
        )


def _scale(group: dict[str, Any], key: str, factor: float) -> None:
    if isinstance(group[key], torch.Tensor):  # a tensor lr (e.g. for CUDA graphs) is updated in place
        group[key].mul_(factor)
    else:
        group[key] = group[key] * factor


def _scaler(trainer: pl.Trainer) -> GlobalBatchSize | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, GlobalBatchSize)), None)


def batch_plan(trainer: pl.Trainer, datamodule: Any) -> BatchPlan | None:
    """The batch layout ``trainer`` will train with (``GlobalBatchSize`` applied), or None without a batch size.

    The world size is ``trainer.num_devices x trainer.num_nodes``: what Lightning launches under DDP/FSDP, and
    what it checks against SLURM's and torchrun's process counts. Pure: nothing is changed.
    """
    configured = _get_batch_size(datamodule) if datamodule is not None else None
    scaler = _scaler(trainer)
    per_device = scaler.per_device_batch(trainer, configured) if scaler is not None else configured
    if per_device is None:
        return None
    return BatchPlan(per_device, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches)


def batch_size_summary(trainer: pl.Trainer, datamodule: Any) -> str:
    """One line for the start of a fit, e.g. ``per-device batch 128 x devices 4 x nodes 2 = global batch 1024``.

    Raises the :class:`GlobalBatchSize` error when its global batch does not divide, before any process starts.
    """
    plan = batch_plan(trainer, datamodule)
    if plan is None:
        return f"Batch size: {type(datamodule).__name__} has no `batch_size`, the global batch is not known."
    line = f"Batch size: {plan}"
    scaler = _scaler(trainer)
    if scaler is not None and scaler.global_batch_size is not None:
        line += " (per-device batch from GlobalBatchSize.global_batch_size)"
    if scaler is not None and scaler.lr_reference_batch is not None:
        line += f"; lr x {scaler.lr_factor(plan):g} (global batch / lr_reference_batch {scaler.lr_reference_batch})"
    return line
