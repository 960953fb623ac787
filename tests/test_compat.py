"""compat/: the template's only uses of Lightning internals, each checked against the installed Lightning.

A failure here means a Lightning upgrade changed one of them: update ``compat/__init__.py`` (and this test)."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from compat import csv_rows, set_csv_rows, uses_distributed_sampler
from lifecycle.runs import ContinueMetrics


def test_uses_distributed_sampler_reads_the_trainer_flag():
    for flag in (True, False):
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, use_distributed_sampler=flag)
        assert uses_distributed_sampler(trainer) is flag


def test_csv_rows_continue_a_metrics_file(tmp_path):
    logger = CSVLogger(tmp_path, name="x", version=0)
    rows, keys = csv_rows(logger)
    assert isinstance(rows, list) and isinstance(keys, list)
    set_csv_rows(logger, [{"epoch": "0", "step": "3", "a": "1.5"}], ["a", "epoch", "step"])
    logger.log_metrics({"a": 2.5, "epoch": 1}, step=7)
    logger.save()
    lines = (tmp_path / "x" / "version_0" / "metrics.csv").read_text().splitlines()
    assert lines == ["a,epoch,step", "1.5,0,3", "2.5,1,7"]  # the old row kept, the new one after it
    assert ContinueMetrics(tmp_path / "x" / "version_0", None).rows[0] == {"epoch": "0", "step": "3", "a": "1.5"}
