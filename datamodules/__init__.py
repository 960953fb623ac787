"""LightningDataModules: MNIST, CIFAR-10, the offline digits set, and the in-memory image base they share."""

from datamodules.base import CorruptDataError, DataNotFoundError, ImageDataModule, InMemoryImageDataset
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.digits import DigitsDataModule
from datamodules.mnist import MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "CorruptDataError",
    "DataNotFoundError",
    "DigitsDataModule",
    "ImageDataModule",
    "InMemoryImageDataset",
    "MNISTDataModule",
]
