"""The fast CIFAR-10 recipe (configs/cifar10/fast.yaml, lightning_modules/airbench.py) on generated data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer, write_cifar10
from PIL import Image
from train import main

from datamodules import ImageFolderDataModule
from lightning_modules.airbench import AirbenchClassifier, image_patches, whitening_filters
from lightning_modules.tta import tta_logits

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "cifar10" / "fast.yaml")
SMALL = ["--model.init_args.widths", "[8, 16, 16]"]  # the recipe's wiring at a fraction of its compute


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ lands in the test's folder


def write_colour_tree(root: Path, splits: dict[str, int], classes: int = 3, seed: int = 0) -> Path:
    """``root/<split>/c<k>/NNN.jpg`` 32x32 JPEGs; class ``k`` is a noisy colour of its own, so it is learnable."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, (classes, 3))
    for split, per_class in splits.items():
        for label in range(classes):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(colours[label] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def correlated_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are correlated (blurred noise with a shared component)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 34, 34, generator=g) + 0.3 * torch.randn(n, 3, 34, 34, generator=g)
    return torch.nn.functional.avg_pool2d(noise, 3, stride=1)


def test_whitening_filters_whiten_the_training_patches():
    images = correlated_images()
    filters = whitening_filters(images, (2, 2), eps=1e-9)
    assert filters.shape == (24, 3, 2, 2)
    torch.testing.assert_close(filters[12:], -filters[:12])  # the negated copies
    out = torch.nn.functional.conv2d(images.double(), filters[:12].double())
    rows = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = rows.T @ rows / len(rows)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0)
    raw = image_patches(images.double(), (2, 2))
    assert (raw.T @ raw / len(raw) - torch.eye(12, dtype=torch.float64)).abs().max() > 0.1  # the input was not white


def test_tta_shapes_and_flip_symmetry():
    x = torch.randn(5, 3, 32, 32)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(7))
    for level in (0, 1, 2):
        assert tta_logits(net, x, level).shape == (5, 7)
    assert not torch.allclose(tta_logits(net, x, 1), tta_logits(net, x, 0))  # an asymmetric model: views differ

    def symmetric(images):  # left-right mirror invariant: row sums per channel
        return images.sum(-1).flatten(1)

    torch.testing.assert_close(tta_logits(symmetric, x, 1), symmetric(x))
    with pytest.raises(ValueError, match="tta level"):
        tta_logits(net, x, 3)


def small_model(**overrides) -> AirbenchClassifier:
    options = dict(num_classes=3, widths=(8, 16, 16), whiten_samples=64, lookahead_every=2, tta_level=1)
    return AirbenchClassifier(**{**options, **overrides})


def folder_data(root: Path, batch_size: int = 16) -> ImageFolderDataModule:
    from datamodules.augment import BatchAugment

    return ImageFolderDataModule(
        data_dir=str(root),
        image_size=(32, 32),
        val_size=12,
        batch_size=batch_size,
        normalize="standardize",
        augment=BatchAugment(horizontal_flip=True, crop_padding=2),
        decode_workers=2,
    )


class EpochLosses(pl.Callback):
    def __init__(self) -> None:
        self.val_losses: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after the epoch's validation
        self.val_losses.append(float(trainer.callback_metrics["val/loss"]))


def test_a_short_fit_learns_whitens_and_scales_the_lr_by_the_batch(tmp_path):
    root = write_colour_tree(tmp_path / "data", {"train": 24, "test": 4})
    pl.seed_everything(0)  # unseeded, about 1 initialisation in 10 is still below 90 % after these 16 steps
    model = small_model(lr=0.05)
    losses = EpochLosses()
    trainer = quiet_trainer(tmp_path, max_epochs=4, num_sanity_val_steps=0, callbacks=[losses])
    trainer.fit(model, folder_data(root, batch_size=16))
    # The logits are scaled by 1/9, so the loss falls slowly while the accuracy saturates.
    assert losses.val_losses[-1] < losses.val_losses[0] - 0.05, losses.val_losses
    assert float(trainer.callback_metrics["val/acc"]) > 0.9
    # Per-example lr, scaled by the batch: lr * 16 / (1 + 1 / (1 - momentum)); the BatchNorm shifts x64.
    others, shifts = trainer.optimizers[0].param_groups[1], trainer.optimizers[0].param_groups[0]
    assert others["initial_lr"] == pytest.approx(0.05 * 16 / (1 + 1 / (1 - model.hparams.momentum)))
    assert shifts["initial_lr"] == pytest.approx(64 * others["initial_lr"])
    assert bool(model.whitened) and not model.net.whiten.weight.requires_grad
    # The last step set the weights to the lookahead's slow copy.
    for name, value in model.net.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, model.lookahead.slow[name])


def test_lookahead_state_survives_a_checkpoint(tmp_path):
    root = write_colour_tree(tmp_path / "data", {"train": 12, "test": 4})
    model = small_model(lookahead_every=1)
    trainer = quiet_trainer(tmp_path, max_steps=3, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, folder_data(root, batch_size=4))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["lookahead"]
    restored = AirbenchClassifier.load_from_checkpoint(path)
    assert restored.lookahead.slow.keys() == model.lookahead.slow.keys()
    for name, value in model.lookahead.slow.items():
        torch.testing.assert_close(restored.lookahead.slow[name], value)
    assert bool(restored.whitened)  # a restored model keeps its filters (never re-whitened)
    torch.testing.assert_close(restored.net.whiten.weight, model.net.whiten.weight)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="tta_level"):
        AirbenchClassifier(tta_level=5)
    with pytest.raises(ValueError, match="widths"):
        AirbenchClassifier(widths=[8, 8])


