"""SLURM preemption: Lightning's auto-requeue, with its checkpoint taken where a resume is exact.

Under SLURM, Lightning (``SLURMEnvironment(auto_requeue=True)``, its default there) handles the requeue signal
(``#SBATCH --signal=SIGUSR1@90``) by saving ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` and calling
``scontrol requeue``; the requeued job resumes from that file on its own. Lightning saves inside the signal
handler, i.e. wherever the signal interrupts the process. A checkpoint taken in the middle of the *last* training
step of an epoch resumes without that epoch's validation, and an ``EarlyStopping`` on a validation metric (every
config here has one) then ends the requeued job with "Early stopping conditioned on metric ... which is not
available" (Lightning 2.6; 4 of 6 trials of this repository's requeue test, whose epochs are one step long).
:class:`SafeRequeue` keeps Lightning's mechanism and only moves the moment of the checkpoint.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

__all__ = ["SafeRequeue"]


class SafeRequeue(Callback):
    """Defer Lightning's SLURM requeue handler to the end of the current training batch or epoch.

    When training starts, the handler Lightning installed for the requeue signal is replaced by one that only
    records the signal. At the end of every training batch but an epoch's last, and at the end of every training
    epoch (after its validation), a recorded signal runs Lightning's handler: it saves ``hpc_ckpt_<n>.ckpt`` and
    requeues the job. These are moments Lightning's own checkpoints are taken at (``every_n_train_steps``,
    ``last.ckpt``), and the requeued job resumes from them exactly: with the next batch, or with the next epoch
    after a validated one. The callback's epoch-end hook runs before EarlyStopping's and ModelCheckpoint's, so
    their decision on that one epoch is not in the hpc checkpoint (the best-checkpoint file they write right
    after is kept on disk). Under DDP the ranks agree at each of these moments whether any of them got the
    signal (one all-reduce of a flag), so all save together. Without an installed handler (not under SLURM, or
    ``auto_requeue=False``) the callback does nothing. SLURM's warning time (``--signal=SIGUSR1@90``) must cover
    the rest of a batch, or of an epoch's last batch plus its validation.

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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        handler = signal.getsignal(self.signum)
        if callable(handler):  # Lightning's, registered just before training starts
            self._lightning_handler = handler
            signal.signal(self.signum, self._record)

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
