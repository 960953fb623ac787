"""LightningDataModules: MNIST, CIFAR-10, image folders, the offline digits set, and their in-memory image base."""

from datamodules.base import CorruptDataError, DataNotFoundError, ImageDataModule, InMemoryImageDataset
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.digits import DigitsDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.imdb import IMDBDataModule
from datamodules.mnist import MNISTDataModule
from datamodules.omniglot import OmniglotDataModule
from datamodules.tabular import DiabetesDataModule

__all__ = [
    "CIFAR10DataModule",
    "CorruptDataError",
    "DataNotFoundError",
    "DiabetesDataModule",
    "DigitsDataModule",
    "IMDBDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "InMemoryImageDataset",
    "MNISTDataModule",
    "OmniglotDataModule",
]
