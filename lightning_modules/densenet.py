"""Densely connected networks (notes: *Deep Networks*, DenseNet): the book's DenseNet-BC for CIFAR-10.

Book recipe (Advanced Deep Learning with Keras, chapter 2, ``densenet-cifar10-2.4.1.py``), ported layer by layer:
k (growth rate) 12, depth 100, 3 dense blocks of (100 - 4) / 6 = 16 bottleneck layers, compression 0.5.

- stem: BN -> ReLU -> Conv 3x3 (2k = 24 filters) on the image, concatenated with the image (24 + 3 = 27 channels);
- bottleneck layer: BN-ReLU-Conv 1x1 (4k) -> BN-ReLU-Conv 3x3 (k), its output concatenated onto its input;
- transition (between blocks): BN -> Conv 1x1 (compressed, no ReLU) -> AvgPool 2;
- head: AvgPool 8 -> Flatten -> Dense 10.

Channels 27 -> 219 -> 108 -> 300 -> 150 -> 342. The 108 is a quirk of the book reproduced here: its channel counter
(``num_filters_bef_dense_block``) starts at 2k = 24 and never counts the 3 image channels of the stem's concatenation,
so the first transition outputs int((24 + 16 * 12) * 0.5) = 108 channels, not int(219 * 0.5) = 109. From there on
the counter and the real channel count agree.

All convs: 'same', with bias, no L2 (the book uses none here); he_normal kernels and Keras' BatchNorm (momentum
0.99, eps 1e-3) with ``init: keras`` and ``batch_norm: keras``, as the book config sets. Dropout 0.2 after every
conv is in the book only when it trains without data augmentation; its recipe uses augmentation, hence
``dropout=0.0`` by default.
No mean subtraction; RMSprop 1e-3 with the step schedule is the config's business.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_modules.base import SupervisedModule
from lightning_modules.layers import (
    BatchNormName,
    Conv2dSame,
    batch_norm_of_old_checkpoint,
    he_normal_init_,
    set_batch_norm_style_,
)


def bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int, dropout: float) -> nn.Sequential:
    """DenseNet's composite function: BN -> ReLU -> Conv ('same') [-> Dropout]."""
    layers = OrderedDict(
        bn=nn.BatchNorm2d(in_channels), act=nn.ReLU(), conv=Conv2dSame(in_channels, out_channels, kernel_size)
    )
    if dropout > 0:
        layers["drop"] = nn.Dropout(dropout)
    return nn.Sequential(layers)


class DenseStem(nn.Module):
    """BN -> ReLU -> Conv 3x3 on the image, then ``concat([image, features])``: ``in_channels + filters`` out."""

    def __init__(self, in_channels: int, filters: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.act = nn.ReLU()
        self.conv = Conv2dSame(in_channels, filters, 3)
        self.in_channels, self.out_channels = in_channels, in_channels + filters

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(self.act(self.bn(x)))], dim=1)


class DenseLayer(nn.Module):
    """One layer of a dense block: ``concat([x, f(x)])`` with f = BN-ReLU-Conv1x1(4k) -> BN-ReLU-Conv3x3(k)
    (bottleneck, DenseNet-B) or BN-ReLU-Conv3x3(k) (``bottleneck=False``). Adds ``growth_rate`` channels."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        if bottleneck:
            layers.append(bn_relu_conv(channels, 4 * growth_rate, 1, dropout))
            channels = 4 * growth_rate
        layers.append(bn_relu_conv(channels, growth_rate, 3, dropout))
        self.layers = nn.Sequential(*layers)
        self.in_channels, self.out_channels = in_channels, in_channels + growth_rate

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


class DenseBlock(nn.Sequential):
    """``num_layers`` dense layers: ``in_channels + num_layers * growth_rate`` channels out, same spatial size."""

    def __init__(
        self, in_channels: int, num_layers: int, growth_rate: int, bottleneck: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__(
            *(DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck, dropout) for i in range(num_layers))
        )
        self.in_channels, self.out_channels = in_channels, in_channels + num_layers * growth_rate


class Transition(nn.Sequential):
    """BN -> Conv 1x1 (no ReLU, as in the book) [-> Dropout] -> AvgPool 2 (stride 2, 'valid')."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        layers = OrderedDict(bn=nn.BatchNorm2d(in_channels), conv=Conv2dSame(in_channels, out_channels, 1))
        if dropout > 0:
            layers["drop"] = nn.Dropout(dropout)
        layers["pool"] = nn.AvgPool2d(2)
        super().__init__(layers)
        self.in_channels, self.out_channels = in_channels, out_channels


def layers_per_block(depth: int, num_blocks: int, bottleneck: bool) -> int:
    """(depth - 4) / (2 * blocks) bottleneck layers per block, (depth - 4) / blocks plain ones; must be whole."""
    convs_per_layer = 2 if bottleneck else 1
    per_block, rest = divmod(depth - 4, convs_per_layer * num_blocks)
    if per_block < 1 or rest:
        kind = "DenseNet-BC" if bottleneck else "DenseNet"
        raise ValueError(
            f"{kind} depth must be {convs_per_layer * num_blocks}m+4 with m >= 1 (e.g. 100 for 16 layers per block "
            f"with bottlenecks), got {depth}."
        )
    return per_block


