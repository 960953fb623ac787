"""Checkpoint files: crash-safe writes, an always-fresh ``last.ckpt``, exact resumes, and clear errors.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file next to the target, flushes and
  fsyncs it, then renames it over the target: a crash while saving never damages the previous ``last.ckpt``;
  a full disk is reported as such. :func:`remove_partial_saves` deletes what a killed save left behind.
- :class:`LastCheckpoint` keeps ``checkpoints/last.ckpt`` the end of the newest finished epoch (and, if asked,
  the newest mid-epoch state), whatever the monitored metric does.
- :class:`ResumeState` saves what Lightning's checkpoints leave out for an exact resume: the random-number
  states of every rank (dropout masks), how many rows ``metrics.csv`` had and which run directory wrote it.
  With the datamodules' :class:`~datamodules.base.ResumableDataLoader` (data order and position) a run killed
  mid-epoch and resumed from its last checkpoint ends with the same weights as an uninterrupted run (on CPU,
  deterministic ops).
- :func:`read_checkpoint` loads a checkpoint without executing pickled code (``weights_only=True``) and turns
  a damaged, truncated or unsafe file into one paragraph naming the file and the fix.

``scripts/train.py`` installs them on every run (see :mod:`callbacks.runs`, which owns a run's directory).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import random
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from callbacks.images import run_dir

__all__ = [
    "UNSAFE_LOAD_OPT_IN",
    "AtomicCheckpointIO",
    "CheckpointError",
    "DiskFullError",
    "LastCheckpoint",
    "ResumeState",
    "install_fault_tolerance",
    "read_checkpoint",
    "remove_partial_saves",
]

# PyTorch's own switch for loading checkpoints with full pickle (it can run arbitrary code): set it to 1 only
# for a checkpoint from a source you trust.
UNSAFE_LOAD_OPT_IN = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file, the cause and the fix."""


class DiskFullError(OSError):
    """A checkpoint could not be written because its disk is full; the previous checkpoints are intact."""


