"""Exponentially smoothed training curves (notes: "if the curves look too noisy, plot an exponential moving
average"), logged per epoch and drawn as one figure at the end of ``fit``.

The smoothing of *Deep Learning with Python*: ``s_0 = x_0``, ``s_t = factor * s_{t-1} + (1 - factor) * x_t``.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from callbacks.images import save_and_log_figure

__all__ = ["SmoothedCurves"]

# A metric whose name contains one of these is better when higher (for marking the best epoch).
_HIGHER_IS_BETTER = ("acc", "auc", "f1", "precision", "recall", "iou", "dice")


def _split(key: str) -> tuple[str, str]:
    """``"val/acc"`` -> ``("val", "acc")``; a key without ``/`` is its own metric with an empty stage."""
    stage, sep, name = key.partition("/")
    return (stage, name) if sep else ("", key)


class SmoothedCurves(Callback):
    """Log an EMA of epoch-level metrics as ``<key>_ema`` and plot raw and smoothed curves at the end of fit.

    At every training epoch end (in Lightning 2.x after that epoch's validation, so train and val values of
    the same epoch are both in ``trainer.callback_metrics``) the raw value of each tracked key is recorded,
    its EMA updated and logged as ``<key>_ema`` (e.g. ``val/acc_ema``), which ``ModelCheckpoint`` can
    monitor. Keys starting with ``val/`` or ``val_`` are recorded only in epochs in which validation ran, so
    ``check_val_every_n_epoch > 1`` does not repeat stale values.

    At the end of ``fit``, global rank zero draws one subplot per metric name (``loss``, ``acc``, ...) with
    train and val curves against the epoch, raw (thin, transparent) and smoothed (solid), marks the epoch
    of the best smoothed val value (highest for accuracy-like names, lowest otherwise) and saves it as
    ``<run dir>/<filename>.png`` and to the loggers that take images. The recorded history is in
    :meth:`state_dict`, so a resumed run continues its curves.

    Args:
        factor: Smoothing factor in [0, 1): weight of the previous smoothed value (0 = no smoothing).
        keys: Metric keys to track. ``None``: every scalar key starting with ``train/`` or ``val/`` found in
            ``trainer.callback_metrics``, except ``*_ema``, ``*_step`` and ``*_epoch`` duplicates.
        filename: Name of the figure (without ``.png``), relative to the run folder.
    """

    def __init__(self, factor: float = 0.8, keys: list[str] | None = None, filename: str = "curves") -> None:
        super().__init__()
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"factor={factor}: the smoothing factor must lie in [0, 1).")
        self.factor = factor
        self.keys = list(keys) if keys is not None else None
        self.filename = filename
        self.history: dict[str, list[float]] = {}
        self.smoothed: dict[str, list[float]] = {}
        self.epochs: dict[str, list[int]] = {}
        self._validated = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(factor=self.factor, keys=self.keys, filename=self.filename)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "smoothed": self.smoothed, "epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state_dict["history"].items()}
        self.smoothed = {k: list(v) for k, v in state_dict["smoothed"].items()}
        self.epochs = {k: list(v) for k, v in state_dict["epochs"].items()}

    # ---- recording -----------------------------------------------------------------------------------
    @staticmethod
    def default_keys(metrics: dict[str, Any]) -> list[str]:
        """The keys tracked when ``keys`` is ``None``."""
        keys = []
        for key, value in metrics.items():
            if not key.startswith(("train/", "val/")) or key.endswith(("_ema", "_step")):
                continue
            if key.endswith("_epoch") and key.removesuffix("_epoch") in metrics:
                continue  # logged with on_step and on_epoch: ``key`` duplicates the bare name
            if isinstance(value, Tensor) and value.numel() != 1:
                continue
            keys.append(key)
        return keys

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        keys = self.keys if self.keys is not None else self.default_keys(metrics)
        for key in keys:
            if key not in metrics or (key.startswith(("val/", "val_")) and not self._validated):
                continue
            value = float(metrics[key])
            previous = self.smoothed.get(key)
            smoothed = value if not previous else self.factor * previous[-1] + (1 - self.factor) * value
            self.history.setdefault(key, []).append(value)
            self.smoothed.setdefault(key, []).append(smoothed)
            self.epochs.setdefault(key, []).append(trainer.current_epoch)
            # The inputs are epoch aggregates, normally equal on every process; syncing (a mean of equal
            # values) costs one tiny all-reduce per key and epoch and avoids Lightning's DDP warning.
            pl_module.log(f"{key}_ema", smoothed, on_step=False, on_epoch=True, sync_dist=True)
        self._validated = False

    # ---- plotting ------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.keys is not None and (missing := [k for k in self.keys if k not in self.history]):
            rank_zero_warn(f"SmoothedCurves: {missing} were never logged; available: {list(trainer.callback_metrics)}")
        if trainer.is_global_zero and self.history:
            save_and_log_figure(trainer, self.figure(), self.filename)

    def figure(self) -> Figure:
        """The curves figure: one subplot per metric name, train vs val, raw and smoothed, best val marked."""
        names: dict[str, list[str]] = {}
        for key in self.history:
            names.setdefault(_split(key)[1], []).append(key)
        ncols = min(len(names), 3)
        nrows = math.ceil(len(names) / ncols)
        fig = Figure(figsize=(4.5 * ncols, 3.4 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[len(names) :]:
            ax.set_visible(False)
        for ax, (name, keys) in zip(axes, names.items(), strict=False):
            for i, key in enumerate(sorted(keys, key=lambda k: (_split(k)[0] != "train", k))):
                stage = _split(key)[0]
                color = {"train": "C0", "val": "C1"}.get(stage, f"C{i + 2}")
                label = stage or key
                ax.plot(self.epochs[key], self.history[key], color=color, alpha=0.35, linewidth=1)
                ax.plot(self.epochs[key], self.smoothed[key], color=color, linewidth=2, label=f"{label} (EMA)")
                if stage == "val":
                    self._mark_best(ax, key, name, color)
            ax.set_title(name)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(f"Epoch curves, thin: raw, solid: EMA (factor {self.factor:g})", fontsize="medium")
        return fig

    def _mark_best(self, ax: Any, key: str, name: str, color: str) -> None:
        values = self.smoothed[key]
        candidates = [i for i, v in enumerate(values) if math.isfinite(v)]
        if not candidates:
            return
        higher = any(word in name.lower() for word in _HIGHER_IS_BETTER)
        index = (max if higher else min)(candidates, key=values.__getitem__)  # first one on ties
        epoch, best = self.epochs[key][index], values[index]
        ax.axvline(epoch, color=color, linestyle="--", linewidth=1)
        ax.plot([epoch], [best], marker="o", color=color)
        left = epoch > (self.epochs[key][0] + self.epochs[key][-1]) / 2  # keep the label inside the axes
        ax.annotate(
            f"best {best:.4g} @ {epoch}",
            (epoch, best),
            textcoords="offset points",
            xytext=(-4 if left else 4, 6),
            ha="right" if left else "left",
            fontsize="small",
            color=color,
        )
