"""Residual networks (notes: *Deep Networks*, ResNet): ResNet v1 and the pre-activation bottleneck ResNet v2.

Book recipe (Advanced Deep Learning with Keras, chapter 2, ``resnet-cifar10-2.2.1.py``), ported layer by layer:

- ``resnet_layer`` = Conv2D('same', he_normal, ``kernel_regularizer=l2(1e-4)``) with optional BN and ReLU, either
  conv first (v1: Conv-BN-ReLU) or conv last (v2, pre-activation: BN-ReLU-Conv).
- **v1** (depth 6n+2, ResNet20 = n 3): stem layer 16; 3 stages of n blocks with 16/32/64 filters; block = layer ->
  layer without ReLU, add the shortcut, ReLU. The first block of stages 2 and 3 has stride 2 and a 1x1 stride-2
  conv shortcut (no BN). Head AvgPool 8 -> Flatten -> Dense (he_normal, no regularizer). ResNet20: 0.27 M params.
- **v2** (depth 9n+2): stem Conv-BN-ReLU 16; bottleneck block = 1x1 (stride) -> 3x3 -> 1x1, each BN-ReLU-Conv,
  except the network's very first 1x1, which follows the stem's BN-ReLU directly; the first block of every stage has
  a 1x1 projection shortcut (with the stride). Widths (in -> out): 16 -> 64, 64 -> 128, 128 -> 256. No ReLU after
  the addition. Head BN -> ReLU -> AvgPool 8 -> Flatten -> Dense.

Keras' choices copied, on request (``init: keras``, ``batch_norm: keras``, as the book configs set): BatchNorm
momentum 0.99 / eps 1e-3, he_normal = truncated normal, zero biases. Always: 'same' padding that puts the odd extra
row/column of a strided conv at the bottom/right, and the L2 penalty added to the loss.
Training (200 epochs, Adam 1e-3 with the step schedule, per-pixel mean subtraction) is the config's business.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Literal

from torch import Tensor, nn

from lightning_modules.base import SupervisedModule
from lightning_modules.layers import (
    BatchNormName,
    Conv2dSame,
    batch_norm_of_old_checkpoint,
    he_normal_init_,
    set_batch_norm_style_,
)


def same_output_size(size: int, stride: int) -> int:
    return math.ceil(size / stride)


# ---- building blocks ----------------------------------------------------------------------------------------------


class ResNetLayer(nn.Sequential):
    """The book's ``resnet_layer``: ``conv`` ('same', he_normal, L2) with optional ``bn`` and ``act`` (ReLU).

    ``conv_first`` (v1): conv -> bn -> act, BN over the conv's outputs. Otherwise (v2 pre-activation):
    bn -> act -> conv, BN over the conv's inputs. Children are named ``conv``, ``bn``, ``act``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        activation: bool = True,
        batch_norm: bool = True,
        conv_first: bool = True,
    ) -> None:
        norm_act: OrderedDict[str, nn.Module] = OrderedDict()
        if batch_norm:
            norm_act["bn"] = nn.BatchNorm2d(out_channels if conv_first else in_channels)
        if activation:
            norm_act["act"] = nn.ReLU()
        conv = Conv2dSame(in_channels, out_channels, kernel_size, stride)
        layers = OrderedDict(conv=conv, **norm_act) if conv_first else OrderedDict(**norm_act, conv=conv)
        super().__init__(layers)
        self.conv_first = conv_first


def projection(in_channels: int, out_channels: int, stride: int) -> ResNetLayer:
    """Linear projection shortcut: a 1x1 (strided) conv, no BN, no activation."""
    return ResNetLayer(in_channels, out_channels, kernel_size=1, stride=stride, activation=False, batch_norm=False)