def exception_chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an exception it was raised from is a full disk or quota (``ENOSPC``/``EDQUOT``).

    torch's zip writer reports a short write as ``RuntimeError: ... unexpected pos ...`` with the ``OSError``
    only in the exception's context, so the whole chain is searched, the message text included.
    """
    return any(
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or "No space left on device" in str(e)
        or "Disk quota exceeded" in str(e)
        for e in exception_chain(error)
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves replace the target file atomically, or not at all.

    The checkpoint is written to a hidden temporary file in the target's directory, flushed and fsynced, then
    renamed onto the target with ``os.replace`` (atomic on POSIX and Windows), and the directory is fsynced so
    the rename survives a power loss. A crash, a full disk or a kill during the write leaves the previous file
    intact, and the temporary file is removed when Python gets the chance (:func:`remove_partial_saves` removes
    what a SIGKILL leaves). A full disk raises :class:`DiskFullError` naming the file and the free space. Paths
    on remote filesystems (``s3://``, ...) fall back to Lightning's own transactional write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote, or a TypeError for the options
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        try:
            with open(temporary, "xb") as file:  # "x": never clobbers; permissions follow the umask
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException as error:
            with contextlib.suppress(OSError):
                temporary.unlink()
            free = shutil.disk_usage(target.parent).free / 2**20
            # torch's writer may report a short write only as "unexpected pos": on a (nearly) full disk, that.
            short_write = isinstance(error, RuntimeError) and "unexpected pos" in str(error) and free < 128
            if is_disk_full(error) or short_write:
                full = DiskFullError(
                    f"The disk is full: checkpoint {target} could not be written ({free:.0f} MiB free on its disk). "
                    "The previous checkpoints of the run are intact. Free some space (`df -h "
                    f"{target.parent}` shows it), or write the runs elsewhere (the loggers' save_dir), then resume "
                    "with --ckpt_path last."
                )
                full.errno = errno.ENOSPC
                raise full from None
            raise
        _fsync_directory(target.parent)


PARTIAL_SUFFIX = ".tmp"
_PARTIAL = re.compile(r"^\..+\.[0-9a-f]{8}" + re.escape(PARTIAL_SUFFIX) + "$")


def remove_partial_saves(directory: str | Path) -> list[Path]:
    """Delete the temporary files of :class:`AtomicCheckpointIO` saves that were killed (SIGKILL, power loss)
    in ``directory``; returns them. Call it only while no other process saves there (the run's lock held)."""
    directory = Path(directory)
    partial = [p for p in directory.glob(".*" + PARTIAL_SUFFIX) if _PARTIAL.match(p.name)] if directory.is_dir() else []
    for path in partial:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return partial


def _fsync_directory(directory: Path) -> None:
    """Persist a rename in ``directory`` (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    :mod:`callbacks.runs` uses the row counts and the directory to continue ``metrics.csv``.
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


def install_fault_tolerance(trainer: pl.Trainer) -> None:
    """Give ``trainer`` atomic checkpoint writes, a :class:`ResumeState` and, when it checkpoints, a
    :class:`LastCheckpoint` after its other checkpoint callbacks (each unless it has one).

    The checkpoint IO is replaced only when it is Lightning's default ``TorchCheckpointIO``: a CheckpointIO
    plugin of the user's (``--trainer.plugins``) or of the strategy is kept.
    """
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if not any(isinstance(callback, ResumeState) for callback in trainer.callbacks):
        trainer.callbacks.append(ResumeState())
    last = [callback for callback in trainer.callbacks if isinstance(callback, LastCheckpoint)]
    if not last and any(isinstance(callback, ModelCheckpoint) for callback in trainer.callbacks):
        last = [LastCheckpoint()]
    for callback in last:  # after every ModelCheckpoint, which updates its best path in the same hooks
        if callback in trainer.callbacks:
            trainer.callbacks.remove(callback)
        trainer.callbacks.append(callback)


# ---- loading -------------------------------------------------------------------------------------------------
def _unsafe_load_allowed() -> bool:
    return os.environ.get(UNSAFE_LOAD_OPT_IN, "0").lower() in ("1", "y", "yes", "true")


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU without running pickled code, or raise :class:`CheckpointError`.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain Python types; checkpoints written by this
    template contain nothing else. A file that needs more (arbitrary classes, which unpickling would execute) is
    refused unless ``$TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set to 1, PyTorch's own opt-in, which Lightning's
    loading honours too. A truncated or damaged file gets an error that names it and says what to do. ``mmap``
    maps the tensors instead of reading them (for a look at everything but the weights).
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not _unsafe_load_allowed(), mmap=mmap)
    except Exception as err:
        # Checkpoints are zip archives: bytes that are not one (random data, a truncated file whose central
        # directory is gone) fail in the fallback unpickler with a misleading "unsupported global" message.
        if "weights only load failed" in str(err).lower() and zipfile.is_zipfile(path):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            detail = f"the first one: {found.group(1)}" if found else str(err).splitlines()[0]
            raise CheckpointError(
                f"Checkpoint {path} contains pickled Python objects besides tensors and plain values ({detail}). "
                "Loading it would execute code from the file, so it was refused; checkpoints written by this "
                f"template never need that. If you trust where the file comes from, set {UNSAFE_LOAD_OPT_IN}=1 "
                "for this command to load it with full pickle."
            ) from None
        # Else the first sentence of the cause, e.g. "PytorchStreamReader failed reading file data/0: ...".
        if not zipfile.is_zipfile(path):
            detail = "not a complete PyTorch checkpoint archive"
        else:
            cause = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else "the file ends early"
            detail = f"{type(err).__name__}: {cause}"
        raise CheckpointError(
            f"Checkpoint {path} cannot be read: it is damaged or incomplete ({detail}); a crash, a full disk or "
            "an interrupted copy leaves files like this. Use an earlier checkpoint of the run instead: "
            f"`ls -lt {path.parent}` lists them, newest first; pass one with --ckpt_path {path.parent}/<file>.ckpt."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (it has no 'state_dict' entry): pass a .ckpt file written by "
            "`fit` (ModelCheckpoint or Trainer.save_checkpoint), not a bare model state_dict."
        )
    return checkpoint
