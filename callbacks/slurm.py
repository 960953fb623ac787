"""SLURM preemption: Lightning's auto-requeue, with its checkpoint taken where a resume is exact, and nothing after it.

Under SLURM, Lightning (``SLURMEnvironment(auto_requeue=True)``, its default there) handles the requeue signal
(``#SBATCH --signal=SIGUSR1@90``) by saving ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` and calling
``scontrol requeue``; the requeued job resumes from that file. Lightning saves inside the signal handler, i.e.
wherever the signal interrupts the process, and then trains on until SLURM kills the job. Both break an exact
resume: a checkpoint taken in the middle of an epoch's *last* training step resumes without that epoch's
validation (an ``EarlyStopping`` on a validation metric then ends the requeued job with an error), and the epoch
the old job goes on to validate before it is killed is validated again by the requeued job (1 requeue in 8 in
this repository's test before :class:`SafeRequeue` stopped the job right after the checkpoint).
:class:`SafeRequeue` keeps Lightning's mechanism, moves the moment of the checkpoint and ends the job there.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities import rank_zero_info

__all__ = ["JobRequeued", "SafeRequeue"]


class JobRequeued(Exception):
    """Raised after the requeue checkpoint is saved and ``scontrol requeue`` was called: this process ends here,
    the requeued job continues the run. ``scripts/train.py`` exits with code 0 on it."""


class SafeRequeue(Checkpoint):
    """Defer Lightning's SLURM requeue handler to the end of the current training batch or epoch, then stop.

    When the sanity check or training starts, the handler Lightning installed for the requeue signal is replaced
    by one that only records the signal. At the end of every training batch but an epoch's last, and at the end of
    every training epoch (after its validation and after ``ModelCheckpoint``: this is a checkpoint callback too),
    a recorded signal runs Lightning's handler, which saves ``hpc_ckpt_<n>.ckpt`` and requeues the job, and then
    raises :class:`JobRequeued`, so that this process trains and validates nothing more. These are the moments
    Lightning's own checkpoints are taken at (``every_n_train_steps``, ``last.ckpt``), and the requeued job
    resumes from them exactly: with the next batch, or with the next epoch after a validated one, in the same run
    directory (``callbacks.runs``). Under DDP the ranks agree at each of these moments whether any of them got the
    signal (one all-reduce of a flag), so all save and stop together. Without an installed handler (not under
    SLURM, or ``auto_requeue=False``) the callback does nothing. SLURM's warning time (``--signal=SIGUSR1@90``)
    must cover the rest of a batch, or of an epoch's last batch plus its validation.

    Args:
        signum: The signal SLURM sends before the time limit or a preemption (``SIGUSR1``, Lightning's default).
    """

    def __init__(self, signum: int = int(signal.SIGUSR1)) -> None:
        super().__init__()
        self.signum = signal.Signals(signum)
        self._lightning_handler: Any = None
        self._received = False
        self._handled = False

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._received = True

    def _take_over(self) -> None:
        handler = signal.getsignal(self.signum)
        if self._lightning_handler is None and callable(handler) and handler != self._record:
            self._lightning_handler = handler  # Lightning's, registered just before the sanity check
            signal.signal(self.signum, self._record)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_over()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_over()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lightning_handler is not None:
            signal.signal(self.signum, self._lightning_handler)
            self._lightning_handler = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # After an epoch's last batch wait for the epoch end: saved here, the resumed job would skip that epoch's
        # validation. Every rank gets the same answer, so the collective below stays in step.
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._requeue_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._requeue_if_signalled(trainer)

    def _requeue_if_signalled(self, trainer: pl.Trainer) -> None:
        if self._lightning_handler is None or self._handled:
            return
        if trainer.strategy.reduce_boolean_decision(self._received, all=False):  # any rank signalled
            self._handled = True
            rank_zero_info(f"SafeRequeue: {self.signum.name} received; checkpointing at step {trainer.global_step}.")
            self._lightning_handler(self.signum, None)
            raise JobRequeued(
                f"SLURM job requeued at step {trainer.global_step} (epoch {trainer.current_epoch}); the requeued job "
                f"continues from {trainer.default_root_dir}/hpc_ckpt_<n>.ckpt."
            )