class BasicBlock(nn.Module):
    """ResNet v1 block: Conv-BN-ReLU -> Conv-BN, plus the shortcut, then ReLU.

    The shortcut is the identity, or a 1x1 conv projection (``project=True``: first block of stages 2 and 3, where
    the first conv has stride 2 and the filters double).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1, project: bool = False) -> None:
        super().__init__()
        self.layer1 = ResNetLayer(in_channels, channels, stride=stride)
        self.layer2 = ResNetLayer(channels, channels, activation=False)
        self.shortcut = projection(in_channels, channels, stride) if project else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.shortcut(x) + self.layer2(self.layer1(x)))


class PreActBottleneck(nn.Module):
    """ResNet v2 block: BN-ReLU-Conv 1x1 (stride) -> BN-ReLU-Conv 3x3 -> BN-ReLU-Conv 1x1, plus the shortcut.

    ``preact=False`` drops the first BN-ReLU (the network's very first block, right after the stem's BN-ReLU).
    ``project=True`` (first block of every stage) makes the shortcut a 1x1 conv with the block's stride, taken from
    the block's input before any BN-ReLU. No activation after the addition.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int = 1,
        preact: bool = True,
        project: bool = False,
    ) -> None:
        super().__init__()
        self.layer1 = ResNetLayer(
            in_channels, mid_channels, 1, stride, activation=preact, batch_norm=preact, conv_first=False
        )
        self.layer2 = ResNetLayer(mid_channels, mid_channels, 3, conv_first=False)
        self.layer3 = ResNetLayer(mid_channels, out_channels, 1, conv_first=False)
        self.shortcut = projection(in_channels, out_channels, stride) if project else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.layer3(self.layer2(self.layer1(x)))


# ---- networks -----------------------------------------------------------------------------------------------------

NUM_STAGES = 3
STEM_FILTERS = 16


def blocks_per_stage(version: int, depth: int) -> int:
    """n of the book: depth = 6n + 2 (v1) or 9n + 2 (v2), n >= 1; anything else is an error, as in the book."""
    if version not in (1, 2):
        raise ValueError(f"version={version!r}: choose 1 (ResNet v1) or 2 (ResNet v2).")
    per_block = 6 if version == 1 else 9
    if depth < per_block + 2 or (depth - 2) % per_block:
        examples = "20, 32, 44, 56, 110" if version == 1 else "11, 20, 56, 110"
        raise ValueError(f"ResNet v{version} depth must be {per_block}n+2 with n >= 1 (e.g. {examples}), got {depth}.")
    return (depth - 2) // per_block


def _stages_v1(n: int) -> tuple[nn.Sequential, int]:
    stages, in_channels = [], STEM_FILTERS
    for stage in range(NUM_STAGES):
        channels = STEM_FILTERS * 2**stage  # 16, 32, 64
        blocks = []
        for block in range(n):
            downsample = stage > 0 and block == 0
            blocks.append(BasicBlock(in_channels, channels, stride=2 if downsample else 1, project=downsample))
            in_channels = channels
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages), in_channels


def _stages_v2(n: int) -> tuple[nn.Sequential, int]:
    stages, filters_in = [], STEM_FILTERS  # the book's num_filters_in
    for stage in range(NUM_STAGES):
        filters_out = filters_in * (4 if stage == 0 else 2)  # 64, 128, 256
        blocks, in_channels = [], filters_in
        for block in range(n):
            blocks.append(
                PreActBottleneck(
                    in_channels,
                    filters_in,
                    filters_out,
                    stride=2 if stage > 0 and block == 0 else 1,
                    preact=not (stage == 0 and block == 0),
                    project=block == 0,
                )
            )
            in_channels = filters_out
        stages.append(nn.Sequential(*blocks))
        filters_in = filters_out
    return nn.Sequential(*stages), filters_in


