"""Stop where the training and validation trends part (notes: *Solutions to Avoid Overfitting*).

The notes' rule: "stop training near the epoch that starts to show the opposite trending between training
metrics and validation metrics ... it doesn't need the 2 curves to be close to each other, we just need to
check the moving trending (up or down) for each curve". Lightning's ``EarlyStopping`` looks at one curve (the
validation metric stopped improving); this callback looks at both: it stops when the training metric still
improves *and* the validation metric worsens, which separates overfitting from a plateau (both flat) or from
an optimisation problem (both worsening).

A *trend* is the slope of the least-squares line through the last ``window`` epochs of a curve, counted only
when it is significant: its t-statistic (slope / standard error) exceeds ``min_t``. The fitted line smooths
like the notes' moving averages but also measures the noise, so a noisy flat curve has no trend and does not
stop the run. The epoch to go back to is the best epoch of the EMA-smoothed validation curve (the notes'
smoothing, ``s_t = factor * s_{t-1} + (1 - factor) * x_t``, the formula of :class:`~callbacks.SmoothedCurves`);
with ``restore_best_weights`` the module gets that epoch's weights back when the callback stops the run.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["TrendDivergenceStopping", "trend_t_statistic"]


def trend_t_statistic(values: list[float]) -> float:
    """t-statistic of the least-squares slope of ``values`` against ``0..n-1`` (0 for fewer than 3 points).

    Positive for a rising curve, negative for a falling one; ``+-inf`` for an exact straight line.
    """
    n = len(values)
    if n < 3:
        return 0.0
    x = torch.arange(n, dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)
    xc = x - x.mean()
    sxx = float((xc * xc).sum())
    slope = float((xc * (y - y.mean())).sum()) / sxx
    residuals = y - y.mean() - slope * xc
    variance = float((residuals * residuals).sum()) / (n - 2)
    if variance <= 1e-24 * max(1.0, float((y * y).mean())):
        return 0.0 if slope == 0 else math.copysign(math.inf, slope)
    return slope / math.sqrt(variance / sxx)


class TrendDivergenceStopping(Callback):
    """Stop when the training metric keeps improving while the validation metric turns and worsens.

    Args:
        train_monitor: Training metric key (an epoch aggregate), e.g. ``train/loss``.
        val_monitor: The matching validation key, e.g. ``val/loss``.
        mode: ``min`` when lower is better for both (losses, errors), ``max`` when higher is (accuracy).
        window: Epochs in the least-squares trend of each curve (at least 3).
        min_t: |t-statistic| a slope needs to count as a trend (2 ~ 95 % for normal noise).
        patience: Consecutive epochs the trends must stay apart before the run stops.
        factor: EMA factor of the validation curve that picks the best epoch (0 = raw values).
        restore_best_weights: When stopping, load the weights of the best smoothed-validation epoch.
        verbose: Announce the stop (global rank zero).

    After ``fit``: ``stopped_epoch`` (``None`` if it never fired), ``divergence_epoch`` (first epoch of the
    stopping streak) and ``best_epoch`` (the best smoothed validation epoch) tell where the trends parted.
    """

    def __init__(
        self,
        train_monitor: str = "train/loss",
        val_monitor: str = "val/loss",
        mode: Literal["min", "max"] = "min",
        window: int = 5,
        min_t: float = 2.0,
        patience: int = 3,
        factor: float = 0.6,
        restore_best_weights: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r}: choose 'min' (losses, errors) or 'max' (accuracies).")
        if window < 3:
            raise ValueError(f"window={window}: a trend with a noise estimate needs at least 3 epochs.")
        if patience < 1 or min_t < 0 or not 0.0 <= factor < 1.0:
            raise ValueError(
                f"patience={patience}, min_t={min_t}, factor={factor}: need patience >= 1, min_t >= 0 and "
                "0 <= factor < 1."
            )
        self.train_monitor, self.val_monitor, self.mode = train_monitor, val_monitor, mode
        self.window, self.min_t, self.patience, self.factor = window, min_t, patience, factor
        self.restore_best_weights, self.verbose = restore_best_weights, verbose
        self.train_history: list[float] = []
        self.val_history: list[float] = []
        self.val_smoothed: list[float] = []
        self.epochs: list[int] = []
        self.wait = 0
        self.best_epoch: int | None = None
        self.divergence_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._best_value: float | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._validated = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(train_monitor=self.train_monitor, val_monitor=self.val_monitor)

    def state_dict(self) -> dict[str, Any]:
        keys = ("train_history", "val_history", "val_smoothed", "epochs", "wait", "best_epoch", "divergence_epoch")
        return {k: copy.copy(getattr(self, k)) for k in keys} | {"best_value": self._best_value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            setattr(self, "_best_value" if key == "best_value" else key, copy.copy(value))

    # ---- the rule, independent of Lightning (tests drive it with scripted curves) -------------------
    def _improving(self, t: float) -> bool:
        return t <= -self.min_t if self.mode == "min" else t >= self.min_t

    def _worsening(self, t: float) -> bool:
        return t >= self.min_t if self.mode == "min" else t <= -self.min_t

    def update(self, epoch: int, train_value: float, val_value: float) -> bool:
        """Record one epoch; True when the run should stop. Also tracks the best smoothed validation epoch."""
        self.epochs.append(epoch)
        self.train_history.append(train_value)
        self.val_history.append(val_value)
        previous = self.val_smoothed[-1] if self.val_smoothed else val_value
        smoothed = self.factor * previous + (1 - self.factor) * val_value
        self.val_smoothed.append(smoothed)
        better = self._best_value is None or (
            smoothed < self._best_value if self.mode == "min" else smoothed > self._best_value
        )
        if better and math.isfinite(smoothed):
            self._best_value, self.best_epoch = smoothed, epoch
        if len(self.epochs) < self.window:
            return False
        t_train = trend_t_statistic(self.train_history[-self.window :])
        t_val = trend_t_statistic(self.val_history[-self.window :])
        if self._improving(t_train) and self._worsening(t_val):
            self.wait += 1
            if self.wait == 1:
                self.divergence_epoch = epoch
        else:
            self.wait = 0
            self.divergence_epoch = None
        return self.wait >= self.patience

    # ---- Lightning hooks -------------------------------------------------------------------------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # In Lightning 2.x the epoch's validation has run by now: both epoch aggregates are available.
        if not self._validated:
            return
        self._validated = False
        metrics = trainer.callback_metrics
        missing = [k for k in (self.train_monitor, self.val_monitor) if k not in metrics]
        if missing:
            rank_zero_warn(
                f"TrendDivergenceStopping: {missing} not logged (available: {sorted(metrics)}). Log them as epoch "
                "aggregates or set train_monitor/val_monitor to keys the module logs."
            )
            return
        stop = self.update(trainer.current_epoch, float(metrics[self.train_monitor]), float(metrics[self.val_monitor]))
        if self.best_epoch == trainer.current_epoch and self.restore_best_weights:
            self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        # Metrics are synced epoch aggregates, so every rank decides the same; reduce anyway, as EarlyStopping.
        stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not trainer.should_stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            if self.restore_best_weights and self._best_state is not None:
                pl_module.load_state_dict(self._best_state)
            if self.verbose:
                restored = " (its weights restored)" if self.restore_best_weights else ""
                rank_zero_info(
                    f"TrendDivergenceStopping: {self.train_monitor} improving while {self.val_monitor} worsens since "
                    f"epoch {self.divergence_epoch}; stopping at epoch {self.stopped_epoch}. Best smoothed "
                    f"{self.val_monitor} at epoch {self.best_epoch}{restored}."
                )
