"""CIFAR-10 from torchvision's pickled ``<data_dir>/cifar-10-batches-py``, decoded once into memory."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torchvision.datasets import cifar

from datamodules.base import CorruptDataError, DataNotFoundError, ImageDataModule


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50k training images (minus ``val_size`` for validation) and the official 10k test set.

    The files are torchvision's (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``, ``batches.meta``),
    md5-checked when read. ``prepare_data`` downloads them with torchvision when absent (one process per
    node). See :class:`~datamodules.base.ImageDataModule` for the split, normalisation and batching options.
    """

    num_classes = 10
    dims = (3, 32, 32)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def __init__(self, val_size: int | float = 5000, batch_size: int = 32, **kwargs) -> None:
        super().__init__(val_size=val_size, batch_size=batch_size, **kwargs)

    @property
    def folder(self) -> Path:
        return self.data_dir / cifar.CIFAR10.base_folder

    def _bad_files(self) -> list[str]:
        """Names of the files that are missing or fail their md5 check."""
        entries = [*cifar.CIFAR10.train_list, *cifar.CIFAR10.test_list]
        entries.append([cifar.CIFAR10.meta["filename"], cifar.CIFAR10.meta["md5"]])
        return [name for name, md5 in entries if not cifar.check_integrity(str(self.folder / name), md5)]

    def prepare_data(self) -> None:
        if not self._bad_files():
            return
        rank_zero_info(f"CIFAR-10 not found (or incomplete) in {self.folder}; downloading it with torchvision ...")
        try:
            cifar.CIFAR10(str(self.data_dir), train=True, download=True)
        except Exception as err:  # URLError, OSError, RuntimeError depending on what failed
            raise DataNotFoundError(
                f"CIFAR-10 is not in {self.folder} (missing or damaged: {', '.join(self._bad_files())}) and "
                f"downloading it from {cifar.CIFAR10.url} failed ({type(err).__name__}: {err}). Either run once "
                "with network access (e.g. on a login node: scripts/download_data.py), or extract "
                f"{cifar.CIFAR10.filename} into {self.data_dir}, or point --data.init_args.data_dir (or "
                "$DATA_DIR) at a folder that holds cifar-10-batches-py/."
            ) from err

    def load_split(self, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
        bad = self._bad_files()
        if bad:
            missing = [name for name in bad if not (self.folder / name).is_file()]
            error = DataNotFoundError if missing else CorruptDataError
            raise error(
                f"CIFAR-10 files in {self.folder} are missing ({', '.join(missing) or 'none'}) or fail their md5 "
                f"check ({', '.join(n for n in bad if n not in missing) or 'none'}). Delete the damaged files "
                "and run again with network access to download a fresh copy, or set --data.init_args.data_dir "
                "/ $DATA_DIR to a folder holding an intact cifar-10-batches-py/."
            )
        dataset = cifar.CIFAR10(str(self.data_dir), train=split == "train", download=False)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW, uint8
        return images, torch.tensor(dataset.targets, dtype=torch.long)
