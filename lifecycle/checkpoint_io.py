"""Checkpoint writes that a crash or a full disk cannot turn into a damaged ``last.ckpt``.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file next to the target, flushes and fsyncs
  it, then renames it over the target; a full disk is reported as :class:`DiskFullError`.
- :func:`remove_partial_saves` deletes what a killed save left behind.
- :func:`install_fault_tolerance` gives a trainer the atomic writes, a :class:`~callbacks.checkpointing.ResumeState`
  and a :class:`~callbacks.checkpointing.LastCheckpoint` (``scripts/train.py`` calls it for every run).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from callbacks.checkpointing import LastCheckpoint, ResumeState

__all__ = [
    "AtomicCheckpointIO",
    "DiskFullError",
    "exception_chain",
    "install_fault_tolerance",
    "is_disk_full",
    "remove_partial_saves",
]


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
