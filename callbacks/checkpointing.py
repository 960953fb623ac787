"""The callbacks behind exact resumes: an always-fresh ``last.ckpt`` and the state Lightning's checkpoints leave out.

- :class:`LastCheckpoint` keeps ``checkpoints/last.ckpt`` the end of the newest finished epoch (and, if asked,
  the newest mid-epoch state), whatever the monitored metric does.
- :class:`ResumeState` saves what Lightning's checkpoints leave out for an exact resume: the random-number
  states of every rank (dropout masks), how many rows ``metrics.csv`` had and which run directory wrote it.
  With the datamodules' :class:`~datamodules.loaders.ResumableDataLoader` (data order and position) a run killed
  mid-epoch and resumed from its last checkpoint ends with the same weights as an uninterrupted run (on CPU,
  deterministic ops).

Crash-safe writes and reading checkpoints are elsewhere: :mod:`lifecycle.checkpoint_io` and
:mod:`lightning_modules.checkpoints`.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from callbacks.images import run_dir

__all__ = ["LastCheckpoint", "ResumeState"]


# ---- random-number states ------------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), NumPy and Python RNG states, as types ``weights_only`` loads."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": (has_gauss, cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states returned by :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], *numpy["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _csv_rows(logger: CSVLogger) -> int:
    """Data rows of ``logger``'s metrics.csv after flushing it (0 before its first row)."""
    logger.save()
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return 0
    with path.open(newline="") as file:
        return max(sum(1 for _ in csv.reader(file)) - 1, 0)


class ResumeState(Callback):
    """Checkpoints the state an exact resume needs beyond Lightning's own (which omits RNG states).

    Saved with every checkpoint: the torch/CUDA/NumPy/Python RNG states of every rank (gathered to rank zero,
    which writes the file), the number of rows of each CSVLogger's metrics.csv, flushed at that moment, and the
    run directory (so that a checkpoint saved elsewhere, such as SLURM's ``hpc_ckpt_<n>.ckpt``, still names its
    run). On resume the RNG states are restored when training starts (after the sanity check, just before the
    first batch), so the resumed run draws the same dropout masks as an uninterrupted one; a rank without a
    saved state (more processes than before) takes rank zero's, which is what equal seeds give anyway.
    :mod:`lifecycle.runs` uses the row counts and the directory to continue ``metrics.csv``.
    """

    def __init__(self) -> None:
        self._owner: pl.Trainer | None = None
        self._to_restore: list[dict[str, Any]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._owner = trainer

    def state_dict(self) -> dict[str, Any]:
        states = [rng_states()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank saves a checkpoint together (Trainer.save_checkpoint ends in a barrier), rank zero writes.
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, rng_states())
        if self._owner is None:
            return {"rng": states}
        csv_rows = [_csv_rows(logger) for logger in self._owner.loggers if isinstance(logger, CSVLogger)]
        return {"rng": states, "csv_rows": csv_rows, "run_dir": str(run_dir(self._owner).resolve())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._to_restore:
            rank = trainer.global_rank
            set_rng_states(self._to_restore[rank] if rank < len(self._to_restore) else self._to_restore[0])
            self._to_restore = None


class LastCheckpoint(Checkpoint):
    """Keep ``checkpoints/last.ckpt`` the newest state of the run, whatever the monitored metric does.

    Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when it also saves a top-k
    checkpoint (Lightning 2.6): a run whose metric stops improving leaves it at the best epoch, and
    ``--ckpt_path last`` would resume or test stale weights. This callback saves it at the end of every training
    epoch (after its validation, the moment ``ModelCheckpoint`` saves at, which Lightning resumes from exactly)
    and, with ``every_n_train_steps``, every N optimiser steps inside an epoch, for long epochs. It writes beside
    the first ``ModelCheckpoint``'s files (else ``<run dir>/checkpoints``) through the strategy's checkpoint IO
    (atomic writes), and runs after every ``ModelCheckpoint`` so that ``last.ckpt`` knows the newest best. A run
    stopped inside an epoch (``max_steps``, ``max_time``) is saved at its last batch, so that a resume finishes
    that epoch.

    Args:
        every_n_train_steps: Also save every N optimiser steps inside an epoch (``None``: at epoch ends only).
    """

    FILENAME = "last.ckpt"

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps}: give a positive number, or null.")
        self.every_n_train_steps = every_n_train_steps
        self.path: str | None = None
        self._saved_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        best = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        directory = best.dirpath if best is not None else None
        path = Path(directory or run_dir(trainer) / "checkpoints") / self.FILENAME
        self.path = trainer.strategy.broadcast(str(path))  # rank zero's directory is the one written

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end save (after validation) follows
        n = self.every_n_train_steps
        # A run stopping inside an epoch (max_steps, max_time, a callback) is saved here, where a resume continues
        # the epoch; its epoch-end hooks still run, but a checkpoint from there would skip the epoch's rest.
        stopping = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        if stopping or (n and trainer.global_step % n == 0):
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)  # e.g. stopped by a validation inside the epoch: the newest state all the same

    def _save(self, trainer: pl.Trainer) -> None:
        if self.path is None or trainer.fast_dev_run or trainer.sanity_checking:
            return
        if self._saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step
