"""One LightningModule per topic of the notes; the supervised ones share a classification base."""

from lightning_modules.airbench import AirbenchClassifier
from lightning_modules.autoencoder import AutoEncoder
from lightning_modules.base import SupervisedModule
from lightning_modules.baseline import BaselineModule
from lightning_modules.cnn import CNNClassifier
from lightning_modules.densenet import DenseNetClassifier
from lightning_modules.few_shot import NearestNeighbourBaseline, ProtoNet
from lightning_modules.gan import GAN
from lightning_modules.mlp import MLPClassifier
from lightning_modules.ngram import NGramClassifier
from lightning_modules.resnet import ResNetClassifier
from lightning_modules.rnn import RNNClassifier
from lightning_modules.text import MultiHotMLPClassifier, SequenceClassifier
from lightning_modules.transfer import TransferClassifier
from lightning_modules.y_network import YNetworkClassifier

__all__ = [
    "GAN",
    "AirbenchClassifier",
    "AutoEncoder",
    "BaselineModule",
    "CNNClassifier",
    "DenseNetClassifier",
    "MLPClassifier",
    "MultiHotMLPClassifier",
    "NGramClassifier",
    "NearestNeighbourBaseline",
    "ProtoNet",
    "RNNClassifier",
    "ResNetClassifier",
    "SequenceClassifier",
    "SupervisedModule",
    "TransferClassifier",
    "YNetworkClassifier",
]
