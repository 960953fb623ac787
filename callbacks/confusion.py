"""Confusion matrices at the end of validation and test, computed by torchmetrics and logged as pictures.

Accuracy hides *which* classes are confused; the matrix shows it. The callback reads the logits the module
already computes (a forward hook on the LightningModule: no second forward pass), turns them into class
predictions with the module's own rule (``_metric_inputs`` of :class:`~lightning_modules.base.SupervisedModule`:
argmax for multiclass, sign of the logit for binary, one-hot targets accepted), accumulates a torchmetrics
``ConfusionMatrix`` (summed across DDP processes when computed) and draws it on global rank zero, through
:func:`callbacks.images.save_and_log_figure` (PNG in the run folder, TensorBoard, W&B).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from torchmetrics.classification import BinaryConfusionMatrix, MulticlassConfusionMatrix

from callbacks.images import save_and_log_figure

__all__ = ["ConfusionMatrix", "confusion_figure"]


def confusion_figure(matrix: Tensor, classes: list[str], title: str, normalized: bool) -> Figure:
    """A heat map of ``matrix`` (rows: true class, columns: predicted), with counts or row fractions."""
    matrix = matrix.detach().cpu().float()
    n = len(classes)
    size = min(1.0 + 0.45 * n, 12.0)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=1 if normalized else None)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0, fontsize="small")
    ax.set_yticks(range(n), classes, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize="medium")
    if n <= 20:  # numbers stay legible
        peak = float(matrix.max()) or 1.0
        for i in range(n):
            for j in range(n):
                value = float(matrix[i, j])
                text = f"{value:.2f}" if normalized else f"{int(value)}"
                color = "white" if value > 0.6 * peak else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize="x-small", color=color)
    return fig


class ConfusionMatrix(Callback):
    """Plot the confusion matrix of the validation split every ``every_n_epochs`` epochs and of every test run.

    Args:
        stages: Which of ``val`` and ``test`` to plot.
        normalize: ``true`` divides each row by its count (recall per class on the diagonal), ``none`` keeps
            counts.
        every_n_epochs: Validation plots every n epochs (the last picture of a fit is always the newest).
        filename: Folder/prefix of the PNGs in the run folder: ``<filename>/val.png`` (overwritten, the
            loggers keep every epoch under one tag with a step slider) and ``<filename>/test.png``.

    Works with multiclass and binary :class:`~lightning_modules.base.SupervisedModule` subclasses; a
    regression module is skipped with no picture.
    """

    def __init__(
        self,
        stages: list[str] | tuple[str, ...] = ("val", "test"),
        normalize: str = "true",
        every_n_epochs: int = 1,
        filename: str = "confusion",
    ) -> None:
        super().__init__()
        if not set(stages) <= {"val", "test"}:
            raise ValueError(f"stages={list(stages)}: choose among 'val' and 'test'.")
        if normalize not in ("true", "none"):
            raise ValueError(f"normalize={normalize!r}: choose 'true' (row fractions) or 'none' (counts).")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs}: must be >= 1.")
        self.stages, self.normalize = tuple(stages), normalize
        self.every_n_epochs, self.filename = every_n_epochs, filename
        self.metric: MulticlassConfusionMatrix | BinaryConfusionMatrix | None = None
        self._handle: Any = None
        self._logits: Tensor | None = None

    # ---- capture -------------------------------------------------------------------------------------
    def _active(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> bool:
        if stage not in self.stages or trainer.sanity_checking or getattr(pl_module, "task", None) is None:
            return False
        if pl_module.task == "regression":
            return False
        return stage == "test" or (trainer.current_epoch + 1) % self.every_n_epochs == 0 or trainer.should_stop

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._active(trainer, pl_module, stage):
            return
        if pl_module.task == "multiclass":
            self.metric = MulticlassConfusionMatrix(pl_module.num_classes)
        else:
            self.metric = BinaryConfusionMatrix()
        self.metric = self.metric.to(pl_module.device)

        def keep_output(module: torch.nn.Module, args: Any, output: Tensor) -> None:
            self._logits = output.detach() if isinstance(output, Tensor) else None

        self._handle = pl_module.register_forward_hook(keep_output)

    def _batch_end(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if self._handle is None or self._logits is None:
            return
        preds, target = pl_module._metric_inputs(self._logits, batch[1])
        # Class indices, never scores: torchmetrics would guess whether floats are logits or probabilities.
        preds = preds.argmax(dim=-1) if pl_module.task == "multiclass" else (preds > 0).long()
        self.metric.update(preds, target)
        self._logits = None

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        matrix = self.metric.compute()  # all-reduced across processes by torchmetrics
        if self.normalize == "true":
            matrix = matrix.float() / matrix.sum(dim=1, keepdim=True).clamp_min(1)
        self.last_matrix = matrix.cpu()
        if trainer.is_global_zero:
            classes = self._classes(trainer, len(matrix))
            label = f"{stage}, epoch {trainer.current_epoch}" if stage == "val" else "test"
            fig = confusion_figure(matrix, classes, f"Confusion matrix ({label})", self.normalize == "true")
            save_and_log_figure(trainer, fig, f"{self.filename}/{stage}", tag=f"{self.filename}/{stage}")
        self.metric = None

    @staticmethod
    def _classes(trainer: pl.Trainer, n: int) -> list[str]:
        names = getattr(getattr(trainer, "datamodule", None), "classes", None)
        return [str(c) for c in names] if names is not None and len(names) == n else [str(i) for i in range(n)]

    # ---- hooks ---------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(pl_module, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "test")
