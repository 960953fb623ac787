"""LightningDataModules: MNIST, the offline digits set, and the in-memory image base they share."""

from datamodules.base import CorruptDataError, DataNotFoundError, ImageDataModule, InMemoryImageDataset
from datamodules.digits import DigitsDataModule
from datamodules.mnist import MNISTDataModule

__all__ = [
    "CorruptDataError",
    "DataNotFoundError",
    "DigitsDataModule",
    "ImageDataModule",
    "InMemoryImageDataset",
    "MNISTDataModule",
]
