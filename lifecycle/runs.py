"""A run's life in one place: where it writes, which checkpoint it continues, who holds it, what a failure leaves.

A run is ``<save_dir>/<name>/version_N/``, the folder its CSV and TensorBoard loggers share (config.yaml,
run_info.yaml, metrics.csv, events, checkpoints/, pictures). ``scripts/train.py`` drives it in this order:

1. :func:`find_checkpoint` turns ``--ckpt_path best|last`` into a file (or finds SLURM's requeue checkpoint),
   loads it safely and ``lifecycle.model_check.check_model`` compares it with the config: a checkpoint of
   another model class, or a resumed ``fit`` with other model hyperparameters, is refused *before anything is written*.
2. :func:`open_run` picks the directory (the checkpoint's own run for a resumed fit, else the next free
   ``version_N``, created atomically), takes its :class:`RunLock`, deletes what killed checkpoint saves left, and
   points the loggers at it through their constructor arguments (``version=``, W&B ``id=``).
3. :class:`ContinueMetrics` carries the resumed run's ``metrics.csv`` over.
4. :meth:`Run.close` releases the lock, records how the launch ended in ``run_info.yaml`` and deletes a run
   that failed before it wrote a checkpoint, so that no empty ``version_N`` is left for ``best``/``last``.

Only global rank zero creates, locks and deletes; every other rank leaves the loggers as they are (they write
nothing). Lightning's CSV writer has no public way to start from existing rows: :class:`ContinueMetrics` does it
through :mod:`compat` (``tests/test_compat.py`` fails if Lightning changes the writer).
"""

from __future__ import annotations

import csv
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from callbacks.checkpointing import ResumeState
from callbacks.slurm import JobRequeued, hpc_checkpoint
from compat import csv_rows, set_csv_rows
from lifecycle.checkpoint_io import remove_partial_saves
from lifecycle.run_lock import RunError, RunLock
from lifecycle.run_record import RUN_INFO, wandb_run_id
from lightning_modules.checkpoints import read_checkpoint

__all__ = [
    "ContinueMetrics",
    "Run",
    "RunError",
    "RunLock",
    "find_checkpoint",
    "name_loggers",
    "open_run",
    "previous_runs",
]

CHECKPOINTS = "checkpoints"
VERSIONED_LOGGERS = ("CSVLogger", "TensorBoardLogger")  # loggers that write into <save_dir>/<name>/version_N
DEFAULT_NAME = "lightning_logs"  # their name when none is given


# ---- the run directories of an experiment ------------------------------------------------------------------
def _entries(loggers: Any) -> list[Any]:
    """The ``trainer.logger`` config as a list of ``{class_path, init_args}`` entries (``True``/``None``: [])."""
    if isinstance(loggers, list):
        return [entry for entry in loggers if hasattr(entry, "get") and entry.get("class_path")]
    return [loggers] if hasattr(loggers, "get") and loggers.get("class_path") else []


def _kind(entry: Any) -> str:
    return str(entry.get("class_path")).rsplit(".", 1)[-1]


def _root(entry: Any) -> Path:
    args = entry.get("init_args") or {}
    return Path(args.get("save_dir") or ".") / (args.get("name") or "")


def name_loggers(loggers: Any, experiment: str | None) -> None:
    """Name the CSV and TensorBoard loggers that have no name of their own (Lightning's ``lightning_logs``) after
    the experiment, in place: its runs go to ``<save_dir>/<experiment>/version_N``."""
    for entry in _entries(loggers) if experiment else []:
        args = entry.get("init_args")
        if _kind(entry) in VERSIONED_LOGGERS and args is not None and args.get("name") in (None, "", DEFAULT_NAME):
            args["name"] = experiment


def experiment_root(loggers: Any) -> Path | None:
    """``<save_dir>/<name>`` of the first CSV or TensorBoard logger, where the run directories lie."""
    return next((_root(entry) for entry in _entries(loggers) if _kind(entry) in VERSIONED_LOGGERS), None)


def previous_runs(root: Path | None) -> list[Path]:
    """Earlier runs of an experiment (directories with a ``checkpoints/`` folder), most recently saved first."""
    if root is None or not root.is_dir():
        return []

    def saved(run: Path) -> float:
        last = run / CHECKPOINTS / "last.ckpt"
        return last.stat().st_mtime if last.is_file() else run.stat().st_mtime

    return sorted((p for p in root.iterdir() if (p / CHECKPOINTS).is_dir()), key=saved, reverse=True)


def _best_path(run: Path) -> Path | None:
    """The best checkpoint ``last.ckpt``'s ModelCheckpoint state names (looked up in this run too)."""
    state = read_checkpoint(run / CHECKPOINTS / "last.ckpt", mmap=True)
    for key, value in state.get("callbacks", {}).items():
        best = value.get("best_model_path") if key.startswith("ModelCheckpoint") else None
        # The recorded path may be relative to the directory fit ran in.
        for candidate in (Path(best), run / CHECKPOINTS / Path(best).name) if best else ():
            if candidate.is_file():
                return candidate
    return None


