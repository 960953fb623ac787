"""Stop a diverged run at once, with one message, before any of its non-finite weights is saved.

A loss that becomes NaN or infinite stays so: without a check, the run trains on for its whole budget, saves
NaN checkpoints (a ModelCheckpoint even files the first one as "best"), and an ``EarlyStopping`` on the loss ends
it quietly with exit code 0. :class:`FiniteLossGuard` raises :class:`NonFiniteLossError` instead, which the CLI
prints as one paragraph (step, epoch, the loss, the learning rate, what to try) with a non-zero exit code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

__all__ = ["FiniteLossGuard", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a loss became NaN or infinite. The message says where and what to try."""


def _loss(outputs: Any) -> Tensor | None:
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return outputs if isinstance(outputs, Tensor) else None


class FiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` when the training loss, or a logged ``*loss`` metric, is not finite.

    The training loss (what ``training_step`` returns) is checked after every step on the CPU, where the check
    costs nothing; on an accelerator the steps' verdicts are combined on the device and read every
    ``check_every_n_steps`` steps (reading forces a host-device sync), before every validation and before every
    checkpoint is written, so that no checkpoint of diverged weights is ever saved. At the end of each validation
    and training epoch the logged metrics whose name ends in ``loss`` (``val/loss``, a GAN's ``train/d_loss``, ...)
    are checked too. Under DDP the ranks agree on the verdict, so all stop together. ``scripts/train.py`` adds it
    to every ``fit``.

    Args:
        check_every_n_steps: On an accelerator, read the accumulated verdict this often (in training steps).
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        self.check_every_n_steps = check_every_n_steps
        self._finite: Tensor | None = None  # all steps since the last check had a finite loss (on the device)
        self._checked_step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args) -> None:
        loss = _loss(outputs)
        if loss is None:
            return
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        if loss.device.type == "cpu" or trainer.global_step - self._checked_step >= self.check_every_n_steps:
            self._check_steps(trainer, loss)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check_steps(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._check_steps(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check_metrics(trainer, "validation")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_steps(trainer)
        self._check_metrics(trainer, "training epoch")

    def _check_steps(self, trainer: pl.Trainer, loss: Tensor | None = None) -> None:
        if self._finite is None:
            return
        bad = not bool(self._finite)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        first, self._finite, self._checked_step = self._checked_step + 1, None, trainer.global_step
        if bad:  # the message is built only then: this runs after every step on a CPU
            now = trainer.global_step
            steps = f"step {now}" if now <= first else f"one of steps {first}-{now}"
            shown = loss is not None and loss.numel() == 1 and not math.isfinite(float(loss))
            value = f"{float(loss)}" if shown else "NaN or infinite"
            self._stop(trainer, f"The training loss became {value} at {steps}")

    def _check_metrics(self, trainer: pl.Trainer, when: str) -> None:
        bad = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.endswith("loss") and value.numel() == 1 and not math.isfinite(float(value))
        }
        if trainer.world_size > 1:
            bad = bad if trainer.strategy.reduce_boolean_decision(bool(bad), all=False) else {}
        if bad:
            found = ", ".join(f"{key} = {value}" for key, value in sorted(bad.items()))
            self._stop(trainer, f"After the {when} at step {trainer.global_step}, {found}")

    @staticmethod
    def _stop(trainer: pl.Trainer, what: str) -> None:
        optimizers = trainer.optimizers
        lr = optimizers[0].param_groups[0].get("lr") if optimizers and optimizers[0].param_groups else None
        lr_text = f" The learning rate is {lr:g}: too high a rate makes the updates overflow." if lr else ""
        raise NonFiniteLossError(
            f"{what} (epoch {trainer.current_epoch}), so training was stopped; no checkpoint of the diverged "
            f"weights was written.{lr_text} Lower the learning rate (--model.init_args.optimizer.init_args.lr), "
            "clip the gradients (--trainer.gradient_clip_val 1.0), or look for NaN/inf in the inputs; then start "
            "again, or resume the last good state with --ckpt_path last."
        )