def test_the_config_fast_dev_runs_on_cifar10_pickles(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))  # fake files
    root = write_cifar10(tmp_path / "data")
    cli = main(["fit", "-c", CONFIG, *SMALL, "--data.init_args.data_dir", str(root), "--data.init_args.val_size", "20",
                "--data.init_args.batch_size", "8", "--trainer.fast_dev_run", "1"])  # fmt: skip
    assert cli.trainer.state.finished and bool(cli.model.whitened)
    assert torch.isfinite(cli.trainer.callback_metrics["test/acc"])  # test_after_fit ran on the test split


@pytest.mark.parametrize("variant", [None, "cifar10_residual.yaml"])
def test_the_config_fast_dev_runs_on_an_image_folder(tmp_path, variant):
    root = write_colour_tree(tmp_path / "data", {"train": 8, "test": 4}, classes=10)
    extra = ["-c", str(ROOT / "configs" / "variants" / variant)] if variant else []
    cli = main(["fit", "-c", CONFIG, *extra, *SMALL, "--data=datamodules.ImageFolderDataModule",
                "--data.init_args.data_dir", str(root), "--data.init_args.image_size", "[32, 32]",
                "--data.init_args.val_size", "20", "--data.init_args.batch_size", "8",
                "--trainer.fast_dev_run", "1"])  # fmt: skip
    assert cli.trainer.state.finished and cli.datamodule.augment is not None
    assert torch.isfinite(cli.trainer.callback_metrics["test/acc"])
    convs = [m for m in cli.model.net.groups.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == (9 if variant else 6)  # airbench96's groups: three convs each, a residual around two


def test_residual_groups_pass_their_entry_through():
    model = AirbenchClassifier(widths=[8, 16, 16], residual_groups=True).eval()
    group = model.net.groups[0]
    x = torch.randn(2, 24, 16, 16)
    entry = group.entry(x)
    assert entry.shape == (2, 8, 8, 8) and not torch.allclose(group(x), entry)
    for norm in (m for m in group.body if isinstance(m, torch.nn.BatchNorm2d)):
        norm.bias.data.fill_(-1e3)  # GELU of a large negative number is 0: the body adds nothing
    torch.testing.assert_close(group(x), entry)


@pytest.mark.slow  # two launches with 2 DDP processes, ~40 s on 2 slow cores; test_ddp.py covers DDP in CI
@pytest.mark.parametrize("filter_optimizer", ["sgd", "muon"])
def test_ddp_trains_the_recipe_as_one_process_with_the_same_global_batch(tmp_path, filter_optimizer):
    """2 CPU processes (gloo) x 1 image x 4 accumulated = one process x 1 image x 8 accumulated: same weights.

    One image per forward makes BatchNorm's batch statistics per image, so they do not depend on how the images
    are split over processes (CPU DDP has no SyncBatchNorm). What must hold for the parameters to agree: the
    per-example lr and weight decay scaled by the global batch (processes x batch x accumulation), the whitening
    filters the same on every rank, gradients averaged, the whitening bias frozen after its epochs.
    """
    import subprocess
    import sys

    from test_ddp import clean_env

    root = write_colour_tree(tmp_path / "data", {"train": 4, "test": 2})  # 12 images: 4 validate, 8 train
    common = [sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "-c", CONFIG, *SMALL,
              "--data=datamodules.ImageFolderDataModule", "--data.init_args.data_dir", str(root),
              "--data.init_args.image_size", "[32, 32]", "--data.init_args.val_size", "4",
              "--data.init_args.batch_size", "1", "--data.init_args.eval_batch_size", "4",
              "--data.init_args.augment", "null", "--model.init_args.num_classes", "3",
              "--model.init_args.whiten_bias_epochs", "2", "--model.init_args.lookahead_every", "1",
              "--model.init_args.filter_optimizer", filter_optimizer,
              "--trainer.max_epochs", "4", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
              "--trainer.enable_progress_bar", "false", "--test_after_fit", "false"]  # fmt: skip
    runs = {
        "one": ["--trainer.devices", "1", "--trainer.accumulate_grad_batches", "8"],
        "ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accumulate_grad_batches", "4"],
    }
    checkpoints = {}
    for name, extra in runs.items():
        cwd = tmp_path / name
        cwd.mkdir()
        command = [*common, *extra]
        result = subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        (path,) = cwd.glob("runs/cifar10_fast/version_0/checkpoints/last.ckpt")
        checkpoints[name] = torch.load(path, map_location="cpu", weights_only=False)
    one, ddp = checkpoints["one"], checkpoints["ddp"]
    assert one["global_step"] == ddp["global_step"] == 4  # one optimiser step per epoch in both
    lrs = [[group["initial_lr"] for group in c["optimizer_states"][0]["param_groups"]] for c in (one, ddp)]
    assert lrs[0] == pytest.approx(lrs[1])  # scaled by the same global batch of 8
    # The same seed builds the same initial weights: training must have moved them, or the comparison is void.
    initial = main(common[3:] + runs["one"], run=False).model.state_dict()
    moved = difference = 0.0
    for name, value in one["state_dict"].items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked", "whitened")):
            continue  # BatchNorm statistics accumulate per process; they are not trained
        difference = max(difference, (value - ddp["state_dict"][name]).abs().max().item())
        if name != "net.whiten.weight":  # set from the data at fit start, not trained
            moved = max(moved, (value - initial[name]).abs().max().item())
    assert moved > 1e-2, f"training barely moved the weights ({moved:.2e})"
    assert difference < 1e-5, f"DDP parameters differ by {difference:.2e} from the one-process run"
    torch.testing.assert_close(one["state_dict"]["net.whiten.weight"], ddp["state_dict"]["net.whiten.weight"])
