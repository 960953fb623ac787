"""Image folders (one directory per class) and the per-sample albumentations path, on JPEG/PNG trees written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train import main

from datamodules import CorruptDataError, DataNotFoundError, ImageFolderDataModule
from datamodules.augment import SampleAugment
from datamodules.base import AugmentedDataset
from datamodules.synthetic import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cats", "dogs", "owls"]


def write_tree(root: Path, splits: dict[str, int], size: tuple[int, int] = (20, 24), classes=CLASSES) -> Path:
    return write_image_folder(root, splits, size, classes)


def test_classes_labels_and_resize(tmp_path):
    root = write_tree(tmp_path / "set", {"train": 6, "test": 2})
    (root / "train" / "cats" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    dm = ImageFolderDataModule(data_dir=str(root), image_size=(8, 10), val_size=3, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.classes == CLASSES and dm.num_classes == 3 and dm.dims == (3, 8, 10)
    assert len(dm.train_set) == 15 and len(dm.val_set) == 3 and len(dm.test_set) == 6
    assert dm.train_set.images.dtype == torch.uint8 and dm.train_set.images.shape[1:] == (3, 8, 10)
    # Labels follow the folder: brightness rises with the class index in every split.
    for dataset in (dm.train_set, dm.test_set):
        brightness = dataset.images.float().mean((1, 2, 3))
        for label in range(3):
            assert (brightness[dataset.targets == label] - (60 + 60 * label)).abs().max() < 8
    x, _ = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1  # normalize: scale gives [0, 1]


def test_grayscale_and_an_existing_val_folder(tmp_path):
    root = write_tree(tmp_path / "set", {"train": 4, "val": 2})
    dm = ImageFolderDataModule(data_dir=str(root), image_size=(6, 6), channels=1)
    dm.setup("fit")
    assert len(dm.train_set) == 12 and len(dm.val_set) == 6  # val/ is used as is, nothing carved
    assert dm.train_set.images.shape[1:] == (1, 6, 6)


def test_a_fold_is_cut_from_the_training_folder_even_with_a_val_folder(tmp_path):
    root = write_tree(tmp_path / "set", {"train": 6, "val": 1})
    folds = [ImageFolderDataModule(data_dir=str(root), image_size=(6, 6), fold=k, num_folds=3) for k in range(3)]
    for dm in folds:
        dm.setup("fit")
        assert len(dm.train_set) == 12 and len(dm.val_set) == 6  # 18 training images, val/ (3 images) unread
        assert torch.bincount(dm.val_set.targets).tolist() == [2, 2, 2]  # stratified: 2 of each class's 6
    pool = torch.cat([dm.val_set.images for dm in folds]).float().sum()
    assert pool == folds[0].load_folder("train")[0].float().sum()  # the folds' val parts cover the folder


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "set", {"train": 3})
    dm = ImageFolderDataModule(data_dir=str(root), image_size=(8, 8), val_size=1)
    dm.prepare_data()
    assert len(list((root / ".cache").glob("train-*.pt"))) == 1
    decoded = dm.load_split("train")[0]

    def no_decode(paths):
        raise AssertionError("decoded again although the cache is current")

    fresh = ImageFolderDataModule(data_dir=str(root), image_size=(8, 8), val_size=1)
    monkeypatch.setattr(fresh, "decode", no_decode)
    assert torch.equal(fresh.load_split("train")[0], decoded)
    # Another size, or a changed file, is another cache key.
    other = ImageFolderDataModule(data_dir=str(root), image_size=(4, 4))
    assert other.cache_path("train", other.files("train")[0]) != dm.cache_path("train", dm.files("train")[0])
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "train" / "dogs" / "000.jpg")
    with pytest.raises(AssertionError, match="decoded again"):
        fresh.load_split("train")


def test_bad_trees_are_explained(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"no class folders in .*train"):
        ImageFolderDataModule(data_dir=str(tmp_path / "nothing")).setup("fit")
    root = write_tree(tmp_path / "set", {"train": 2})
    with pytest.raises(DataNotFoundError, match=r"split folder .*test does not exist"):
        ImageFolderDataModule(data_dir=str(root), image_size=(8, 8), normalize="scale").setup("test")
    write_tree(root, {"test": 1}, classes=["cats", "zebras"])
    (root / "test" / ".ipynb_checkpoints").mkdir()  # hidden folders are skipped, and do not hide a real problem
    with pytest.raises(CorruptDataError, match=r"class folders \['zebras'\]"):
        ImageFolderDataModule(data_dir=str(root), image_size=(8, 8)).setup("test")
    (root / "train" / "owls" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(CorruptDataError, match=r"broken\.jpg"):
        ImageFolderDataModule(data_dir=str(root), image_size=(8, 8), val_size=1).setup("fit")
    with pytest.raises(ValueError, match="channels=2"):
        ImageFolderDataModule(data_dir=str(root), channels=2)


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = write_tree(tmp_path / "set", {"train": 2})
    (root / "train" / "empty_class").mkdir()  # would be an 11th output the model never sees an image of
    (root / "train" / "empty_class" / "notes.txt").write_text("not an image")
    with pytest.raises(CorruptDataError, match=r"class folder\(s\) .*train/empty_class hold no image files"):
        ImageFolderDataModule(data_dir=str(root), image_size=(8, 8)).setup("fit")


# ---- albumentations ------------------------------------------------------------------------------------------------


def test_sample_augment_specs_and_presets():
    torch.manual_seed(0)  # the pipeline is seeded from torch's RNG
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    assert torch.equal(SampleAugment(transforms=[{"name": "HorizontalFlip", "p": 1.0}])(x), x.flip(-1))
    for preset in ("book", "notes"):
        out = SampleAugment(preset)(x)
        assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x)
    grey = torch.randint(0, 256, (3, 1, 9, 9), dtype=torch.uint8)
    assert SampleAugment("notes")(grey).shape == grey.shape
    with pytest.raises(ValueError, match="'name' must name an albumentations transform"):
        SampleAugment(transforms=[{"name": "NoSuchTransform"}])
    with pytest.raises(ValueError, match="rejected its arguments"):
        SampleAugment(transforms=[{"name": "HorizontalFlip", "probability": 1}])
    with pytest.raises(ValueError, match="preset='keras'"):
        SampleAugment("keras")


def test_sample_augment_is_seeded_by_torch():
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    augment = SampleAugment("notes")
    torch.manual_seed(3)
    first = augment(x)
    torch.manual_seed(3)
    assert torch.equal(augment(x), first)
    assert not torch.equal(augment(x), first)


def test_sample_augment_touches_training_batches_only(tmp_path):
    root = write_tree(tmp_path / "set", {"train": 4})
    dm = ImageFolderDataModule(
        data_dir=str(root),
        image_size=(8, 8),
        val_size=3,
        batch_size=64,
        sample_augment=SampleAugment(transforms=[{"name": "HorizontalFlip", "p": 1.0}]),
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset, AugmentedDataset)
    (x, y), order = next(iter(loader)), list(iter(loader.sampler))
    assert torch.equal(x, dm.train_set.images[order].flip(-1)) and torch.equal(y, dm.train_set.targets[order])
    val_x, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(val_x, dm.val_set.images)


def test_cats_vs_dogs_config_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_tree(tmp_path / "cats_vs_dogs", {"train": 4, "val": 2}, classes=["cats", "dogs"])
    config = ROOT / "configs" / "image_folder" / "cats_vs_dogs_frozen.yaml"
    cli = main(["fit", "-c", str(config), "--data.init_args.data_dir", str(root),
                "--data.init_args.image_size", "[32, 32]", "--data.init_args.num_workers", "0",
                "--data.init_args.batch_size", "4", "--model.init_args.input_shape", "[3, 32, 32]",
                "--model.init_args.backbone", "resnet18", "--model.init_args.weights", "random",
                "--model.init_args.pool", "avg", "--trainer.fast_dev_run", "1"])  # fmt: skip
    assert cli.trainer.state.finished
    assert isinstance(cli.datamodule.sample_augment, SampleAugment) and cli.datamodule.num_classes == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
