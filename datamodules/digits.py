"""An offline MNIST stand-in: scikit-learn's bundled handwritten digits, upsampled to 28x28.

The 1,797 real 8x8 scans (UCI optical recognition of handwritten digits, values 0..16) are resized to
20x20 and centred in a 28x28 frame, the way MNIST centres its 20x20 digits, then scaled to 0..255 ``uint8``.
Every MNIST model runs on it unchanged, with no download: the quickstart and the tests use it.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

from datamodules.base import ImageDataModule


def digits_as_mnist() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``uint8`` ``(N, 1, 28, 28)`` images with ``int64`` labels."""
    digits = load_digits()
    small = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    framed = F.pad(big, (4, 4, 4, 4))
    images = (framed.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, torch.from_numpy(digits.target).long()


class DigitsDataModule(ImageDataModule):
    """scikit-learn's digits as 28x28 MNIST-like images, with a fixed stratified test split.

    Args:
        test_size: Fraction held out as the test split (stratified, fixed seed, identical across runs).
        val_size: Validation fraction or count carved from the remaining training part.
        **kwargs: See :class:`~datamodules.base.ImageDataModule`.
    """

    num_classes = 10
    dims = (1, 28, 28)
    classes = [str(i) for i in range(10)]

    def __init__(self, test_size: float = 0.2, val_size: int | float = 0.1, batch_size: int = 32, **kwargs) -> None:
        super().__init__(val_size=val_size, batch_size=batch_size, **kwargs)
        self.test_size = test_size

    @cached_property
    def _splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        images, labels = digits_as_mnist()
        train_idx, test_idx = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=self.test_size,
            stratify=labels.numpy(),
            random_state=0,
        )
        return {
            "train": (images[train_idx], labels[train_idx]),
            "test": (images[test_idx], labels[test_idx]),
        }

    def load_split(self, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
        return self._splits[split]
