"""CIFAR-10 is read from fake pickles in torchvision's layout; the md5 check is patched as torchvision's tests do."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import cifar

from datamodules import CorruptDataError, DataNotFoundError
from datamodules.cifar10 import CIFAR10DataModule


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
        pickle.dump({"label_names": CIFAR10DataModule.classes}, f)
    return root


@pytest.fixture(autouse=True)
def _no_md5(monkeypatch):
    # The fake files cannot match the real md5 sums: keep the existence check, skip the hash.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def test_reads_pickles_in_nchw(tmp_path):
    root = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(root), val_size=10, batch_size=8, normalize="standardize")
    dm.prepare_data()  # present: no download
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 90 and len(dm.val_set) == 10 and len(dm.test_set) == 30
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.long
    # NCHW from the pickles' channel-major rows: the first 1024 bytes of a row are the red plane.
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][0]
    assert torch.equal(dm.test_set.images[0, 0].flatten(), torch.from_numpy(row[:1024].copy()))
    assert dm.mean.shape == (3,) and dm.std.shape == (3,)


def test_missing_files_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10DataModule(data_dir=str(tmp_path)).prepare_data()
    assert "cifar-10-batches-py" in str(err.value) and "127.0.0.1:9" in str(err.value)


def test_damaged_file_is_named(tmp_path, monkeypatch):
    root = write_cifar10(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        CIFAR10DataModule(data_dir=str(root)).setup("fit")
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: not path.endswith("test_batch"))
    with pytest.raises(CorruptDataError, match="test_batch"):
        CIFAR10DataModule(data_dir=str(root)).setup("test")
