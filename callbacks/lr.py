"""Learning-rate control from the trainer's side: Keras' plateau rule and the book's epoch step schedule.

Both callbacks write ``param_group["lr"]`` of every optimizer directly and multiply the value they find, so
they compose with each other and with PyTorch's *chainable* schedulers (``StepLR``, ``MultiStepLR``,
``ExponentialLR``), which also multiply the current lr.
Schedulers that recompute the lr from their ``base_lrs`` (``LambdaLR``, ``OneCycleLR``, ``CyclicLR``, ...)
overwrite the changes at their next step: do not combine those with these callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["EpochLRSchedule", "ReduceLROnPlateauCallback"]

Mode = Literal["min", "max", "auto"]


def _param_groups(trainer: pl.Trainer) -> list[dict[str, Any]]:
    return [group for optimizer in trainer.optimizers for group in optimizer.param_groups]


def _set_lr(group: dict[str, Any], lr: float) -> None:
    # Some optimizers hold the lr as a tensor (e.g. for CUDA graphs): update it in place, keep its type.
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _fmt_lrs(lrs: Sequence[float]) -> str:
    return ", ".join(f"{lr:.3g}" for lr in lrs)


class ReduceLROnPlateauCallback(Callback):
    """Multiply the learning rate by ``factor`` once ``monitor`` has stopped improving (Keras' callback).

    The monitored value is read from ``trainer.callback_metrics`` at the end of every validation run of
    ``fit`` (not the sanity check). A value better than the best so far by more than ``min_delta`` resets
    the count of bad epochs; after ``patience`` bad epochs in a row, the lr of every param group of every
    optimizer is multiplied by ``factor`` (never below ``min_lr``), then ``cooldown`` epochs are ignored.

    The callback changes ``param_group["lr"]`` directly instead of wrapping a scheduler, so it works with
    any module; see the module docstring for which schedulers it composes with. Do not also configure
    PyTorch's ``ReduceLROnPlateau`` in the module (a warning says so). The reduced lr is part of the
    optimizer state and the counters are in :meth:`state_dict`, so a resumed run continues where it stopped.

    Under DDP the value of global rank zero is broadcast, so every process takes the same decision.

    Args:
        monitor: Key in ``trainer.callback_metrics``, e.g. ``val/loss`` or ``val/acc``.
        mode: ``min`` (lower is better), ``max``, or ``auto``: ``max`` when ``acc`` is in the key (Keras).
        factor: Multiplier of the lr on each reduction, in (0, 1).
        patience: Number of epochs without improvement after which the lr is reduced.
        min_delta: Smallest change of the monitored value that counts as an improvement.
        cooldown: Number of epochs after a reduction in which bad epochs are not counted. (Keras restarts
            the count in the last cooldown epoch already, so its ``cooldown=1`` is a no-op; here the count
            restarts after ``cooldown`` epochs, as documented by Keras and done by PyTorch.)
        min_lr: Lower bound of the lr of every param group.
        verbose: Print a message (rank zero) on each reduction.
        check_on_train_epoch_end: Check at the end of the training epoch instead of after validation, for
            monitoring a training metric or a run without validation.
        log_key: Key under which the lr of the first param group of the first optimizer is logged at every
            training epoch end; ``None`` disables it (``LearningRateMonitor`` logs every group).
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: Mode = "auto",
        factor: float = 0.1,
        patience: int = 10,
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        verbose: bool = True,
        check_on_train_epoch_end: bool = False,
        log_key: str | None = "lr",
    ) -> None:
        super().__init__()
        if mode not in ("min", "max", "auto"):
            raise ValueError(f"mode={mode!r}: choose 'min', 'max' or 'auto'.")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor={factor}: the lr multiplier must lie in (0, 1).")
        for arg, value in (
            ("patience", patience),
            ("cooldown", cooldown),
            ("min_delta", min_delta),
            ("min_lr", min_lr),
        ):
            if value < 0:
                raise ValueError(f"{arg}={value} must not be negative.")
        self.monitor = monitor
        self.mode: Literal["min", "max"] = ("max" if "acc" in monitor else "min") if mode == "auto" else mode
        self.factor = factor
        self.patience = patience
        self.min_delta = min_delta
        self.cooldown = cooldown
        self.min_lr = min_lr
        self.verbose = verbose
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.log_key = log_key
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait = 0
        self.cooldown_counter = 0
        self.num_reductions = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "wait": self.wait,
            "cooldown_counter": self.cooldown_counter,
            "num_reductions": self.num_reductions,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.wait = int(state_dict["wait"])
        self.cooldown_counter = int(state_dict["cooldown_counter"])
        self.num_reductions = int(state_dict.get("num_reductions", 0))

    # ---- hooks ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(config.reduce_on_plateau for config in trainer.lr_scheduler_configs):
            rank_zero_warn(
                "The module configures a ReduceLROnPlateau scheduler and the ReduceLROnPlateauCallback is "
                "active too: both will cut the lr. Keep one of them."
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.check_on_train_epoch_end and not self._skip(trainer):
            self._check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_on_train_epoch_end and not self._skip(trainer):
            self._check(trainer)
        groups = _param_groups(trainer)
        if self.log_key and groups:
            # Equal on every process; sync_dist only avoids Lightning's DDP warning (a mean of equal values).
            pl_module.log(self.log_key, float(groups[0]["lr"]), on_step=False, on_epoch=True, sync_dist=True)

    # ---- logic ---------------------------------------------------------------------------------------
    @staticmethod
    def _skip(trainer: pl.Trainer) -> bool:
        return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def is_better(self, current: float) -> bool:
        """Whether ``current`` improves on the best value by more than ``min_delta``."""
        if self.mode == "min":
            return current < self.best - self.min_delta
        return current > self.best + self.min_delta

    def _check(self, trainer: pl.Trainer) -> None:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise RuntimeError(
                f"ReduceLROnPlateauCallback monitors `{self.monitor}`, which was not logged. Available metrics: "
                f"`{'`, `'.join(metrics) or '(none)'}`. Pass one of them as `monitor` (or log `{self.monitor}`)."
            )
        current = float(trainer.strategy.broadcast(float(metrics[self.monitor]), src=0))
        self.step(current, trainer)

    def step(self, current: float, trainer: pl.Trainer) -> bool:
        """Account for one epoch with monitored value ``current``; returns whether the lr was reduced."""
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
            if self.is_better(current):
                self.best = current
            return False
        if self.is_better(current):
            self.best = current
            self.wait = 0
            return False
        self.wait += 1
        if self.wait < self.patience:
            return False
        groups = _param_groups(trainer)
        old = [float(group["lr"]) for group in groups]
        new = [max(lr * self.factor, self.min_lr) if lr > self.min_lr else lr for lr in old]
        if new == old:  # every group already at min_lr: nothing to do
            return False
        for group, lr in zip(groups, new, strict=True):
            _set_lr(group, lr)
        self.wait = 0
        self.cooldown_counter = self.cooldown
        self.num_reductions += 1
        if self.verbose:
            rank_zero_info(
                f"Epoch {trainer.current_epoch}: ReduceLROnPlateauCallback: `{self.monitor}` did not improve on "
                f"{self.best:.5g} for {self.patience} epochs; lr {_fmt_lrs(old)} -> {_fmt_lrs(new)}."
            )
        return True


class EpochLRSchedule(Callback):
    """Step schedule by epoch: from epoch ``milestones[i]`` on, the lr is ``base_lr * factors[i]``.

    The book's long-training recipe, e.g. ``milestones=[80, 120, 160, 180]`` with
    ``factors=[0.1, 0.01, 0.001, 0.0005]``. Applied at the start of each training epoch (epochs count from
    0) to every param group of every optimizer; ``base_lr`` is each group's lr when training starts.

    At a milestone the current lr is multiplied by ``factors[i] / factors[i - 1]`` (by ``factors[0]`` at
    the first) rather than set to ``base_lr * factors[i]``, so changes made by others in between (e.g. a
    :class:`ReduceLROnPlateauCallback` cut) persist: with a plateau cut of 0.1 before epoch 80, the lr from epoch
    80 on is ``base_lr * 0.1 * 0.1``. Without such changes both readings agree. The base lrs and the
    factor in force are in :meth:`state_dict`, so a resumed run neither repeats nor skips a step.

    Args:
        milestones: Epochs (from 0) at which a factor starts; strictly increasing.
        factors: Multipliers of the base lr, one per milestone, each > 0.
        verbose: Print a message (rank zero) at each milestone.
    """

    def __init__(self, milestones: Sequence[int], factors: Sequence[float], verbose: bool = True) -> None:
        super().__init__()
        milestones, factors = [int(m) for m in milestones], [float(f) for f in factors]
        if len(milestones) != len(factors):
            raise ValueError(
                f"EpochLRSchedule needs one factor per milestone: got {len(milestones)} milestones "
                f"{milestones} and {len(factors)} factors {factors}."
            )
        if not milestones:
            raise ValueError("EpochLRSchedule needs at least one milestone.")
        if milestones[0] < 0 or any(b <= a for a, b in pairwise(milestones)):
            raise ValueError(f"milestones={milestones} must be non-negative and strictly increasing.")
        if any(not f > 0 for f in factors):  # also rejects NaN
            raise ValueError(f"factors={factors} must all be > 0.")
        self.milestones = milestones
        self.factors = factors
        self.verbose = verbose
        self.base_lrs: list[float] | None = None
        self.current_factor = 1.0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(milestones=self.milestones, factors=self.factors)

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": self.base_lrs, "current_factor": self.current_factor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_lrs = state_dict["base_lrs"]
        self.current_factor = float(state_dict["current_factor"])

    def factor_at(self, epoch: int) -> float:
        """The factor in force during ``epoch``: that of the last milestone <= ``epoch``, else 1."""
        factor = 1.0
        for milestone, f in zip(self.milestones, self.factors, strict=True):
            if epoch >= milestone:
                factor = f
        return factor

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = _param_groups(trainer)
        if self.base_lrs is None:
            self.base_lrs = [float(group["lr"]) for group in groups]
        target = self.factor_at(trainer.current_epoch)
        if target == self.current_factor:
            return
        old = [float(group["lr"]) for group in groups]
        new = [lr * target / self.current_factor for lr in old]
        for group, lr in zip(groups, new, strict=True):
            _set_lr(group, lr)
        if self.verbose:
            rank_zero_info(
                f"Epoch {trainer.current_epoch}: EpochLRSchedule: factor {self.current_factor:g} -> {target:g}; "
                f"lr {_fmt_lrs(old)} -> {_fmt_lrs(new)}."
            )
        self.current_factor = target
