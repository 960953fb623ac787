"""CNN input structure (notes: *Convolutional Networks*): Conv2D, pooling, flatten, dense head.

Book recipe (MNIST): Conv 64 k3 ReLU -> MaxPool 2 -> Conv 64 k3 ReLU -> MaxPool 2 -> Conv 64 k3 ReLU ->
Flatten (576) -> Dropout .2 -> Dense 10, 'valid' padding, Adam, batch 128, 10 epochs, 99.4 % test accuracy.

``batch_norm=True`` puts a BatchNorm after every conv (Conv without bias -> BN -> activation), as the fast MNIST
recipe (``configs/mnist/fast.yaml``) does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_modules.base import SupervisedModule
from lightning_modules.layers import ActivationName, activation


class ConvNet(nn.Sequential):
    """[Conv (-> BatchNorm) -> activation -> MaxPool] per filter count (no pool after the last conv) -> Flatten ->
    Dropout -> Dense."""

    def __init__(
        self,
        input_shape: Sequence[int],
        filters: Sequence[int],
        out_features: int,
        kernel_size: int = 3,
        pool_size: int = 2,
        stride: int = 1,
        padding: str = "valid",
        dropout: float = 0.2,
        act: str = "relu",
        batch_norm: bool = False,
    ) -> None:
        features: list[nn.Module] = []
        channels = input_shape[0]
        for i, f in enumerate(filters):
            # A conv bias before a BatchNorm is cancelled by the BN's mean subtraction: left out then.
            features.append(nn.Conv2d(channels, f, kernel_size, stride=stride, padding=padding, bias=not batch_norm))
            features += [nn.BatchNorm2d(f), activation(act)] if batch_norm else [activation(act)]
            if i < len(filters) - 1:
                features.append(nn.MaxPool2d(pool_size))
            channels = f
        body = nn.Sequential(*features)
        with torch.no_grad():
            flat = body(torch.zeros(1, *input_shape)).numel()
        super().__init__(body, nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, out_features))


class CNNClassifier(SupervisedModule):
    """A plain convnet classifier.

    Args:
        filters: Output channels of each Conv2D layer.
        kernel_size: Square kernel size of every conv.
        pool_size: Max-pooling window between convs.
        stride: Conv stride (the notes: strides are another way to down-sample).
        padding: ``valid`` (Keras default, no padding) or ``same``.
        dropout: Dropout after Flatten.
        activation: Activation by name.
        batch_norm: A BatchNorm (PyTorch defaults) after every conv, before its activation; the convs then have
            no bias.
        **kwargs: See :class:`~lightning_modules.base.SupervisedModule`.
    """

    def __init__(
        self,
        filters: Sequence[int] = (64, 64, 64),
        kernel_size: int = 3,
        pool_size: int = 2,
        stride: int = 1,
        padding: str = "valid",
        dropout: float = 0.2,
        activation: ActivationName = "relu",
        batch_norm: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = ConvNet(
            self.input_shape,
            filters,
            self.out_features,
            kernel_size,
            pool_size,
            stride,
            padding,
            dropout,
            activation,
            batch_norm,
        )
        self.init_weights()
