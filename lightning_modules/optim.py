"""The optimiser and learning-rate scheduler of a module, from the config's factories.

``--model.init_args.optimizer`` and ``--model.init_args.lr_scheduler`` are factories (LightningCLI builds them from
the YAML); :func:`optimizers_from_factories` turns them into ``configure_optimizers``' return value, and
:func:`scheduler_step_interval` decides whether the scheduler steps after every training step or every epoch.
A ``OneCycleLR`` given neither ``total_steps`` nor ``epochs`` gets the run's length (``total_steps`` = the trainer's
``estimated_stepping_batches``), so the cycle follows ``max_epochs``, the data size, ``accumulate_grad_batches`` and
the number of devices without arithmetic in the config. Modules keep their factories wrapped in :class:`SharedFactory`,
so that a copy of a module (weight averaging) shares them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LinearLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

__all__ = [
    "PER_STEP_SCHEDULERS",
    "SchedulerInterval",
    "SharedFactory",
    "build_scheduler",
    "optimizers_from_factories",
    "run_total_steps",
    "scheduler_step_interval",
]

SchedulerInterval = Literal["auto", "step", "epoch"]
# Schedulers whose lengths count training steps: OneCycleLR's total_steps, CyclicLR's step_size_up, and a LinearLR
# warm-up's total_iters as modern recipes use it.
PER_STEP_SCHEDULERS = (OneCycleLR, CyclicLR, LinearLR)


class SharedFactory:
    """An optimiser or scheduler factory that copies of its module share instead of copying.

    LightningCLI builds ``--model.init_args.optimizer`` as a partial around a jsonargparse instantiator that holds a
    lock, so ``copy.deepcopy(model)`` failed with "cannot pickle '_thread.lock' object"; Lightning's
    ``EMAWeightAveraging``/``WeightAveraging`` and ``StochasticWeightAveraging`` copy the model that way
    (``torch.optim.swa_utils.AveragedModel``). A factory is configuration, not state: a copy may share it.
    """

    def __init__(self, factory: Callable) -> None:
        self.factory = factory

    def __call__(self, *args, **kwargs):
        return self.factory(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> SharedFactory:
        return self

    def __repr__(self) -> str:
        return f"SharedFactory({self.factory!r})"

    @classmethod
    def wrap(cls, factory: Callable | None) -> SharedFactory | None:
        """``factory`` wrapped (once); ``None`` stays ``None`` (no scheduler)."""
        return factory if factory is None or isinstance(factory, cls) else cls(factory)


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


def run_total_steps(trainer) -> int:
    """The run's optimiser steps (a OneCycleLR's default length): Lightning's estimate from the trainer.

    A resumed fit restores the scheduler's state, ``total_steps`` included, from the checkpoint, so it needs no
    estimate: Lightning's would load the training data before the restore, and the loader would then start the
    interrupted epoch at its beginning instead of where the run stopped.
    """
    if trainer.ckpt_path is not None:
        return 1  # replaced by the checkpoint's total_steps (OneCycleLR.load_state_dict)
    return int(trainer.estimated_stepping_batches)


def build_scheduler(
    scheduler_factory: LRSchedulerCallable, optimizer: Optimizer, total_steps: Callable[[], int] | None = None
) -> LRScheduler | ReduceLROnPlateau:
    """The scheduler of ``scheduler_factory``; a ``OneCycleLR`` without a length gets ``total_steps()`` steps."""
    try:
        return scheduler_factory(optimizer)
    except ValueError as err:  # OneCycleLR: "You must define either total_steps OR (epochs AND steps_per_epoch)"
        if total_steps is None or "total_steps" not in str(err):
            raise
        steps = int(total_steps())
    scheduler = scheduler_factory(optimizer, total_steps=steps)
    rank_zero_info(f"{type(scheduler).__name__}: total_steps = {steps} (the run's training steps).")
    return scheduler


def optimizers_from_factories(
    optimizer_factory: OptimizerCallable,
    scheduler_factory: LRSchedulerCallable | None,
    parameters: Iterator[nn.Parameter],
    interval: SchedulerInterval = "auto",
    total_steps: Callable[[], int] | None = None,
):
    """``configure_optimizers``' return value from the config's optimiser and optional scheduler factories.

    The scheduler steps as :func:`scheduler_step_interval` says; ``ReduceLROnPlateau`` monitors ``val/loss``.
    ``total_steps`` (called only when needed) gives the run's number of optimiser steps to a ``OneCycleLR`` whose
    config sets neither ``total_steps`` nor ``epochs``.
    """
    optimizer = optimizer_factory(parameters)
    if scheduler_factory is None:
        return optimizer
    scheduler = build_scheduler(scheduler_factory, optimizer, total_steps)
    config = {"scheduler": scheduler, "interval": scheduler_step_interval(scheduler, interval)}
    if isinstance(scheduler, ReduceLROnPlateau):
        config["monitor"] = "val/loss"
    return {"optimizer": optimizer, "lr_scheduler": config}
