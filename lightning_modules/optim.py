"""The optimiser and learning-rate scheduler of a module, from the config's factories.

``--model.init_args.optimizer`` and ``--model.init_args.lr_scheduler`` are factories (LightningCLI builds them from
the YAML); :func:`optimizers_from_factories` turns them into ``configure_optimizers``' return value, and
:func:`scheduler_step_interval` decides whether the scheduler steps after every training step or every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.optim.lr_scheduler import CyclicLR, LinearLR, OneCycleLR, ReduceLROnPlateau

__all__ = ["PER_STEP_SCHEDULERS", "SchedulerInterval", "optimizers_from_factories", "scheduler_step_interval"]

SchedulerInterval = Literal["auto", "step", "epoch"]
# Schedulers whose lengths count training steps: OneCycleLR's total_steps, CyclicLR's step_size_up, and a LinearLR
# warm-up's total_iters as modern recipes use it.
PER_STEP_SCHEDULERS = (OneCycleLR, CyclicLR, LinearLR)


def scheduler_step_interval(scheduler: object, interval: SchedulerInterval = "auto") -> str:
    """``step`` or ``epoch``: how often Lightning steps ``scheduler``. ``auto`` steps :data:`PER_STEP_SCHEDULERS`
    after every training step (and says so) and every other scheduler once per epoch."""
    if interval not in ("auto", "step", "epoch"):
        raise ValueError(f"scheduler_interval={interval!r}: choose auto, step or epoch.")
    if interval != "auto":
        return interval
    if isinstance(scheduler, PER_STEP_SCHEDULERS):
        rank_zero_info(
            f"{type(scheduler).__name__} steps after every training step (scheduler_interval: auto); set "
            "--model.init_args.scheduler_interval epoch to step it once per epoch."
        )
        return "step"
    return "epoch"


def optimizers_from_factories(
    optimizer_factory: OptimizerCallable,
    scheduler_factory: LRSchedulerCallable | None,
    parameters: Iterator[nn.Parameter],
    interval: SchedulerInterval = "auto",
):
    """``configure_optimizers``' return value from the config's optimiser and optional scheduler factories.

    The scheduler steps as :func:`scheduler_step_interval` says; ``ReduceLROnPlateau`` monitors ``val/loss``.
    """
    optimizer = optimizer_factory(parameters)
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer)
    config = {"scheduler": scheduler, "interval": scheduler_step_interval(scheduler, interval)}
    if isinstance(scheduler, ReduceLROnPlateau):
        config["monitor"] = "val/loss"
    return {"optimizer": optimizer, "lr_scheduler": config}
