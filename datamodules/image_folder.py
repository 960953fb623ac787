"""Image folders, "one directory per class" (the notes' input for small image sets such as cats vs dogs).

Layout: ``<data_dir>/<split>/<class>/<image>.{jpg,jpeg,png,bmp,gif,webp}``. The classes are the sub-folders of the
training split, sorted; their index is the label. Every image is decoded once, resized to one size and stored
as a ``uint8`` tensor, so training runs on the same in-memory batch path as MNIST and CIFAR-10 (float in [0, 1]
with ``normalize: scale``). Decoding is parallel, and the decoded tensors are cached next to the data, keyed by
the file list and the decoding options, so a second run (and every DDP rank) loads them in a second.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from datamodules.base import CorruptDataError, DataNotFoundError, ImageDataModule, atomic_save

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CACHE_VERSION = 1


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted (hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def decode_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image file -> ``(H, W, C)`` ``uint8`` at ``size`` (bilinear with antialiasing, as Keras' loader)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB" if channels == 3 else "L", (size[1], size[0]))  # JPEG: decode at a reduced scale
            image = image.convert("RGB" if channels == 3 else "L")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR, reducing_gap=None)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CorruptDataError(
            f"cannot decode image {path} ({type(err).__name__}: {err}). Delete or replace the file: every file "
            f"with an image suffix ({', '.join(IMAGE_SUFFIXES)}) in a class folder is read."
        ) from err
    return array.reshape(size[0], size[1], channels)


class ImageFolderDataModule(ImageDataModule):
    """Images in ``<data_dir>/<split>/<class>/`` folders, decoded once to ``uint8`` tensors at ``image_size``.

    Args:
        data_dir: Root holding the split folders (e.g. CIFAR-10 exported as JPEG folders, cats vs dogs).
        image_size: ``(height, width)`` every image is resized to.
        channels: 3 (RGB) or 1 (grayscale); images are converted on decoding.
        train_split: Sub-folder of the training images.
        val_split: Sub-folder of the validation images. When it does not exist, ``val_size`` images are carved
            from the training split with a seeded shuffle instead. With ``fold`` set it is not read: the folds
            are cut from the training split.
        test_split: Sub-folder of the test images (needed by ``test`` and ``predict`` only).
        cache_dir: Folder for the decoded tensors (default ``<data_dir>/.cache``); ``prepare_data`` writes one
            file per split, keyed by file names, sizes, modification times and the decoding options, so any
            change decodes again. When the folder is not writable the images are decoded on every run.
        decode_workers: Threads decoding images (PIL releases the GIL while decoding).
        **kwargs: :class:`~datamodules.base.ImageDataModule` options (``val_size``, ``batch_size``, ``normalize``,
            ``augment``, ``sample_augment``, ``fold``, ``num_folds``, ...).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        image_size: tuple[int, int] = (150, 150),
        channels: Literal[1, 3] = 3,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        val_size: int | float = 0.2,
        batch_size: int = 32,
        cache_dir: str | None = None,
        decode_workers: int = 8,
        **kwargs,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: choose 3 (RGB) or 1 (grayscale).")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size={image_size}: give (height, width) in pixels.")
        super().__init__(data_dir=data_dir, val_size=val_size, batch_size=batch_size, **kwargs)
        self.dims = (channels, int(image_size[0]), int(image_size[1]))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.data_dir / ".cache"
        self._classes: list[str] | None = None

    # ---- the folder tree ---------------------------------------------------------------------------------------
    def split_dir(self, split: str) -> Path:
        return self.data_dir / split

    @property
    def classes(self) -> list[str]:
        """Class names: the sub-folders of the training split, sorted (their position is the label)."""
        if self._classes is None:
            train = self.split_dir(self.hparams.train_split)
            names = (
                sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
                if (train.is_dir())
                else []
            )
            if not names:
                raise DataNotFoundError(
                    f"no class folders in {train}. ImageFolderDataModule reads "
                    f"<data_dir>/{self.hparams.train_split}/<class>/<image files>; set --data.init_args.data_dir "
                    "to the folder holding the split folders (or $DATA_DIR), or train_split to their name."
                )
            empty = [name for name in names if not list_images(train / name)]
            if empty:  # a class without a single training image would be an output the model never learns
                raise CorruptDataError(
                    f"class folder(s) {', '.join(str(train / name) for name in empty)} hold no image files "
                    f"({', '.join(IMAGE_SUFFIXES)}). Every sub-folder of the training split is a class: put its "
                    "images there, or remove the folder."
                )
            self._classes = names
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def files(self, split: str) -> tuple[list[Path], list[int]]:
        """Image paths of ``split`` and their labels, in a fixed order."""
        folder = self.split_dir(split)
        if not folder.is_dir():
            raise DataNotFoundError(
                f"split folder {folder} does not exist. ImageFolderDataModule reads <data_dir>/<split>/<class>/ "
                f"with the classes of {self.split_dir(self.hparams.train_split)} ({', '.join(self.classes)}); "
                "create it, or point train_split/val_split/test_split at the folders you have."
            )
        unknown = sorted(
            p.name for p in folder.iterdir() if p.is_dir() and p.name not in self.classes and not p.name.startswith(".")
        )
        if unknown:
            raise CorruptDataError(
                f"{folder} has class folders {unknown} that the training split lacks ({', '.join(self.classes)}). "
                "Labels come from the training split's folder names: add those classes to it or remove them here."
            )
        paths, labels = [], []
        for label, name in enumerate(self.classes):
            if (folder / name).is_dir():
                found = list_images(folder / name)
                paths += found
                labels += [label] * len(found)
        if not paths:
            raise DataNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}/<class>/.")
        return paths, labels

    def _splits(self) -> list[str]:
        names = [self.hparams.train_split, self.hparams.val_split, self.hparams.test_split]
        return [name for name in dict.fromkeys(names) if self.split_dir(name).is_dir()]

    # ---- decoding and its cache -------------------------------------------------------------------------------
    def cache_path(self, split: str, paths: list[Path]) -> Path:
        key = hashlib.sha256()
        key.update(repr((CACHE_VERSION, self.dims, self.classes)).encode())
        for path in paths:
            stat = path.stat()
            key.update(f"{path.relative_to(self.data_dir)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return self.cache_dir / f"{split}-{key.hexdigest()[:16]}.pt"

    def decode(self, paths: list[Path]) -> Tensor:
        size, channels = self.dims[1:], self.dims[0]
        with ThreadPoolExecutor(max(1, self.hparams.decode_workers)) as pool:
            arrays = list(pool.map(lambda p: decode_image(p, size, channels), paths))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def prepare_data(self) -> None:
        """Decode every split once and cache it (one process per node; the other ranks wait, then load it)."""
        for split in self._splits():
            paths, _ = self.files(split)
            target = self.cache_path(split, paths)
            if target.is_file():
                continue
            rank_zero_info(f"Decoding {len(paths)} images of {self.split_dir(split)} at {self.dims[1:]} ...")
            images = self.decode(paths)
            try:
                atomic_save(images, target)
            except OSError as err:
                rank_zero_warn(f"cannot write the decoded-image cache in {self.cache_dir} ({err}); decoding each run")

    def load_split(self, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
        return self.load_folder(self.hparams.train_split if split == "train" else self.hparams.test_split)

    def load_folder(self, split: str) -> tuple[Tensor, Tensor]:
        """Images and labels of the split folder ``split``, from the cache when it is current."""
        paths, labels = self.files(split)
        target = self.cache_path(split, paths)
        images = None
        if target.is_file():
            try:
                images = torch.load(target, weights_only=True)
            except Exception as err:  # a damaged cache file is rebuilt, never trusted
                rank_zero_warn(f"ignoring the unreadable cache {target} ({err}); decoding the images again")
        if images is None or images.shape != (len(paths), *self.dims):
            images = self.decode(paths)
        return images, torch.tensor(labels, dtype=torch.long)

    # ---- splits ------------------------------------------------------------------------------------------------
    def _setup_train_val(self) -> None:
        hp = self.hparams
        if hp.fold is not None or hp.val_split == hp.train_split or not self.split_dir(hp.val_split).is_dir():
            return super()._setup_train_val()  # a fold of, or val_size images carved from, the training split
        self.train_set = self._dataset(*self.load_folder(self.hparams.train_split))
        self.val_set = self._dataset(*self.load_folder(self.hparams.val_split))
        if self.mean is None:
            self.set_stats(*self._compute_stats(self.train_set.images))
