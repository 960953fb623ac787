"""Batch augmentation: exact shifts and flips, identity when off, Keras-like ranges, all on whole batches."""

from __future__ import annotations

import pytest
import torch

from datamodules.augment import BatchAugment


def shifted(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Integer shift with edge (nearest) fill: content moves right by dx and down by dy."""
    _, _, h, w = images.shape
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return images[:, :, rows][:, :, :, cols]


def test_off_is_identity():
    x = torch.rand(4, 3, 8, 8)
    assert BatchAugment()(x) is x


def test_flip_mirrors_about_half_the_batch():
    torch.manual_seed(0)
    x = torch.rand(256, 1, 6, 6)
    out = BatchAugment(horizontal_flip=True)(x)
    flipped = torch.isclose(out, x.flip(-1), atol=1e-5).flatten(1).all(1)
    kept = torch.isclose(out, x, atol=1e-5).flatten(1).all(1)
    assert torch.all(flipped | kept) and 90 < flipped.sum() < 166


def test_whole_pixel_shift_matches_a_nearest_fill_shift():
    x = torch.rand(1, 2, 10, 10)
    augment = BatchAugment(width_shift_range=0.2, height_shift_range=0.2)
    # Force a shift of exactly -2 px in x and +1 px in y: normalised units are 2 * pixels / size.
    matrix = torch.tensor([[[1.0, 0.0, -0.4], [0.0, 1.0, 0.2]]])
    augment.matrices = lambda n, device, generator=None: matrix  # the sampling path is what is tested here
    out = augment(x)
    assert torch.allclose(out, shifted(x, dx=2, dy=-1), atol=1e-5)


def test_random_ranges_stay_within_keras_bounds():
    augment = BatchAugment(rotation_range=20, width_shift_range=0.1, height_shift_range=0.1, zoom_range=0.2)
    m = augment.matrices(2000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert m.shape == (2000, 2, 3)
    assert m[:, :, 2].abs().max() <= 0.2 + 1e-6 and m[:, :, 2].abs().max() > 0.19  # shift up to 10 % (=0.2 units)
    scale = torch.linalg.det(m[:, :, :2]).abs()
    assert scale.min() >= 0.8**2 - 1e-5 and scale.max() <= 1.2**2 + 1e-5


@pytest.mark.parametrize("bad", [dict(zoom_range=1.0), dict(rotation_range=-1), dict(fill_mode="wrap")])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        BatchAugment(**bad)


def test_random_crop_is_a_whole_pixel_shift_with_zero_fill():
    import torch.nn.functional as F

    from datamodules.augment import random_crop

    x = torch.rand(64, 3, 8, 8) + 1
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    draws = torch.Generator().manual_seed(0)  # the same draws: x offsets, then y offsets, in [0, 4]
    dx, dy = torch.randint(0, 5, (64,), generator=draws), torch.randint(0, 5, (64,), generator=draws)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(64):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])
    assert len(set(zip(dx.tolist(), dy.tolist(), strict=True))) > 15  # many different shifts in one batch
    assert (out == 0).any() and BatchAugment(crop_padding=2).active and not BatchAugment(crop_padding=2).warps
