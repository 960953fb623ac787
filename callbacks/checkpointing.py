"""Fault tolerance: crash-safe checkpoint writes, exact resumes, and clear errors for unusable checkpoints.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file next to the target, flushes and
  fsyncs it, then renames it over the target: a crash while saving never damages the previous ``last.ckpt``.
- :class:`ResumeState` saves what Lightning's checkpoints leave out for an exact resume: the random-number
  states of every rank (dropout masks) and how many rows ``metrics.csv`` had. With the datamodules'
  :class:`~datamodules.base.ResumableDataLoader` (data order and position) a run killed mid-epoch and resumed
  from its last checkpoint ends with the same weights as an uninterrupted run (on CPU, deterministic ops).
- :func:`read_checkpoint` loads a checkpoint without executing pickled code (``weights_only=True``) and turns
  a damaged, truncated or unsafe file into one paragraph naming the file and the fix.
- :func:`continue_run_dir` makes a resumed fit write into the run directory of the interrupted one.

:func:`install_fault_tolerance` adds the first two to a Trainer; ``scripts/train.py`` does it for every run.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

__all__ = [
    "UNSAFE_LOAD_OPT_IN",
    "AtomicCheckpointIO",
    "CheckpointError",
    "ResumeState",
    "continue_run_dir",
    "install_fault_tolerance",
    "read_checkpoint",
]

# PyTorch's own switch for loading checkpoints with full pickle (it can run arbitrary code): set it to 1 only
# for a checkpoint from a source you trust.
UNSAFE_LOAD_OPT_IN = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file, the cause and the fix."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves replace the target file atomically, or not at all.

    The checkpoint is written to a hidden temporary file in the target's directory, flushed and fsynced, then
    renamed onto the target with ``os.replace`` (atomic on POSIX and Windows), and the directory is fsynced so
    the rename survives a power loss. A crash, a full disk or a kill during the write leaves the previous file
    intact, and the temporary file is removed when Python gets the chance. Paths on remote filesystems
    (``s3://``, ...) fall back to Lightning's own transactional write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote, or a TypeError for the options
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temporary, "xb") as file:  # "x": never clobbers; permissions follow the umask
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        _fsync_directory(target.parent)


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


def _csv_rows(logger: CSVLogger) -> int | None:
    """Data rows of ``logger``'s metrics.csv after flushing it, or None if it has not started writing."""
    if logger._experiment is None:
        return None
    logger.save()
    path = Path(logger.experiment.metrics_file_path)
    if not path.is_file():
        return 0
    with path.open(newline="") as file:
        return max(sum(1 for _ in csv.reader(file)) - 1, 0)


