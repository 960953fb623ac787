"""MNIST from torchvision's raw layout (``<data_dir>/MNIST/raw/*-ubyte[.gz]``), decoded once into memory."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from datamodules.base import CorruptDataError, DataNotFoundError, ImageDataModule

# IDX magic numbers: 0x0803 = uint8 with 3 dims (images), 0x0801 = uint8 with 1 dim (labels).
IDX_UBYTE_MAGIC = {3: 2051, 1: 2049}

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx_ubyte(path: Path, ndim: int) -> Tensor:
    """Read an unsigned-byte IDX file (optionally gzipped) into a ``uint8`` tensor, checking its header."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise CorruptDataError(
            f"Cannot read {path}: {err}. The file is damaged or not a (gzipped) IDX file; delete it and run "
            "again to download a fresh copy, or replace it with the original file."
        ) from err
    header_size = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != IDX_UBYTE_MAGIC[ndim] or len(raw) < header_size:
        raise CorruptDataError(
            f"{path} is not an unsigned-byte IDX file with {ndim} dimension(s) (magic number {magic}, expected "
            f"{IDX_UBYTE_MAGIC[ndim]}). Replace it with the original MNIST file of that name."
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_size + int(np.prod(shape))
    if len(raw) != expected:
        raise CorruptDataError(
            f"{path} is truncated or padded: its header promises shape {shape} ({expected} bytes) but the file "
            f"holds {len(raw)} bytes. Delete it and run again to download a fresh copy."
        )
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape).copy())


class MNISTDataModule(ImageDataModule):
    """MNIST handwritten digits: 60k train (minus ``val_size`` for validation) and the official 10k test set.

    Files are read from ``<data_dir>/MNIST/raw/`` as torchvision lays them out (plain or ``.gz``).
    ``prepare_data`` downloads them with torchvision when absent (on one process per node).
    """

    num_classes = 10
    dims = (1, 28, 28)
    classes = [str(i) for i in range(10)]

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "MNIST" / "raw"

    def _find(self, name: str) -> Path | None:
        for candidate in (self.raw_dir / name, self.raw_dir / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def _missing(self) -> list[str]:
        return [name for names in MNIST_FILES.values() for name in names if self._find(name) is None]

    def prepare_data(self) -> None:
        if not self._missing():
            return
        from torchvision.datasets import MNIST

        rank_zero_info(f"MNIST not found in {self.raw_dir}; downloading it with torchvision ...")
        try:
            for train in (True, False):
                MNIST(str(self.data_dir), train=train, download=True)
        except Exception as err:  # torchvision raises RuntimeError/URLError/OSError depending on the failure
            raise DataNotFoundError(
                f"MNIST is not in {self.raw_dir} (missing: {', '.join(self._missing())}) and downloading it "
                f"from {MNIST.mirrors[0]} failed ({type(err).__name__}: {err}). Either run once with network "
                f"access (e.g. on a login node), or copy the four files train-images-idx3-ubyte, "
                f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz) "
                f"into {self.raw_dir}, or point --data.init_args.data_dir (or $DATA_DIR) at a folder that "
                f"holds MNIST/raw/."
            ) from err

    def load_split(self, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
        image_name, label_name = MNIST_FILES[split]
        image_path, label_path = self._find(image_name), self._find(label_name)
        if image_path is None or label_path is None:
            raise DataNotFoundError(
                f"MNIST {split} files are missing from {self.raw_dir} (expected {image_name}[.gz] and "
                f"{label_name}[.gz]). Run prepare_data (the CLI does) with network access, or copy the files "
                "there, or set --data.init_args.data_dir / $DATA_DIR to a folder holding MNIST/raw/."
            )
        images = read_idx_ubyte(image_path, ndim=3)
        labels = read_idx_ubyte(label_path, ndim=1)
        if len(images) != len(labels):
            raise CorruptDataError(
                f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; one of "
                "them is from another release or damaged. Replace both with the original files."
            )
        return images.unsqueeze(1), labels.long()
