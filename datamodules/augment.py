"""Training-set augmentation, two ways.

- :class:`BatchAugment` (the default, fast path): the notes' augmentation set (rotation, width/height shift,
  shear, zoom, horizontal flip, nearest fill), which Keras' ``ImageDataGenerator`` draws per image, drawn for a
  whole batch at once and applied with one ``affine_grid`` + ``grid_sample`` call: no per-sample Python work, on
  the GPU when the batch is there. The datamodules apply it in ``on_after_batch_transfer`` while fitting.
- :class:`SampleAugment`: an albumentations pipeline applied to each ``uint8`` image in the DataLoader (in its
  workers when ``num_workers > 0``), for the per-sample transforms albumentations does better (colour jitter,
  cutout, elastic, blur, ...). Presets give the same two recipes as ``BatchAugment``.

Both touch training batches only; validation, test and predict batches are never augmented.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def random_crop(images: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad ``(N, C, H, W)`` by ``padding`` and cut a random ``H x W`` window per image: one gather, no loop."""
    n, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dx = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    rows = torch.arange(h, device=device) + dy[:, None]  # (N, H)
    cols = torch.arange(w, device=device) + dx[:, None]  # (N, W)
    batch = torch.arange(n, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(images))


def _memory_format(images: Tensor) -> torch.memory_format:
    return torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


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
        crop_padding: Random crop with padding (the common modern CIFAR recipe: pad 4, crop back to 32x32): each
            image is zero-padded by this many pixels (0 is the mean pixel after standardisation) and a random
            window of the original size is cut, i.e. a whole-pixel shift of up to ``crop_padding`` in x and y.
            Applied before the affine warp; 0 disables it.

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
        crop_padding: int = 0,
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
            ("crop_padding", crop_padding),
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
        self.crop_padding = int(crop_padding)

    @property
    def active(self) -> bool:
        ranges = (self.rotation_range, self.width_shift_range, self.height_shift_range, self.shear_range)
        return any(ranges) or bool(self.zoom_range) or self.horizontal_flip or bool(self.crop_padding)

    @property
    def warps(self) -> bool:
        """Whether an affine warp is needed (anything beyond the padded crop)."""
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
        if self.crop_padding:
            images = random_crop(images, self.crop_padding)
        if not self.warps:
            return images
        matrices = self.matrices(len(images), images.device).to(images.dtype)
        grid = F.affine_grid(matrices, list(images.shape), align_corners=False)
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode=self._PADDING[self.fill_mode], align_corners=False
        )

    def extra_repr(self) -> str:
        fields = ("crop_padding", "rotation_range", "width_shift_range", "height_shift_range", "shear_range")
        fields += ("zoom_range",)
        parts = [f"{name}={getattr(self, name)}" for name in fields if getattr(self, name)]
        return ", ".join([*parts, *(["horizontal_flip=True"] if self.horizontal_flip else [])])


# The two recipes of the notes, as albumentations specs ({"name": <albumentations class>, **its arguments}).
# Keras' shear_range is an angle in degrees and its fill_mode="nearest" repeats edge pixels (BORDER_REPLICATE).
SAMPLE_PRESETS: dict[str, list[dict[str, Any]]] = {
    # The book's CIFAR-10 recipe: shifts of up to 10 % of each side and horizontal flips.
    "book": [
        {"name": "Affine", "translate_percent": (-0.1, 0.1), "border_mode": cv2.BORDER_REPLICATE, "p": 1.0},
        {"name": "HorizontalFlip", "p": 0.5},
    ],
    # The notes' small-data recipe (cats vs dogs): rotation 40, shifts 0.2, shear 0.2, zoom 0.2, flips.
    "notes": [
        {
            "name": "Affine",
            "rotate": (-40, 40),
            "translate_percent": (-0.2, 0.2),
            "shear": (-0.2, 0.2),
            "scale": (0.8, 1.2),
            "border_mode": cv2.BORDER_REPLICATE,
            "p": 1.0,
        },
        {"name": "HorizontalFlip", "p": 0.5},
    ],
}


def build_transform(spec: dict[str, Any]) -> A.BasicTransform:
    """One albumentations transform from ``{"name": "Affine", **kwargs}`` (how YAML configs spell them)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    cls = getattr(A, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise ValueError(
            f"augmentation spec {spec | {'name': name}}: 'name' must name an albumentations transform class "
            f"(e.g. Affine, HorizontalFlip, ColorJitter, CoarseDropout), got {name!r}."
        )
    try:
        with warnings.catch_warnings(record=True) as caught:  # albumentations only warns about unknown arguments
            warnings.simplefilter("always")
            transform = cls(**spec)
    except (TypeError, ValueError) as err:  # it validates the known ones with pydantic
        raise ValueError(f"albumentations.{name}({spec}) rejected its arguments: {err}") from err
    unknown = [str(w.message) for w in caught if "not valid" in str(w.message)]
    if unknown:
        raise ValueError(f"albumentations.{name}({spec}) rejected its arguments: {unknown[0]}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return transform


class SampleAugment:
    """Per-image albumentations augmentation of ``uint8`` training batches (``datamodule.sample_augment``).

    It runs inside the DataLoader on ``uint8`` HWC arrays, the format albumentations (OpenCV) is fastest on,
    before the batch moves to the device; set ``num_workers`` so the loader keeps up with the model. Each call
    seeds the pipeline from torch's RNG, so runs are reproducible under ``seed_everything`` and every
    DataLoader worker (seeded by PyTorch per worker) draws different transforms.

    Args:
        preset: ``book`` (shift 0.1 + horizontal flip, the ResNet recipe) or ``notes`` (rotation 40, shift 0.2,
            shear 0.2, zoom 0.2, flip, the small-data recipe). Ignored when ``transforms`` is given.
        transforms: Albumentations transforms as ``[{name: HorizontalFlip, p: 0.5}, {name: ColorJitter}, ...]``;
            any class of the ``albumentations`` namespace with its own arguments.
    """

    def __init__(self, preset: str | None = "book", transforms: Sequence[dict[str, Any]] | None = None) -> None:
        if transforms is None:
            if preset not in SAMPLE_PRESETS:
                raise ValueError(
                    f"preset={preset!r}: choose one of {sorted(SAMPLE_PRESETS)}, or list albumentations "
                    "transforms in 'transforms'."
                )
            transforms = SAMPLE_PRESETS[preset]
        self.specs = [dict(spec) for spec in transforms]
        self.pipeline = A.Compose([build_transform(spec) for spec in self.specs])

    def __call__(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` ``uint8`` -> augmented ``(N, C, H, W)`` ``uint8`` of the same size."""
        self.pipeline.set_random_seed(int(torch.randint(2**31 - 1, ())))
        arrays = images.permute(0, 2, 3, 1).numpy()
        out = np.stack([self.pipeline(image=array)["image"].reshape(array.shape) for array in arrays])
        if out.shape != arrays.shape:
            raise ValueError(f"the augmentation changed the image size {arrays.shape[1:3]}: add a Resize/crop back")
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"SampleAugment({self.pipeline.transforms})"


__all__ = ["SAMPLE_PRESETS", "BatchAugment", "SampleAugment", "build_transform", "random_crop"]
