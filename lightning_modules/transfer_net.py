"""The network of :class:`~lightning_modules.transfer.TransferClassifier`: inputs -> conv base -> pooling -> head.

**Inputs** (:class:`InputAdapter`): torchvision's pretrained weights expect RGB in ``[0, 1]`` normalised with the
ImageNet mean/std. With ``imagenet_normalize`` the network applies that normalisation itself, so the datamodule must
hand it ``[0, 1]`` pixels. Grey inputs (1 channel) are repeated to 3. ``resize`` upsamples inside the network before
the base: CIFAR-10's 32x32 leaves VGG16 (five 2x2 max-pools) a 1x1 map; 128 gives 4x4, like the book's 150x150
cats-vs-dogs inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "InputAdapter", "TransferNet", "dense_head", "feature_map_shape"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputAdapter(nn.Module):
    """Grey -> RGB (channel repeat), ImageNet normalisation of ``[0, 1]`` inputs, and resizing, in that order."""

    def __init__(self, channels: int, resize: int | None, imagenet_normalize: bool) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"input_shape has {channels} channels: a torchvision backbone takes RGB (3) or grey (1).")
        self.repeat = channels == 1
        self.resize = resize
        self.imagenet_normalize = imagenet_normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.repeat:
            x = x.expand(-1, 3, -1, -1)
        if self.imagenet_normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            shrink = self.resize < min(x.shape[-2:])
            x = F.interpolate(
                x, size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=shrink
            )
        return x


class TransferNet(nn.Module):
    """``inputs`` (:class:`InputAdapter`) -> ``base`` (conv base) -> ``pool`` (to a vector) -> ``head`` (dense)."""

    def __init__(self, inputs: InputAdapter, base: nn.Sequential, pool: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.inputs, self.base, self.pool, self.head = inputs, base, pool, head

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.base(self.inputs(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def dense_head(in_features: int, units: Sequence[int], dropout: float, out_features: int) -> nn.Sequential:
    """[Dense -> ReLU -> Dropout] per hidden width -> Dense (the book: Dense 256 ReLU -> Dropout .5 -> Dense)."""
    layers: list[nn.Module] = []
    for width in units:
        layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, out_features))


def feature_map_shape(base: nn.Module, x: Tensor, backbone: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the base's output for one input, computed in eval mode (the base is left in train mode)."""
    base.eval()
    try:
        with torch.no_grad():
            out = base(x)
    except RuntimeError as err:
        raise ValueError(
            f"A {tuple(x.shape[-2:])} input is too small for the {backbone} base ({err}). Upsample it inside the "
            "module with resize (e.g. --model.init_args.resize 64), or truncate the base earlier."
        ) from err
    finally:
        base.train()
    if out.ndim != 4 or 0 in out.shape:
        raise ValueError(
            f"The {backbone} base turns a {tuple(x.shape[-2:])} input into {tuple(out.shape[1:])}; a convnet base "
            "must output (C, H, W) feature maps. Upsample the inputs with resize."
        )
    return tuple(out.shape[1:])