def resolve_alias(root: Path | None, which: str) -> Path | None:
    """``best``/``last`` -> that checkpoint of the newest earlier run of the experiment, or None."""
    for run in previous_runs(root):
        if (run / CHECKPOINTS / "last.ckpt").is_file():
            return run / CHECKPOINTS / "last.ckpt" if which == "last" else _best_path(run)
    return None


def checkpoint_run_dir(path: Path, checkpoint: dict[str, Any]) -> Path | None:
    """The run that wrote a checkpoint: ``<run>/checkpoints/<file>``, else the directory :class:`ResumeState`
    recorded (SLURM's ``hpc_ckpt_<n>.ckpt`` lies outside the run)."""
    path = Path(path).resolve()
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent
    recorded = checkpoint.get("callbacks", {}).get(ResumeState.__qualname__, {}).get("run_dir")
    return Path(recorded) if recorded else None


# ---- the checkpoint a command starts from --------------------------------------------------------------------
def find_checkpoint(
    subcommand: str, ckpt_path: str | None, loggers: Any, default_root_dir: str | None, on_slurm: bool
) -> Path | None:
    """The checkpoint file a command starts from, or None for a fresh fit.

    ``best``/``last`` name those of the newest earlier run of the experiment (``fit --ckpt_path last`` without
    one starts afresh: one command for the first launch and every requeue). A fit under SLURM without a
    ``--ckpt_path`` continues from Lightning's requeue checkpoint when the job was requeued.
    """
    root = experiment_root(loggers)
    if ckpt_path in ("best", "last"):
        found = resolve_alias(root, ckpt_path)
        if found is None and subcommand == "fit" and ckpt_path == "last":
            rank_zero_warn("--ckpt_path last: no earlier run of this experiment has a last.ckpt, starting afresh.")
            return None
        if found is None:
            raise RunError(
                f"--ckpt_path {ckpt_path}: no earlier run of this experiment with a checkpoints/last.ckpt was found "
                f"under {root or '(no CSV or TensorBoard logger)'}. Run `fit` first with the same config, or pass "
                "the path of a .ckpt file."
            )
        rank_zero_info(f"Using checkpoint {found}")
        return found
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise RunError(f"--ckpt_path {ckpt_path}: no such file. Pass a .ckpt file, or best / last.")
        return Path(ckpt_path)
    hpc = hpc_checkpoint(default_root_dir or ".") if subcommand == "fit" and on_slurm else None
    if hpc is not None:
        rank_zero_info(f"SLURM requeue: continuing from {hpc}")
    return hpc


# ---- opening and closing a run ---------------------------------------------------------------------------------
def _version(name: str) -> int | str:
    """``version_3`` -> 3 (loggers format ints as ``version_N``); any other directory name stays a string."""
    number = name.removeprefix("version_")
    return int(number) if name.startswith("version_") and number.isdigit() else name


