"""SLURM preemption: Lightning's requeue recipe, with the checkpoint taken where a resume is exact, and nothing after.

Under SLURM, Lightning (``SLURMEnvironment(auto_requeue=True)``, its default there) handles the requeue signal
(``#SBATCH --signal=SIGUSR1@90``) by saving ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` and calling
``scontrol requeue``; the requeued job resumes from that file. Lightning saves inside the signal handler, i.e.
wherever the signal interrupts the process, and then trains on until SLURM kills the job. Both break an exact
resume: a checkpoint taken in the middle of an epoch's *last* training step resumes without that epoch's
validation (an ``EarlyStopping`` on a validation metric then ends the requeued job with an error), and the epoch
the old job goes on to validate before it is killed is validated again by the requeued job (1 requeue in 8 in
this repository's test before :class:`SafeRequeue`). :class:`SafeRequeue` keeps the recipe (same file names, same
command) but chooses the moment of the checkpoint and ends the job there.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["JobRequeued", "SafeRequeue", "hpc_checkpoint"]


class JobRequeued(Exception):
    """Raised after the requeue checkpoint is saved and ``scontrol requeue`` was called: this process ends here,
    the requeued job continues the run. ``scripts/train.py`` exits with code 0 on it."""


def hpc_checkpoint(folder: str | Path, new: bool = False) -> Path | None:
    """Lightning's requeue checkpoints are ``<default_root_dir>/hpc_ckpt_<n>.ckpt``: the one of highest ``n``
    (None if there is none), or with ``new`` the next file name to write."""
    folder = Path(folder)
    numbers = [
        int(m.group(1)) for p in folder.glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    if new:
        return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"
    return folder / f"hpc_ckpt_{max(numbers)}.ckpt" if numbers else None


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``$SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")


class SafeRequeue(Checkpoint):
    """Requeue a SLURM job at the end of the current training batch or epoch, then stop it.

    Under SLURM it installs, before Lightning would install its own, a handler for the requeue signal that only
    records it (Lightning leaves an existing handler in place). At the end of every training batch but an epoch's
    last, and at the end of every training epoch (after its validation and after ``ModelCheckpoint``: this is a
    checkpoint callback too), a recorded signal saves ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` and calls
    ``scontrol requeue`` (global rank zero), as Lightning's handler does. Once the metrics of that step or epoch
    are logged (at the next batch, validation or epoch start, or the end of training) it raises
    :class:`JobRequeued`: this process trains and validates nothing more, and no row of ``metrics.csv`` is lost or
    logged twice. The requeued job (same command) resumes from the file exactly, with the next batch or the next
    epoch, in the same run directory (:mod:`lifecycle.runs`). Under DDP the ranks agree at each of these moments
    whether any of them got the signal (one all-reduce of a flag), so all save and stop together. Outside SLURM,
    or where a handler for the signal exists already, the callback does nothing. SLURM's warning time
    (``--signal=SIGUSR1@90``) must cover the rest of a batch, or of an epoch's last batch plus its validation.

    Args:
        signum: The signal SLURM sends before the time limit or a preemption (``SIGUSR1``, Lightning's default).
    """

    def __init__(self, signum: int = int(signal.SIGUSR1)) -> None:
        super().__init__()
        self.signum = signal.Signals(signum)
        self._previous: Any = None
        self._installed = False
        self._received = False
        self._message: str | None = None  # set once the job is requeued: this process then stops

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._received = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not SLURMEnvironment.detect() or self._installed:
            return
        current = signal.getsignal(self.signum)
        leftover = isinstance(getattr(current, "__self__", None), SafeRequeue)  # of an earlier run in this process
        if current not in (None, signal.SIG_DFL) and not leftover:
            rank_zero_warn(f"SafeRequeue: {self.signum.name} already has a handler; leaving it in charge.")
            return
        self._previous, self._installed = current, True
        signal.signal(self.signum, self._record)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # After an epoch's last batch wait for the epoch end: saved here, the resumed job would skip that epoch's
        # validation. Every rank gets the same answer, so the collective below stays in step.
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._requeue_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._requeue_if_signalled(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._stop_if_requeued()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_requeued()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_requeued()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_requeued()

    def _stop_if_requeued(self) -> None:
        if self._message is not None:
            raise JobRequeued(self._message)

    def _requeue_if_signalled(self, trainer: pl.Trainer) -> None:
        if not self._installed or self._message is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self._received, all=False):  # any rank signalled
            return
        path = hpc_checkpoint(trainer.default_root_dir, new=True)
        rank_zero_info(f"SafeRequeue: {self.signum.name} received; saving {path} at step {trainer.global_step}.")
        trainer.save_checkpoint(path, weights_only=False)  # every rank takes part; rank zero writes
        job = slurm_job_id()
        if trainer.is_global_zero and job:
            result = subprocess.call(["scontrol", "requeue", job])
            (rank_zero_info if result == 0 else rank_zero_warn)(f"scontrol requeue {job}: exit code {result}.")
        self._message = (
            f"SLURM job {job} requeued at step {trainer.global_step} (epoch {trainer.current_epoch}); the requeued "
            f"job continues the run from {path}."
        )
