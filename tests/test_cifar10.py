"""CIFAR-10 is read from fake pickles in torchvision's layout; the md5 check is patched as torchvision's tests do."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from conftest import write_cifar10
from torchvision.datasets import cifar

from datamodules import CorruptDataError, DataNotFoundError
from datamodules.cifar10 import CIFAR10DataModule


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
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.long
    # NCHW from the pickles' channel-major rows: the first 1024 bytes of a row are the red plane.
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][0]
    assert torch.equal(dm.test_set.images[0, 0].flatten(), torch.from_numpy(row[:1024].copy()))
    assert dm.mean.shape == (3,) and dm.std.shape == (3,)


def test_a_fold_replaces_the_val_size_hold_out(tmp_path):
    root = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(root), fold=3, num_folds=4, normalize="standardize")
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 75 and len(dm.val_set) == 25 and len(dm.test_set) == 30  # val_size=5000 unused
    mean = dm.train_set.images.double().mean((0, 2, 3))
    assert torch.allclose(dm.mean.double(), mean, atol=1e-3)  # statistics of the fold's training part


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


def test_per_pixel_mean_is_the_training_mean_image(tmp_path):
    root = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(root), val_size=10, normalize="per_pixel_mean")
    dm.setup("fit")
    train = dm.train_set.images.double()
    assert dm.mean.shape == (3, 32, 32)
    assert torch.allclose(dm.mean.double(), train.mean(0), atol=1e-4)
    x, _ = dm.on_after_batch_transfer((dm.val_set.images[:4], dm.val_set.targets[:4]), 0)
    expected = dm.val_set.images[:4].double() / 255 - train.mean(0) / 255
    assert torch.allclose(x.double(), expected, atol=1e-5)


def test_augmentation_only_while_training(tmp_path):
    from types import SimpleNamespace

    from datamodules.augment import BatchAugment

    root = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(root), val_size=10, augment=BatchAugment(width_shift_range=0.2))
    dm.setup("fit")
    batch = (dm.train_set.images[:8], dm.train_set.targets[:8])
    dm.trainer = SimpleNamespace(training=False)  # validation, test and predict batches
    evaluated, _ = dm.on_after_batch_transfer(batch, 0)
    assert torch.allclose(evaluated, batch[0].float() / 255)
    dm.trainer = SimpleNamespace(training=True)
    trained, _ = dm.on_after_batch_transfer(batch, 0)
    assert trained.shape == evaluated.shape and not torch.allclose(trained, evaluated)
