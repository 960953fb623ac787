"""Test-time augmentation of image classifiers: average the logits of flipped and shifted views of a batch.

Levels (airbench's): 0 the plain logits; 1 the mean of the image and its left-right mirror; 2 half of level 1 plus
half the mean of level 1 over two one-pixel diagonal shifts (up-left and down-right, edges reflected), i.e. six
views. Everything runs on the batch's device, one forward pass per view.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

TTA_LEVELS = (0, 1, 2)


def mirror_logits(net: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Mean logits of ``images`` and their left-right mirror images."""
    return 0.5 * (net(images) + net(images.flip(-1)))


def shifted_views(images: Tensor, shift: int = 1) -> list[Tensor]:
    """``images`` shifted by ``shift`` pixels up-left and down-right (edges reflected), same size."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (shift,) * 4, mode="reflect")
    return [padded[..., :h, :w], padded[..., 2 * shift : 2 * shift + h, 2 * shift : 2 * shift + w]]


def tta_logits(net: Callable[[Tensor], Tensor], images: Tensor, level: int = 2) -> Tensor:
    """Logits of ``images`` averaged over the views of ``level`` (see the module docstring)."""
    if level not in TTA_LEVELS:
        raise ValueError(f"tta level={level}: choose 0 (none), 1 (mirror) or 2 (mirror + one-pixel shifts).")
    if level == 0:
        return net(images)
    logits = mirror_logits(net, images)
    if level == 1:
        return logits
    shifted = sum(mirror_logits(net, view) for view in shifted_views(images)) / 2
    return 0.5 * logits + 0.5 * shifted


__all__ = ["TTA_LEVELS", "mirror_logits", "shifted_views", "tta_logits"]
