"""The only places this template reaches into Lightning's internals: each has no public API in Lightning 2.6, and
each has a test in ``tests/test_compat.py`` that fails loudly when an upgrade changes it.

Anything may import this package; it imports nothing of the template's.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

__all__ = ["csv_rows", "set_csv_rows", "uses_distributed_sampler"]


def uses_distributed_sampler(trainer: pl.Trainer) -> bool:
    """``Trainer(use_distributed_sampler=...)``: the Trainer keeps the flag, but exposes no getter for it (its own
    data connector reads this same attribute)."""
    return bool(trainer._accelerator_connector.use_distributed_sampler)


def csv_rows(logger: CSVLogger) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows and column names the CSV logger's writer holds and will write to ``metrics.csv``."""
    writer = logger.experiment
    return writer.metrics, writer.metrics_keys


def set_csv_rows(logger: CSVLogger, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """Start the CSV logger's writer from existing rows: Lightning's writer deletes ``metrics.csv`` when it starts
    and has no public way to continue one."""
    writer = logger.experiment
    writer.metrics_keys = keys
    writer.metrics = rows
