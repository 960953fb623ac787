"""Datamodules read the real on-disk formats, split with a seed, and normalise with training-split statistics."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from conftest import write_idx, write_mnist
from torchvision.datasets import MNIST
from train import main

from datamodules import CorruptDataError, DataNotFoundError, DiabetesDataModule, DigitsDataModule, MNISTDataModule
from datamodules.base import channel_stats
from datamodules.imdb import IMDBDataModule


def test_mnist_reads_raw_layout(mnist_dir):
    dm = MNISTDataModule(data_dir=str(mnist_dir), val_size=56, batch_size=32)  # val batches: raw uint8 slices
    dm.prepare_data()  # files present: must not try to download
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 200 and len(dm.val_set) == 56 and len(dm.test_set) == 64
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9
    x, y = dm.on_after_batch_transfer((x, y), 0)
    assert x.dtype == torch.float32 and x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0


def test_mnist_reads_gzipped_files(tmp_path):
    root = write_mnist(tmp_path, n_train=40, n_test=10, compress=True)
    assert not list((root / "MNIST" / "raw").glob("*-ubyte"))
    dm = MNISTDataModule(data_dir=str(root), val_size=0.25)
    dm.setup("fit")
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10


def test_split_is_seeded_and_disjoint(mnist_dir):
    def split(seed):
        dm = MNISTDataModule(data_dir=str(mnist_dir), val_size=56, seed=seed)
        dm.setup("fit")
        return dm.train_set.images, dm.val_set.images

    train_a, val_a = split(1)
    train_b, val_b = split(1)
    _, val_c = split(2)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert not torch.equal(val_a, val_c)
    # Every image lands in exactly one of train/val: sizes add up and the pixel sums match the full file.
    full = MNISTDataModule(data_dir=str(mnist_dir)).load_split("train")[0]
    assert train_a.sum() + val_a.sum() == full.sum()


def test_standardize_uses_training_split_only(mnist_dir):
    dm = MNISTDataModule(data_dir=str(mnist_dir), val_size=128, normalize="standardize")
    dm.setup("fit")
    train = dm.train_set.images.double()
    assert dm.mean.item() == pytest.approx(train.mean().item(), rel=1e-5)
    assert dm.std.item() == pytest.approx(train.std(unbiased=False).item(), rel=1e-5)
    everything = torch.cat([dm.train_set.images, dm.val_set.images]).double()
    assert dm.mean.item() != pytest.approx(everything.mean().item(), rel=1e-6)
    # The same statistics normalise validation and test batches.
    dm.setup("test")
    x, _ = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    expected = (dm.test_set.images[: len(x)].double() - train.mean()) / train.std(unbiased=False)
    assert torch.allclose(x.double(), expected, atol=1e-4)


def test_stats_travel_in_state_dict(mnist_dir):
    dm = MNISTDataModule(data_dir=str(mnist_dir), normalize="standardize", val_size=10)
    dm.setup("fit")
    restored = MNISTDataModule(data_dir=str(mnist_dir), normalize="standardize")
    restored.load_state_dict(dm.state_dict())
    assert torch.equal(restored.mean, dm.mean) and torch.equal(restored.std, dm.std)


def test_channel_stats_match_float_computation():
    images = torch.randint(0, 256, (17, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(images)
    ref = images.double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(mean.double(), ref.mean(1), atol=1e-4)
    assert torch.allclose(std.double(), ref.std(1, unbiased=False), atol=1e-4)


def test_one_hot_targets(mnist_dir):
    dm = MNISTDataModule(data_dir=str(mnist_dir), val_size=16, target_format="one_hot", batch_size=8)
    dm.setup("fit")
    raw_x, raw_y = next(iter(dm.val_dataloader()))
    _, y = dm.on_after_batch_transfer((raw_x, raw_y), 0)
    assert y.shape == (8, 10) and y.dtype == torch.float32
    assert torch.equal(y.argmax(1), raw_y) and torch.all(y.sum(1) == 1)


def test_missing_data_without_network_names_the_fix(tmp_path, monkeypatch):
    # A closed local port stands in for "no network": the real download code runs and fails at once.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    dm = MNISTDataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "http://127.0.0.1:9/" in message
    assert "data_dir" in message


def test_setup_without_files_raises_data_not_found(tmp_path):
    with pytest.raises(DataNotFoundError, match="data_dir"):
        MNISTDataModule(data_dir=str(tmp_path)).setup("fit")


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:-100]),  # truncated
        lambda p: p.write_bytes(b"\x00\x00\x08\x01" + p.read_bytes()[4:]),  # wrong magic (a label file's)
        lambda p: p.write_bytes(b""),  # empty
    ],
    ids=["truncated", "bad-magic", "empty"],
)
def test_corrupt_idx_names_the_file(mnist_dir, damage):
    path = mnist_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    damage(path)
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte"):
        MNISTDataModule(data_dir=str(mnist_dir)).setup("fit")


def test_corrupt_gzip_names_the_file(tmp_path):
    root = write_mnist(tmp_path, n_train=20, n_test=5, compress=True)
    path = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(path.read_bytes())[:30])  # not a valid gzip of an IDX file any more
    with pytest.raises(CorruptDataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        MNISTDataModule(data_dir=str(root)).setup("test")


def test_label_out_of_range_is_reported(mnist_dir):
    write_idx(mnist_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.full(64, 12, dtype=np.uint8))
    with pytest.raises(CorruptDataError, match="10 classes"):
        MNISTDataModule(data_dir=str(mnist_dir)).setup("test")


def test_digits_look_like_mnist():
    dm = DigitsDataModule(val_size=0.1)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    assert len(dm.test_set) == 360
    images = dm.train_set.images
    assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.uint8
    assert images.max() == 255 and images[:, :, :4].max() == 0  # digit centred in a 4-pixel empty frame
    assert set(dm.test_set.targets.tolist()) == set(range(10))
    # The test split does not depend on the train/val seed.
    other = DigitsDataModule(seed=7)
    other.setup("test")
    assert torch.equal(other.test_set.images, dm.test_set.images)


def test_bad_val_size_is_reported(mnist_dir):
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule(data_dir=str(mnist_dir), val_size=10_000).setup("fit")


# ---- k-fold cross-validation: one fold per run -----------------------------------------------------------------


def _keys(images: torch.Tensor) -> list[bytes]:
    """One key per image (its bytes): the fake MNIST images are random noise, so every key is unique."""
    return [bytes(row) for row in images.flatten(1).numpy()]


def _fold(mnist_dir, fold, **kwargs) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(mnist_dir), fold=fold, num_folds=4, normalize="standardize", **kwargs)
    dm.setup("fit")
    return dm


def test_folds_partition_the_training_split_with_its_class_ratios(mnist_dir):
    pool_images, pool_labels = MNISTDataModule(data_dir=str(mnist_dir)).load_split("train")
    pool = _keys(pool_images)
    assert len(set(pool)) == len(pool) == 256
    pool_counts = torch.bincount(pool_labels, minlength=10)
    seen: list[bytes] = []
    for k in range(4):
        dm = _fold(mnist_dir, k)
        train, val = _keys(dm.train_set.images), _keys(dm.val_set.images)
        assert not set(train) & set(val) and sorted(train + val) == sorted(pool)  # fold k: val, the rest: train
        assert len(val) == 64
        counts = torch.bincount(dm.val_set.targets, minlength=10)
        assert ((counts - pool_counts / 4).abs() <= 1).all()  # stratified: each fold keeps the class ratios
        # Statistics from the fold's training part only, applied to its validation part.
        mean, std = channel_stats(dm.train_set.images)
        assert torch.allclose(dm.mean, mean) and torch.allclose(dm.std, std)
        seen += val
    assert sorted(seen) == sorted(pool)  # every training image is validated exactly once


def test_folds_are_seeded_and_leave_the_test_split_alone(mnist_dir):
    a, b, other_seed = _fold(mnist_dir, 1), _fold(mnist_dir, 1), _fold(mnist_dir, 1, seed=7)
    assert torch.equal(a.val_set.images, b.val_set.images) and torch.equal(a.train_set.images, b.train_set.images)
    assert set(_keys(a.val_set.images)) != set(_keys(other_seed.val_set.images))
    plain = MNISTDataModule(data_dir=str(mnist_dir), val_size=64, normalize="standardize")
    for dm in (a, plain):
        dm.setup("test")
    assert torch.equal(a.test_set.images, plain.test_set.images) and len(a.test_set) == 64


def test_one_fold_through_the_cli_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--data", "datamodules.DigitsDataModule", "--data.init_args.fold", "2", "--data.init_args.num_folds", "5"]
    args += ["--model", "lightning_modules.mlp.MLPClassifier", "--model.init_args.input_shape", "[1, 28, 28]"]
    cli = main(args, run=False)
    cli.datamodule.setup("fit")
    direct = DigitsDataModule(fold=2, num_folds=5)
    direct.setup("fit")
    assert torch.equal(cli.datamodule.val_set.targets, direct.val_set.targets)
    assert torch.equal(cli.datamodule.val_set.images, direct.val_set.images)
    assert len(cli.datamodule.val_set) in (287, 288)  # a fifth of the 1,437 training digits, not val_size


def test_tabular_folds_partition_the_pool():
    folds = [DiabetesDataModule(fold=k, num_folds=4) for k in range(4)]
    pool = folds[0].fold_targets()
    seen = []
    for dm in folds:
        dm.setup("fit")
        assert len(dm.train_set) + len(dm.val_set) == len(pool)
        assert torch.allclose(dm.mean, dm.train_set.features.mean(0))  # standardised with the fold's training rows
        seen += dm.val_set.targets.tolist()
    assert sorted(seen) == sorted(pool.tolist())


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(fold=5, num_folds=5), r"fold=5 with num_folds=5: folds are numbered 0 to 4"),
        (dict(fold=-1, num_folds=3), r"fold=-1 .* numbered 0 to 2"),
        (dict(fold=0, num_folds=1), r"num_folds=1: .* at least 2 folds"),
    ],
)
@pytest.mark.parametrize("datamodule", [DigitsDataModule, DiabetesDataModule, IMDBDataModule])
def test_bad_fold_options_name_the_fix(datamodule, options, match):
    with pytest.raises(ValueError, match=match):
        datamodule(**options)


def test_more_folds_than_samples_is_explained():
    dm = DigitsDataModule(fold=0, num_folds=2000)
    with pytest.raises(ValueError, match="num_folds=2000: more folds than the 1437 training samples"):
        dm.setup("fit")


# ---- the device-resident training path -----------------------------------------------------------------------------


def _sampler_and_set(world: int, rank: int, epoch: int):
    from datamodules.base import InMemoryImageDataset
    from datamodules.loaders import ResumableSampler

    images = torch.randint(0, 256, (103, 1, 4, 4), dtype=torch.uint8)
    dataset = InMemoryImageDataset(images, torch.arange(103) % 10)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=7)
    sampler.set_epoch(epoch)
    return dataset, sampler


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1), (3, 2)])
def test_device_loader_yields_the_dataloader_batches(world, rank):
    from datamodules.loaders import DeviceBatchLoader, ResumableDataLoader, collate_batch

    dataset, sampler = _sampler_and_set(world, rank, epoch=3)
    reference = ResumableDataLoader(dataset, batch_size=8, sampler=sampler, collate_fn=collate_batch)
    device_loader = DeviceBatchLoader(dataset, 8, sampler)
    expected, got = list(reference), list(device_loader)
    assert len(got) == len(device_loader) == len(reference)
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    # Part-way through an epoch both loaders report the same resumable position.
    for loader in (reference, device_loader):
        iterator = iter(loader)
        next(iterator), next(iterator)
    assert device_loader.state_dict() == {k: v for k, v in reference.state_dict().items() if k != "generator"}


def test_device_loader_resumes_mid_epoch():
    from datamodules.loaders import DeviceBatchLoader

    dataset, sampler = _sampler_and_set(1, 0, epoch=1)
    loader = DeviceBatchLoader(dataset, 10, sampler)
    full = list(loader)
    iterator = iter(loader)
    for _ in range(4):
        next(iterator)
    state = loader.state_dict()
    assert state["position"] == 40
    _, fresh_sampler = _sampler_and_set(1, 0, epoch=0)
    resumed = DeviceBatchLoader(dataset, 10, fresh_sampler)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 4 and all(torch.equal(a[0], b[0]) for a, b in zip(rest, full[4:], strict=True))


def test_resident_training_set_is_normalised_once(mnist_dir, monkeypatch):
    dm = MNISTDataModule(data_dir=str(mnist_dir), val_size=64, batch_size=50, normalize="standardize")
    dm.setup("fit")
    loader = dm.train_dataloader()
    x, y = next(iter(loader))
    assert x.dtype == torch.float32  # normalised on the device already, once for the whole set
    index = torch.tensor(list(iter(loader.sampler))[:50])
    assert torch.allclose(x, dm.normalize_images(dm.train_set.images[index]))
    assert torch.equal(y, dm.train_set.targets[index])
    resident = dm._resident_train_set()[0]
    list(loader)
    assert dm._resident_train_set()[0] is resident  # not rebuilt per epoch
    out, _ = dm.on_after_batch_transfer((x, y), 0)
    assert out is x  # no second normalisation
    dm.set_stats(dm.mean + 1, dm.std)  # e.g. restored from a checkpoint: the cache follows the statistics
    assert dm._resident_train_set()[0] is not resident
    monkeypatch.setattr(MNISTDataModule, "normalized_cache_bytes", 0)  # too big for a float copy: stays uint8
    dm.set_stats(dm.mean, dm.std)
    assert dm._resident_train_set()[0].dtype == torch.uint8


def test_datamodule_picks_the_device_path_when_it_can(mnist_dir):
    from datamodules.augment import SampleAugment
    from datamodules.loaders import DeviceBatchLoader, ResumableDataLoader

    def loader(**kwargs):
        dm = MNISTDataModule(data_dir=str(mnist_dir), val_size=64, **kwargs)
        dm.setup("fit")
        return dm.train_dataloader()

    assert isinstance(loader(), DeviceBatchLoader)
    assert isinstance(loader(device_resident=False), ResumableDataLoader)
    assert isinstance(loader(num_workers=1), ResumableDataLoader)
    assert isinstance(loader(sample_augment=SampleAugment("book")), ResumableDataLoader)