def _new_run_dir(root: Path) -> Path:
    """Create the next free ``version_N`` (mkdir is atomic: two fresh runs never share one)."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [_version(p.name) for p in root.iterdir()]
    number = max((n for n in taken if isinstance(n, int)), default=-1) + 1
    while True:
        try:
            (root / f"version_{number}").mkdir()
            return root / f"version_{number}"
        except FileExistsError:
            number += 1


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@dataclass
class Run:
    """A run directory held by this command (``directory`` None: the loggers are not CSV/TensorBoard ones)."""

    directory: Path | None = None
    created: bool = False
    lock: RunLock | None = None
    callbacks: list[Callback] = field(default_factory=list)

    def close(self, error: BaseException | None) -> None:
        """Release the lock; record how the launch ended; delete a run that failed before its first checkpoint.

        A requeued SLURM job (:class:`~callbacks.slurm.JobRequeued`) has not failed: its successor continues it.
        """
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.directory is None or not self.directory.is_dir():
            return
        failed = error is not None and not isinstance(error, JobRequeued)
        if failed and self.created and not any((self.directory / CHECKPOINTS).glob("*.ckpt")):
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        info = self.directory / RUN_INFO
        record = yaml.safe_load(info.read_text()) if info.is_file() else None
        if record and record.get("launches"):
            outcome = f"failed: {type(error).__name__}: {error}" if failed else "finished"
            outcome = "requeued" if isinstance(error, JobRequeued) else outcome
            record["launches"][-1]["outcome"] = " ".join(outcome.split())[:500]
            info.write_text(yaml.safe_dump(record, sort_keys=False))


def open_run(
    subcommand: str, config: Any, ckpt_path: Path | None, checkpoint: dict[str, Any] | None
) -> tuple[Run, list[tuple[Any, str, bool, Any]]]:
    """Pick, create and lock the run directory of a command whose parsed ``config`` (the subcommand's namespace)
    is about to be instantiated; point its CSV/TensorBoard loggers at it (``version``) and a continued run's W&B
    logger at its W&B run (``id``, ``resume``).

    Returns the run and the ``(namespace, key, had the key, old value)`` changes made to the config, to undo once
    the loggers exist, so that the saved config.yaml stays a recipe for a new run.
    """
    loggers = config.get("trainer", {}).get("logger")
    root = experiment_root(loggers)
    if root is None or rank_zero_only.rank != 0:
        return Run(), []
    run, created = None, False
    if subcommand == "fit" and checkpoint is not None:
        origin = checkpoint_run_dir(ckpt_path, checkpoint)
        if origin is not None and origin.parent.resolve() == root.resolve() and origin.is_dir():
            run = origin
    if run is None:
        run, created = _new_run_dir(root), True
    lock = RunLock(run)
    try:
        lock.acquire()
    except RunError:
        if created:
            shutil.rmtree(run, ignore_errors=True)
        raise
    result = Run(directory=run, created=created, lock=lock)
    for leftover in remove_partial_saves(run / CHECKPOINTS):
        rank_zero_info(f"Removed {leftover.name}, left by a checkpoint save that was killed.")
    changes: list[tuple[Any, str, bool, Any]] = []

    def put(namespace: Any, key: str, value: Any) -> None:
        changes.append((namespace, key, key in namespace, namespace.get(key)))
        namespace[key] = value

    for entry in _entries(loggers):
        args = entry.get("init_args")
        if _kind(entry) in VERSIONED_LOGGERS and _root(entry).resolve() == root.resolve():
            put(args, "version", _version(run.name))
        elif _kind(entry) == "WandbLogger" and not created and args.get("id") is None:
            wandb_id = wandb_run_id(run)
            if wandb_id:  # continue the interrupted run's W&B run instead of starting a new one
                put(args, "id", wandb_id)
                put(entry, "dict_kwargs", {**(entry.get("dict_kwargs") or {}), "resume": "allow"})
    if not created:
        saved = checkpoint.get("callbacks", {}).get(ResumeState.__qualname__, {}).get("csv_rows") or []
        result.callbacks.append(ContinueMetrics(run, saved[0] if saved else None))
    return result, changes


# ---- metrics.csv of a continued run ------------------------------------------------------------------------------
class ContinueMetrics(Callback):
    """Carry a continued run's ``metrics.csv`` over: no row is lost, rows the resumed run logs again are replaced.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts. The rows are read before that
    (when this callback is made) and written back as soon as the writer exists (``on_fit_start``). When training
    starts, the rows logged after the checkpoint for the epoch it resumes in or a later one are dropped: the
    resumed run trains those epochs and logs their rows again. Rows before the checkpoint stay, and
    so do rows of earlier epochs logged after it (Lightning logs an epoch's training row after the epoch-end
    checkpoint). The template's modules log per epoch; a module that also logs every step keeps the rows of the
    steps before the checkpoint and gets those after it again.

    Args:
        run: The run directory whose metrics.csv continues.
        saved_rows: Rows the file had when the checkpoint was saved (``None``: unknown, rows are dropped by epoch
            alone).
    """

    def __init__(self, run: Path, saved_rows: int | None) -> None:
        self.path = Path(run) / "metrics.csv"
        self.rows = _read_rows(self.path)
        self.saved_rows = 0 if saved_rows is None else saved_rows
        self._seeded = False

    def _logger(self, trainer: pl.Trainer) -> CSVLogger | None:
        folder = self.path.parent.resolve()
        return next(
            (lg for lg in trainer.loggers if isinstance(lg, CSVLogger) and Path(lg.log_dir).resolve() == folder), None
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._logger(trainer)
        if logger is None or not trainer.is_global_zero or not self.rows:
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*exists and is not empty.*")  # its note that it deletes the file
            rows, keys = csv_rows(logger)
        set_csv_rows(logger, [*self.rows, *rows], sorted(set().union(*self.rows) | set(keys)))
        logger.save()
        self._seeded = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._seeded:
            return
        self._seeded = False
        logger = self._logger(trainer)
        logger.save()
        rows = _read_rows(self.path)
        old, new = rows[: len(self.rows)], rows[len(self.rows) :]
        epoch = trainer.current_epoch
        kept = old[: self.saved_rows] + [row for row in old[self.saved_rows :] if _epoch(row) < epoch]
        if len(kept) == len(old):
            return
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with temporary.open("w", newline="") as file:
            table = csv.DictWriter(file, fieldnames=csv_rows(logger)[1])
            table.writeheader()
            table.writerows(kept + new)
        os.replace(temporary, self.path)


def _epoch(row: dict[str, Any]) -> float:
    try:
        return float(row.get("epoch") or "inf")
    except (TypeError, ValueError):
        return float("inf")
