"""What every pipeline of ``scripts/benchmark.py`` shares: the device it trains on, a clock that waits for that
device, the reference loops' CUDA check as in a process without Lightning, and a ``fit`` of one of our configs
through the CLI."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def device() -> torch.device:
    """Where every pipeline trains: the GPU when there is one (as the configs' ``accelerator: auto``), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    """Wait for the GPU's queued work before reading a clock (nothing to wait for on the CPU)."""
    if device().type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def as_without_lightning() -> Iterator[None]:
    """Run a reference loop as in a process that never imported Lightning: Lightning's import switches
    ``torch.cuda.is_available()`` to an NVML probe that a GPU-less machine repeats at every optimiser step
    (:func:`~lifecycle.speedups.use_runtime_cuda_check_without_gpu`), a cost plain PyTorch does not pay."""
    from lifecycle.speedups import NVML_CUDA_CHECK, use_runtime_cuda_check_without_gpu

    previous = os.environ.get(NVML_CUDA_CHECK)
    use_runtime_cuda_check_without_gpu()
    try:
        yield
    finally:
        if previous is not None:
            os.environ[NVML_CUDA_CHECK] = previous


def fit_config(config: str, timer, *overrides: str) -> None:
    """``fit`` one of our configs through the CLI (``scripts/train.py``) with ``timer`` among its callbacks."""
    from train import main

    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    quiet += ["--trainer.devices", "1"]  # one device, like the references (a multi-GPU node would start DDP)
    cli = main(["-c", str(ROOT / config), *overrides, *quiet], run=False)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
