"""Batch-level image augmentation as one affine warp per sample, on the device (Keras ``ImageDataGenerator``).

The notes' augmentation set (rotation, width/height shift, shear, zoom, horizontal flip, nearest fill) is what
Keras' ``ImageDataGenerator`` draws per image. Here the same random transforms are drawn for a whole batch at
once and applied with one ``affine_grid`` + ``grid_sample`` call: no per-sample Python work, and on the GPU when
the batch is there. Training batches only: the datamodules apply it in ``on_after_batch_transfer`` while fitting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchAugment(nn.Module):
    """Random affine augmentation of an ``(N, C, H, W)`` float batch, Keras ``ImageDataGenerator`` style.

    Args:
        rotation_range: Degrees; the angle is uniform in ``[-r, r]``.
        width_shift_range: Fraction of the width; the horizontal shift is uniform in ``[-s, s] * W`` pixels.
        height_shift_range: Fraction of the height, likewise.
        shear_range: Shear angle in degrees, uniform in ``[-s, s]``.
        zoom_range: Zoom factors uniform in ``[1 - z, 1 + z]``, drawn independently for x and y (as Keras).
        horizontal_flip: Mirror half of the images left-right.
        fill_mode: ``nearest`` repeats the edge pixels (Keras' default), ``constant`` fills with 0, ``reflection``
            mirrors.

    The book's CIFAR-10 recipe is ``width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True``.
    Transforms are bilinear like Keras' (``order=1``); a batch whose ranges are all zero passes unchanged.
    """

    _PADDING = {"nearest": "border", "constant": "zeros", "reflection": "reflection"}

    def __init__(
        self,
        rotation_range: float = 0.0,
        width_shift_range: float = 0.0,
        height_shift_range: float = 0.0,
        shear_range: float = 0.0,
        zoom_range: float = 0.0,
        horizontal_flip: bool = False,
        fill_mode: str = "nearest",
    ) -> None:
        super().__init__()
        if fill_mode not in self._PADDING:
            raise ValueError(f"fill_mode={fill_mode!r}: choose one of {sorted(self._PADDING)}.")
        for name, value in (
            ("rotation_range", rotation_range),
            ("width_shift_range", width_shift_range),
            ("height_shift_range", height_shift_range),
            ("shear_range", shear_range),
            ("zoom_range", zoom_range),
        ):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0.")
        if zoom_range >= 1:
            raise ValueError(f"zoom_range={zoom_range} must be < 1 (zoom factors are drawn in [1 - z, 1 + z]).")
        self.rotation_range = rotation_range
        self.width_shift_range = width_shift_range
        self.height_shift_range = height_shift_range
        self.shear_range = shear_range
        self.zoom_range = zoom_range
        self.horizontal_flip = horizontal_flip
        self.fill_mode = fill_mode

    @property
    def active(self) -> bool:
        ranges = (self.rotation_range, self.width_shift_range, self.height_shift_range, self.shear_range)
        return any(ranges) or bool(self.zoom_range) or self.horizontal_flip

    def matrices(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """``(n, 2, 3)`` affine matrices mapping output to input coordinates in ``affine_grid``'s [-1, 1] units."""

        def uniform(limit: float) -> Tensor:
            return (torch.rand(n, device=device, generator=generator) * 2 - 1) * limit

        theta = torch.deg2rad(uniform(self.rotation_range))
        shear = torch.deg2rad(uniform(self.shear_range))
        zoom_x = 1 + uniform(self.zoom_range)
        zoom_y = 1 + uniform(self.zoom_range)
        # A shift of s * W pixels is 2 * s in normalised units (the image spans [-1, 1]).
        shift_x = 2 * uniform(self.width_shift_range)
        shift_y = 2 * uniform(self.height_shift_range)
        flip = torch.ones(n, device=device)
        if self.horizontal_flip:
            flip = torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(theta), torch.sin(theta)
        # rotation @ shear @ zoom, then the flip of the input's x axis; translation in the last column.
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shear_m = torch.stack(
            [torch.stack([torch.ones_like(shear), -torch.sin(shear)], -1),
             torch.stack([torch.zeros_like(shear), torch.cos(shear)], -1)], -2
        )  # fmt: skip
        zoom = torch.diag_embed(torch.stack([zoom_x, zoom_y], -1))
        linear = rotation @ shear_m @ zoom
        linear[:, 0, :] *= flip[:, None]
        return torch.cat([linear, torch.stack([shift_x, shift_y], -1)[..., None]], -1)

    def forward(self, images: Tensor) -> Tensor:
        if not self.active:
            return images
        matrices = self.matrices(len(images), images.device).to(images.dtype)
        grid = F.affine_grid(matrices, list(images.shape), align_corners=False)
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode=self._PADDING[self.fill_mode], align_corners=False
        )

    def extra_repr(self) -> str:
        fields = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range")
        parts = [f"{name}={getattr(self, name)}" for name in fields if getattr(self, name)]
        return ", ".join([*parts, *(["horizontal_flip=True"] if self.horizontal_flip else [])])


__all__ = ["BatchAugment"]
