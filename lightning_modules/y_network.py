"""Multiple inputs (notes: *Multiple Inputs*): a Y-network whose two branches see the input with
different dilation rates and are merged into one tensor.

Book recipe (MNIST): the same image into two branches of 3 x [Conv k3 'same' ReLU -> Dropout .4 -> MaxPool 2]
with 32/64/128 filters, the right branch with dilation 2; concatenate (3x3x256) -> Flatten -> Dropout .4 ->
Dense 10; Adam, batch 32, 20 epochs, ~99.3 % test accuracy. Merging by ``add`` or ``multiply`` is the
alternative the notes list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_modules.base import SupervisedModule
from lightning_modules.layers import ActivationName, activation

MergeName = Literal["concat", "add", "multiply"]


def conv_branch(
    in_channels: int, filters: Sequence[int], kernel_size: int, dilation: int, dropout: float, act: str
) -> nn.Sequential:
    """[Conv 'same' (dilated) -> activation -> Dropout -> MaxPool 2] per filter count."""
    layers: list[nn.Module] = []
    for f in filters:
        layers += [
            nn.Conv2d(in_channels, f, kernel_size, padding="same", dilation=dilation),
            activation(act),
            nn.Dropout(dropout),
            nn.MaxPool2d(2),
        ]
        in_channels = f
    return nn.Sequential(*layers)


class YNet(nn.Module):
    """One branch per dilation rate, merged, then Flatten -> Dropout -> Dense.

    ``forward(x)`` feeds ``x`` to every branch; ``forward(x_left, x_right)`` feeds each branch its own input.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        filters: Sequence[int],
        dilations: Sequence[int],
        kernel_size: int,
        dropout: float,
        merge: MergeName,
        act: str,
        out_features: int,
    ) -> None:
        super().__init__()
        if merge not in ("concat", "add", "multiply"):
            raise ValueError(f"merge={merge!r}: choose 'concat', 'add' or 'multiply'.")
        self.merge = merge
        self.branches = nn.ModuleList(
            conv_branch(input_shape[0], filters, kernel_size, d, dropout, act) for d in dilations
        )
        with torch.no_grad():
            flat = self._merged(*[torch.zeros(1, *input_shape)] * len(dilations)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, out_features))

    def _merged(self, *inputs: Tensor) -> Tensor:
        features = [branch(x) for branch, x in zip(self.branches, inputs, strict=True)]
        if self.merge == "concat":
            return torch.cat(features, dim=1)
        out = features[0]
        for f in features[1:]:
            out = out + f if self.merge == "add" else out * f
        return out

    def forward(self, *inputs: Tensor) -> Tensor:
        if len(inputs) == 1:
            inputs = inputs * len(self.branches)
        return self.head(self._merged(*inputs))


class YNetworkClassifier(SupervisedModule):
    """Two-branch (Y-shaped) convnet with different dilation rates per branch.

    Args:
        filters: Filters of the conv blocks of each branch.
        dilations: One branch per dilation rate (the book: 1 and 2).
        kernel_size: Conv kernel size.
        dropout: Dropout inside the branches and before the head.
        merge: ``concat`` (book), ``add`` or ``multiply``.
        activation: Activation by name.
        **kwargs: See :class:`~lightning_modules.base.SupervisedModule`.
    """

    def __init__(
        self,
        filters: Sequence[int] = (32, 64, 128),
        dilations: Sequence[int] = (1, 2),
        kernel_size: int = 3,
        dropout: float = 0.4,
        merge: MergeName = "concat",
        activation: ActivationName = "relu",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = YNet(
            self.input_shape, filters, dilations, kernel_size, dropout, merge, activation, self.out_features
        )
        self.init_weights()

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.net(*inputs)
