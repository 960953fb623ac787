"""Fixtures of the tests: tiny datasets in their real on-disk formats (written by :mod:`datamodules.synthetic` and
``omniglot_fakes``, no downloads, no mocks of the loaders), a quiet CPU trainer, W&B's and torch's process-wide
state reset after each test, and the CPU cores shared out between pytest-xdist's workers (``make test``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from omniglot_fakes import write_torchvision_layout

from datamodules.synthetic import write_cifar10, write_idx, write_mnist

__all__ = ["quiet_trainer", "write_cifar10", "write_idx", "write_mnist"]


def pytest_configure(config):
    """Under pytest-xdist (``-n``), each worker gets an equal share of the cores for torch's threads, and so do the
    processes its tests start: with torch's default of one thread per core in every worker, the workers' threads
    contend for the same cores, and the suite takes about a quarter longer (measured in BENCHMARKS.md)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def quiet_trainer(tmp_path: Path, **overrides):
    """A CPU ``pl.Trainer`` for tests: no logger, checkpoints, progress bar or summary unless ``overrides`` say so."""
    import pytorch_lightning as pl

    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**options, **overrides})


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    return write_mnist(tmp_path / "data")


@pytest.fixture(scope="module")
def omniglot_dir(tmp_path_factory) -> Path:
    """torchvision's layout with 5 background alphabets x 6 characters and 2 evaluation alphabets x 5, 20 drawings
    each, 35x35 PNGs (1-bit, like the real 105x105 ones; smaller only to keep the tests fast)."""
    return write_torchvision_layout(tmp_path_factory.mktemp("omniglot"), size=35)


@pytest.fixture(autouse=True)
def _fresh_wandb_state():
    """W&B keeps process-wide state (its service and settings, e.g. the run folder resolved at the first
    ``wandb.init``). One CLI run per process never notices; tests run many in one process, so reset it."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()


@pytest.fixture(autouse=True)
def _fresh_torch_flags():
    """A CLI run sets process-wide torch flags (``--trainer.deterministic``, ``--float32_matmul_precision``, the
    speed switches' cuDNN benchmark); tests run many in one process, so what one test sets is undone when it ends."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    precision = torch.get_float32_matmul_precision()
    yield
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
    torch.set_float32_matmul_precision(precision)