class ResumeState(Callback):
    """Checkpoints the state an exact resume needs beyond Lightning's own (which omits RNG states).

    Saved with every checkpoint: the torch/CUDA/NumPy/Python RNG states of every rank (gathered to rank zero,
    which writes the file) and the number of rows of each CSVLogger's metrics.csv, flushed at that moment.
    On resume the RNG states are restored when training starts (after the sanity check, just before the first
    batch), so the resumed run draws the same dropout masks as an uninterrupted one; a rank without a saved
    state (more processes than before) takes rank zero's, which is what equal seeds give anyway.
    :func:`continue_run_dir` uses the row counts to drop metrics logged after the checkpoint.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._to_restore: list[dict[str, Any]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        states = [rng_states()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank saves a checkpoint together (Trainer.save_checkpoint ends in a barrier), rank zero writes.
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, rng_states())
        loggers = self._trainer.loggers if self._trainer is not None else []
        csv_rows = [_csv_rows(logger) for logger in loggers if isinstance(logger, CSVLogger)]
        return {"rng": states, "csv_rows": csv_rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._to_restore:
            rank = trainer.global_rank
            set_rng_states(self._to_restore[rank] if rank < len(self._to_restore) else self._to_restore[0])
            self._to_restore = None


def install_fault_tolerance(trainer: pl.Trainer) -> None:
    """Give ``trainer`` atomic checkpoint writes and a :class:`ResumeState` callback, unless it has them.

    The checkpoint IO is replaced only when it is Lightning's default ``TorchCheckpointIO``: a CheckpointIO
    plugin of the user's (``--trainer.plugins``) or of the strategy is kept.
    """
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if not any(isinstance(callback, ResumeState) for callback in trainer.callbacks):
        trainer.callbacks.append(ResumeState())


# ---- loading -------------------------------------------------------------------------------------------------
def _unsafe_load_allowed() -> bool:
    return os.environ.get(UNSAFE_LOAD_OPT_IN, "0").lower() in ("1", "y", "yes", "true")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU without running pickled code, or raise :class:`CheckpointError`.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain Python types; checkpoints written by this
    template contain nothing else. A file that needs more (arbitrary classes, which unpickling would execute) is
    refused unless ``$TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set to 1, PyTorch's own opt-in, which Lightning's
    loading honours too. A truncated or damaged file gets an error that names it and says what to do.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not _unsafe_load_allowed())
    except Exception as err:
        if "weights only load failed" in str(err).lower():
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            detail = f"the first one: {found.group(1)}" if found else str(err).splitlines()[0]
            raise CheckpointError(
                f"Checkpoint {path} contains pickled Python objects besides tensors and plain values ({detail}). "
                "Loading it would execute code from the file, so it was refused; checkpoints written by this "
                f"template never need that. If you trust where the file comes from, set {UNSAFE_LOAD_OPT_IN}=1 "
                "for this command to load it with full pickle."
            ) from None
        # The first sentence of the cause, e.g. "PytorchStreamReader failed reading zip archive: failed finding
        # central directory" for a truncated file.
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


# ---- continuing the interrupted run's directory -------------------------------------------------------------
def _version_from_dir(name: str) -> int | str:
    """``version_3`` -> 3 (loggers format ints as ``version_N``); any other directory name stays a string."""
    number = name.removeprefix("version_")
    return int(number) if name.startswith("version_") and number.isdigit() else name


def continue_run_dir(trainer: pl.Trainer, ckpt_path: str | Path, checkpoint: dict[str, Any]) -> Path | None:
    """Make a fit resumed from ``ckpt_path`` log into the run directory of the run that wrote it.

    A checkpoint at ``<save_dir>/<name>/<version>/checkpoints/<file>.ckpt`` belongs to run ``<version>``: CSV and
    TensorBoard loggers with that ``save_dir`` and ``name`` get that version, so metrics.csv, the TensorBoard
    events, run_info.yaml and new checkpoints continue in the same directory (Lightning's ModelCheckpoint then
    keeps tracking its best checkpoints there). metrics.csv keeps the rows written up to the checkpoint
    (CSVLogger would delete the file; rows logged after the checkpoint are dropped, the resumed run logs them
    again). Call it before ``fit`` starts, with the loaded ``checkpoint``. Returns the run directory, or None
    when the checkpoint lies elsewhere (the run then gets a new version as usual).
    """
    path = Path(ckpt_path).resolve()
    if path.parent.name != "checkpoints":
        return None
    run_dir = path.parent.parent
    loggers = [
        logger
        for logger in trainer.loggers
        if isinstance(logger, CSVLogger | TensorBoardLogger) and Path(logger.root_dir).resolve() == run_dir.parent
    ]
    if not loggers:
        return None
    # ModelCheckpoint's note that the directory is not empty is what a resume expects.
    warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
    saved_rows = checkpoint.get("callbacks", {}).get(ResumeState.__qualname__, {}).get("csv_rows")
    csv_loggers = [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]
    for logger in loggers:
        if logger._experiment is not None:
            raise RuntimeError(
                f"continue_run_dir() must run before fit starts, but {type(logger).__name__} already writes to "
                f"{logger.log_dir}."
            )
        logger._version = _version_from_dir(run_dir.name)
        if isinstance(logger, CSVLogger) and rank_zero_only.rank == 0:  # trainer.global_rank is set in fit only
            index = csv_loggers.index(logger)
            keep = saved_rows[index] if saved_rows and index < len(saved_rows) else None
            _keep_csv_rows(logger, keep)
    return run_dir


def _keep_csv_rows(logger: CSVLogger, keep: int | None) -> None:
    """Start ``logger``'s writer on its existing metrics.csv, keeping the first ``keep`` rows (all if None)."""
    path = Path(logger.log_dir) / "metrics.csv"
    rows = []
    if path.is_file():
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")  # its note that it deletes the old file
        writer = logger.experiment
    writer.metrics = rows[:keep] if keep is not None else rows
    writer.save()
