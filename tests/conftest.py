"""Fixtures that write tiny datasets in their real on-disk formats (no downloads, no mocks of the loaders)."""

from __future__ import annotations

import gzip
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` (uint8) as an IDX file: magic 0x0000 08 <ndim>, big-endian dims, raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def fake_digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 images: class k lights up a bar at row 2k (plus noise)."""
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 4 : 2 * k + 6, 4:24] = 255
    return images, labels


def write_mnist(root: Path, n_train: int = 256, n_test: int = 64, compress: bool = False) -> Path:
    """A tiny MNIST in torchvision's raw layout ``root/MNIST/raw/*-ubyte[.gz]``; returns ``root``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = fake_digits(n, rng)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return root


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30) -> Path:
    """Tiny ``cifar-10-batches-py``: 5 training batches, a test batch and the meta file, real pickle layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in batches:
        n = n_test if name == "test_batch" else per_batch
        labels = rng.integers(0, 10, n).tolist()
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


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


@pytest.fixture(autouse=True)
def _fresh_wandb_state():
    """W&B keeps process-wide state (its service and settings, e.g. the run folder resolved at the first
    ``wandb.init``). One CLI run per process never notices; tests run many in one process, so reset it."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()