class ResNet(nn.Module):
    """The book's ``resnet_v1`` / ``resnet_v2``: ``stem`` -> ``stages`` (3) -> ``head_act`` (v2: BN-ReLU) ->
    ``pool`` (AvgPool 8) -> ``flatten`` -> ``fc``.

    Args:
        version: 1 (basic blocks, post-activation) or 2 (pre-activation bottlenecks).
        depth: 6n+2 (v1) or 9n+2 (v2).
        in_channels: Image channels.
        num_classes: Outputs of the Dense head (logits; the book's softmax lives in the loss).
        input_size: ``(H, W)`` of the images, to size the Dense head (32x32 for CIFAR: 8x8 maps, pooled to 1x1).
        batch_norm: ``torch`` (PyTorch's BatchNorm defaults) or ``keras`` (the book's: momentum 0.99 in Keras'
            terms, eps 1e-3).
    """

    def __init__(
        self,
        version: int = 1,
        depth: int = 20,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: Sequence[int] = (32, 32),
        batch_norm: BatchNormName = "torch",
    ) -> None:
        super().__init__()
        n = blocks_per_stage(version, depth)
        self.version, self.depth, self.blocks_per_stage = version, depth, n
        self.stem = ResNetLayer(in_channels, STEM_FILTERS)  # Conv-BN-ReLU in both versions
        self.stages, channels = (_stages_v1 if version == 1 else _stages_v2)(n)
        self.head_act = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()) if version == 2 else nn.Identity()
        self.pool = nn.AvgPool2d(8)  # Keras AveragePooling2D(pool_size=8): stride 8, 'valid'
        self.flatten = nn.Flatten()
        h, w = (same_output_size(same_output_size(s, 2), 2) for s in input_size)  # two stride-2 stages
        if h < 8 or w < 8:
            raise ValueError(
                f"Input {tuple(input_size)} leaves {h}x{w} feature maps for the 8x8 average pooling of the head; "
                "it needs inputs of at least 29x29 (the book uses 32x32)."
            )
        self.fc = nn.Linear(channels * (h // 8) * (w // 8), num_classes)
        set_batch_norm_style_(self, batch_norm)

    @property
    def name(self) -> str:
        """The book's ``model_type``, e.g. ``ResNet20v1``."""
        return f"ResNet{self.depth}v{self.version}"

    def forward_features(self, x: Tensor) -> Tensor:
        return self.head_act(self.stages(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.forward_features(x))))


def resnet_v1(depth: int = 20, **kwargs) -> ResNet:
    """ResNet v1 (depth 6n+2: 20, 32, 44, 56, 110)."""
    return ResNet(1, depth, **kwargs)


def resnet_v2(depth: int = 56, **kwargs) -> ResNet:
    """ResNet v2 (depth 9n+2: 20, 56, 110)."""
    return ResNet(2, depth, **kwargs)


RESNETS: dict[str, tuple[int, int]] = {
    "resnet20": (1, 20),
    "resnet32": (1, 32),
    "resnet44": (1, 44),
    "resnet56": (1, 56),
    "resnet110": (1, 110),
    "resnet20v2": (2, 20),
    "resnet56v2": (2, 56),
    "resnet110v2": (2, 110),
}
"""The depths of the book's results table, by name: ``(version, depth)``."""


def create_resnet(name: str, **kwargs) -> ResNet:
    """A ResNet of the book's table by name (``resnet20``, ..., ``resnet110v2``)."""
    try:
        version, depth = RESNETS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown ResNet {name!r}; choose one of {sorted(RESNETS)}.") from None
    return ResNet(version, depth, **kwargs)


# ---- module -------------------------------------------------------------------------------------------------------


class ResNetClassifier(SupervisedModule):
    """The book's CIFAR-10 ResNet v1 / v2.

    Args:
        version: 1 (ResNet v1, depth 6n+2) or 2 (ResNet v2, depth 9n+2).
        depth: Number of core conv layers: 20, 32, 44, 56, 110 (v1); 20, 56, 110 (v2).
        l2: Weight of the L2 penalty ``l2 * sum(w**2)`` over every conv kernel (Keras ``kernel_regularizer``; not
            biases, BN or the Dense head), added to the training loss. 0 disables it.
        input_shape: ``(C, H, W)``; CIFAR-10 is ``(3, 32, 32)``.
        batch_norm: ``torch`` (PyTorch's BatchNorm defaults) or ``keras`` (the book's: momentum 0.99 in Keras'
            terms, eps 1e-3).
        **kwargs: See :class:`~lightning_modules.base.SupervisedModule`. Here ``init: keras`` means the book's
            initialisation for these nets: he_normal (truncated) kernels and zero biases, not glorot_uniform.

    The logged ``train/loss`` is the data loss only; the loss that is optimised is ``train/loss`` plus the penalty,
    which is what Keras reports as ``loss``.
    """

    def __init__(
        self,
        version: Literal[1, 2] = 1,
        depth: int = 20,
        l2: float = 1e-4,
        input_shape: Sequence[int] = (3, 32, 32),
        batch_norm: BatchNormName = "torch",
        **kwargs,
    ) -> None:
        super().__init__(input_shape=input_shape, l2=l2, **kwargs)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape={self.input_shape}: ResNet needs (C, H, W).")
        c, h, w = self.input_shape
        self.net = ResNet(version, depth, c, self.out_features, (h, w), batch_norm)
        self.init_weights()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        batch_norm_of_old_checkpoint(self, checkpoint)

    def init_weights(self) -> None:
        if self.hparams.init == "keras":
            he_normal_init_(self.net)

    def regularized_weights(self) -> Iterator[Tensor]:
        """The kernels with ``kernel_regularizer=l2(...)`` in the book: every Conv2D (stem, blocks, shortcuts)."""
        return (m.weight for m in self.net.modules() if isinstance(m, nn.Conv2d))