class DenseNet(nn.Module):
    """The book's DenseNet(-BC): ``features`` (``stem``, ``denseblock1``, ``transition1``, ...) -> ``pool`` (AvgPool
    8) -> ``flatten`` -> ``fc``.

    Args:
        growth_rate: k, channels added by each dense layer.
        depth: 6m+4 with bottlenecks (m layers per block), 3m+4 without.
        compression: Fraction of channels a transition keeps (0.5 = DenseNet-C).
        bottleneck: 1x1 (4k) conv before each 3x3 (DenseNet-B).
        dropout: Dropout after every conv of the dense layers and transitions.
        in_channels: Image channels.
        num_classes: Outputs of the Dense head.
        input_size: ``(H, W)``, to size the head (32x32 -> 8x8 maps pooled to 1x1).
        num_blocks: Dense blocks (3 in the book).
        batch_norm: ``torch`` (PyTorch's BatchNorm defaults) or ``keras`` (the book's: momentum 0.99 in Keras'
            terms, eps 1e-3).
    """

    def __init__(
        self,
        growth_rate: int = 12,
        depth: int = 100,
        compression: float = 0.5,
        bottleneck: bool = True,
        dropout: float = 0.0,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: Sequence[int] = (32, 32),
        num_blocks: int = 3,
        batch_norm: BatchNormName = "torch",
    ) -> None:
        super().__init__()
        if growth_rate < 1:
            raise ValueError(f"growth_rate={growth_rate}: must be >= 1.")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression={compression}: must be in (0, 1].")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout}: must be in [0, 1).")
        num_layers = layers_per_block(depth, num_blocks, bottleneck)
        self.num_layers = num_layers

        stem = DenseStem(in_channels, 2 * growth_rate)
        features: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
        channels = stem.out_channels
        # The book's num_filters_bef_dense_block: starts at 2k and ignores the image channels the stem concatenates.
        book_count = 2 * growth_rate
        h, w = input_size
        for i in range(1, num_blocks + 1):
            block = DenseBlock(channels, num_layers, growth_rate, bottleneck, dropout)
            features[f"denseblock{i}"] = block
            channels = block.out_channels
            if i == num_blocks:
                break
            book_count = int((book_count + num_layers * growth_rate) * compression)
            features[f"transition{i}"] = Transition(channels, book_count, dropout)
            channels = book_count
            h, w = h // 2, w // 2
        self.features = nn.Sequential(features)
        self.pool = nn.AvgPool2d(8)  # Keras AveragePooling2D(pool_size=8)
        self.flatten = nn.Flatten()
        if h < 8 or w < 8:
            raise ValueError(
                f"Input {tuple(input_size)} leaves {h}x{w} feature maps for the 8x8 average pooling of the head; "
                f"it needs inputs of at least {8 * 2 ** (num_blocks - 1)}x{8 * 2 ** (num_blocks - 1)}."
            )
        self.fc = nn.Linear(channels * (h // 8) * (w // 8), num_classes)
        set_batch_norm_style_(self, batch_norm)

    def channel_flow(self) -> list[int]:
        """Channels after the stem and after every block and transition, e.g. [27, 219, 108, 300, 150, 342]."""
        return [m.out_channels for m in self.features]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class DenseNetClassifier(SupervisedModule):
    """The book's CIFAR-10 DenseNet-BC (k 12, depth 100, compression 0.5).

    Args:
        growth_rate: k, channels each dense layer adds.
        depth: 6m+4 with bottlenecks (100: 16 layers per block), 3m+4 without.
        compression: Fraction of the channels a transition keeps.
        bottleneck: BN-ReLU-Conv1x1(4k) before every BN-ReLU-Conv3x3(k).
        dropout: After every conv; the book uses 0.2 only when it trains without augmentation, 0 in its recipe.
        input_shape: ``(C, H, W)``; CIFAR-10 is ``(3, 32, 32)``.
        batch_norm: ``torch`` (PyTorch's BatchNorm defaults) or ``keras`` (the book's: momentum 0.99 in Keras'
            terms, eps 1e-3).
        **kwargs: See :class:`~lightning_modules.base.SupervisedModule`. Here ``init: keras`` means the book's
            initialisation: he_normal (truncated) kernels and zero biases, not glorot_uniform.
    """

    def __init__(
        self,
        growth_rate: int = 12,
        depth: int = 100,
        compression: float = 0.5,
        bottleneck: bool = True,
        dropout: float = 0.0,
        input_shape: Sequence[int] = (3, 32, 32),
        batch_norm: BatchNormName = "torch",
        **kwargs,
    ) -> None:
        super().__init__(input_shape=input_shape, **kwargs)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape={self.input_shape}: DenseNet needs (C, H, W).")
        c, h, w = self.input_shape
        self.net = DenseNet(
            growth_rate, depth, compression, bottleneck, dropout, c, self.out_features, (h, w), batch_norm=batch_norm
        )
        self.init_weights()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        batch_norm_of_old_checkpoint(self, checkpoint)

    def init_weights(self) -> None:
        if self.hparams.init == "keras":
            he_normal_init_(self.net)
