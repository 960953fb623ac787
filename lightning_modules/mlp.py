"""MLP input structure (notes: *Input Structure*): an image flattened to one vector per sample.

Book recipe (MNIST): Flatten 784 -> Dense 256 ReLU -> Dropout .45 -> Dense 256 ReLU -> Dropout .45 -> Dense 10,
Adam, batch 128, 20 epochs, 98.3 % test accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from lightning_modules.base import SupervisedModule, warn_if_narrow
from lightning_modules.layers import ActivationName, activation


class MLP(nn.Sequential):
    """Flatten -> [Linear -> activation -> Dropout] per hidden width -> Linear(out_features)."""

    def __init__(
        self, in_features: int, hidden_units: Sequence[int], out_features: int, dropout: float, act: str
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for units in hidden_units:
            layers += [nn.Linear(width, units), activation(act), nn.Dropout(dropout)]
            width = units
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


class MLPClassifier(SupervisedModule):
    """A multilayer perceptron on flattened inputs.

    Args:
        hidden_units: Width of each hidden Dense layer (keep them wider than the class count).
        dropout: Dropout rate after each hidden layer.
        activation: Hidden activation by name (relu, elu, selu, softplus, tanh, sigmoid, ...).
        **kwargs: See :class:`~lightning_modules.base.SupervisedModule`.
    """

    def __init__(
        self,
        hidden_units: Sequence[int] = (256, 256),
        dropout: float = 0.45,
        activation: ActivationName = "relu",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if self.task == "multiclass":
            warn_if_narrow(hidden_units, self.num_classes, type(self).__name__)
        self.net = MLP(math.prod(self.input_shape), hidden_units, self.out_features, dropout, activation)
        self.init_weights()
