"""Baselines nothing may lose to (notes: *Baseline Models*): predictors that ignore the input.

- :class:`BaselineModule` with ``task="multiclass"``/``"binary"``: the **majority class** of the training split
  (its logits are the log class frequencies, so ``val/loss`` is the cross-entropy of the class prior: the loss
  a model reaches by learning nothing but the label distribution).
- ``task="regression"``: the **mean predictor** (the training targets' mean; its MAE and MSE are the floor a
  regressor has to beat).
- For sequences, the notes' naive forecast family as functions: :func:`naive_forecast` (tomorrow = today),
  :func:`average_forecast` (the mean so far), :func:`moving_average_forecast` and
  :func:`exponential_smoothing_forecast`.

The baseline "trains" for one epoch: it counts the training targets (summed over DDP processes) and then
predicts the constant. It runs through the same CLI, configs and metrics as every model
(``python scripts/train.py fit -c configs/baselines/digits_majority.yaml``), so a results table gets its floor
from the same code path.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_modules.base import SupervisedModule

# A baseline has nothing to optimise by design; Lightning's notice about it is noise.
warnings.filterwarnings("ignore", ".*`configure_optimizers` returned `None`.*")


class BaselineModule(SupervisedModule):
    """Majority-class (classification) or mean (regression) predictor, fitted on the training split.

    Args:
        **kwargs: See :class:`~lightning_modules.base.SupervisedModule` (``task``, ``num_classes``,
            ``input_shape``; optimiser, initialisation and regularisation options are accepted and unused).

    Nothing is optimised (manual optimisation, no optimiser); one training epoch gathers the statistics. More
    epochs change nothing: the statistics are reset at the start of every epoch.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        size = self.out_features if self.task == "multiclass" else 2  # binary: [negatives, positives]
        # counts (classification) or [sum, count] (regression), accumulated during the epoch
        self.register_buffer("sums", torch.zeros(size if self.task != "regression" else 2, dtype=torch.float64))
        # the fitted constant: logits (classification) or the mean (regression)
        self.register_buffer("constant", torch.zeros(self.out_features))
        self.net = torch.nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.constant.to(x.device).expand(len(x), -1)

    def configure_optimizers(self) -> None:
        return None

    def on_train_epoch_start(self) -> None:
        self.sums.zero_()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        _, y = batch
        if self.task == "regression":
            self.sums += torch.stack([y.double().sum(), torch.tensor(float(y.numel()), device=y.device)])
        elif y.is_floating_point() and self.task == "multiclass":  # one-hot / soft rows
            self.sums += y.double().sum(0)
        else:
            self.sums += torch.bincount(y.reshape(-1).long(), minlength=len(self.sums))[: len(self.sums)].double()

    def on_train_epoch_end(self) -> None:
        self._fit_from_all_ranks()

    def on_validation_epoch_start(self) -> None:
        # Lightning validates before on_train_epoch_end: fit now, so the epoch's val metrics are the baseline's.
        if self.trainer.state.fn == "fit" and self.sums.sum() > 0:
            self._fit_from_all_ranks()

    def _fit_from_all_ranks(self) -> None:
        sums = self.trainer.strategy.reduce(self.sums.clone(), reduce_op="sum")  # every rank saw its shard
        self.fit_constant(sums)

    @torch.no_grad()
    def fit_constant(self, sums: Tensor) -> None:
        """Set the prediction from the accumulated statistics (class counts, or ``[sum, count]``)."""
        if self.task == "regression":
            self.constant.fill_(float(sums[0] / sums[1].clamp_min(1)))
            return
        freq = (sums / sums.sum().clamp_min(1)).clamp_min(1e-7)
        if self.task == "multiclass":
            self.constant.copy_(freq.log().float())  # argmax = majority class, softmax = class prior
        else:
            self.constant.fill_(float(freq[1].log() - freq[0].log()))  # the prior's logit


# ---- naive forecasts for sequences (the notes' time-series baselines) ------------------------------------
def _check_series(series: Tensor) -> Tensor:
    series = torch.as_tensor(series, dtype=torch.float32)
    if series.ndim < 1 or series.shape[-1] < 1:
        raise ValueError(f"a series needs at least one step on its last dimension, got shape {tuple(series.shape)}")
    return series


def naive_forecast(series: Tensor) -> Tensor:
    """Forecast of step ``t + 1`` for every ``t``: the value at ``t`` ("tomorrow = today"). Shape as ``series``."""
    return _check_series(series).clone()


def average_forecast(series: Tensor) -> Tensor:
    """Forecast of step ``t + 1``: the mean of steps ``0..t`` (naive average)."""
    series = _check_series(series)
    steps = torch.arange(1, series.shape[-1] + 1, dtype=series.dtype)
    return series.cumsum(-1) / steps


def moving_average_forecast(series: Tensor, window: int) -> Tensor:
    """Forecast of step ``t + 1``: the mean of the last ``window`` steps up to ``t`` (fewer at the start)."""
    if window < 1:
        raise ValueError(f"window={window}: a moving average needs a window of at least 1 step.")
    series = _check_series(series)
    csum = torch.nn.functional.pad(series.cumsum(-1), (1, 0))
    ends = torch.arange(1, series.shape[-1] + 1)
    starts = (ends - window).clamp_min(0)
    return (csum[..., ends] - csum[..., starts]) / (ends - starts).to(series.dtype)


def exponential_smoothing_forecast(series: Tensor, alpha: float = 0.3) -> Tensor:
    """Forecast of step ``t + 1``: ``s_t = alpha * x_t + (1 - alpha) * s_{t-1}``, ``s_0 = x_0``."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: the smoothing weight of the newest value must lie in (0, 1].")
    series = _check_series(series)
    out = torch.empty_like(series)
    out[..., 0] = series[..., 0]
    for t in range(1, series.shape[-1]):
        out[..., t] = alpha * series[..., t] + (1 - alpha) * out[..., t - 1]
    return out
