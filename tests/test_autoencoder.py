"""Autoencoders: Keras-exact 'same' transposed convs, the tasks' inputs and targets, learning, the joint classifier
objective, the latent and reconstruction pictures, and the colorization config end to end on CIFAR-10 pickles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer, write_cifar10
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from train import main

from callbacks.generative import LatentSpace, ReconstructionGrid
from datamodules import MNISTDataModule
from lightning_modules.autoencoder import AutoEncoder, ConvTranspose2dSame, rgb_to_gray
from lightning_modules.layers import Conv2dSame

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("kernel", "stride", "size"), [(3, 2, 7), (5, 2, 7), (5, 1, 6), (3, 1, 5)])
def test_transposed_conv_same_is_the_adjoint_of_keras_same_conv(kernel, stride, size):
    """Keras' Conv2DTranspose('same') is the adjoint of Conv2D('same') with the same kernel: <Tx, y> = <x, T*y>.
    A one-pixel misalignment (PyTorch's symmetric padding + output_padding) breaks the identity."""
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, kernel, stride, bias=False)
    transposed = ConvTranspose2dSame(4, 3, kernel, stride)
    with torch.no_grad():
        transposed.weight.copy_(conv.weight)
        transposed.bias.zero_()
    x = torch.randn(2, 3, size * stride, size * stride)
    y = torch.randn(2, 4, size, size)
    assert conv(x).shape == y.shape and transposed(y).shape == x.shape
    assert torch.allclose((conv(x) * y).sum(), (x * transposed(y)).sum(), atol=1e-4)


def test_book_shapes_and_parameter_counts():
    model = AutoEncoder()  # the book AE: latent 16
    x = torch.rand(5, 1, 28, 28)
    assert model.encode(x).shape == (5, 16)
    out = model(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    # Keras summary of the book's encoder / decoder: 69,008 and 108,993 parameters.
    assert sum(p.numel() for p in model.encoder.parameters()) == 69_008
    assert sum(p.numel() for p in model.decoder.parameters()) == 108_993
    color = AutoEncoder(task="colorize", input_shape=(3, 32, 32), filters=(64, 128, 256), latent_dim=256)
    assert color(torch.rand(2, 1, 32, 32)).shape == (2, 3, 32, 32)
    classifier = AutoEncoder(block="bn_pool", classifier_hidden=(512, 256))
    assert classifier.classifier(classifier.encode(x)).shape == (5, 10)


def test_task_inputs_and_targets():
    images = torch.rand(4, 3, 8, 8)
    gray = rgb_to_gray(images)
    expected = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(gray[:, 0], expected)
    x, target = AutoEncoder(task="colorize", input_shape=(3, 8, 8), filters=(4,)).model_input(images)
    assert x.shape == (4, 1, 8, 8) and torch.equal(target, images)

    denoise = AutoEncoder(task="denoise", input_shape=(3, 8, 8), filters=(4,), noise_mean=0.5, noise_std=0.5)
    noisy, clean = denoise.model_input(images)
    assert torch.equal(clean, images)  # noise on the input only
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, images)
    assert (noisy == 1).float().mean() > 0.3  # mean +0.5 pushes many pixels past 1: clipped
    fixed = [denoise.model_input(images, torch.Generator().manual_seed(3))[0] for _ in range(2)]
    assert torch.equal(*fixed)
    plain = AutoEncoder(input_shape=(3, 8, 8), filters=(4,))
    assert all(t is images for t in plain.model_input(images))


def test_bad_configuration_is_explained(mnist_dir, tmp_path):
    with pytest.raises(ValueError, match="RGB dataset"):
        AutoEncoder(task="colorize", input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="divisible by 8"):
        AutoEncoder(input_shape=(1, 28, 28), filters=(8, 16, 32))
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), val_size=64, normalize="standardize")
    with pytest.raises(ValueError, match="normalize scale"):
        quiet_trainer(tmp_path, fast_dev_run=1).fit(AutoEncoder(), datamodule=datamodule)


def test_batch_norm_and_init_are_pytorchs_unless_keras_is_asked_for():
    def norms(model):
        return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    torch.manual_seed(0)
    plain = AutoEncoder(block="bn_pool", classifier_hidden=(8,))
    assert norms(plain) and all(m.eps == 1e-5 and m.momentum == 0.1 for m in norms(plain))
    assert torch.count_nonzero(plain.classifier[0].bias) > 0  # PyTorch's initialisation
    keras = AutoEncoder(block="bn_pool", classifier_hidden=(8,), batch_norm="keras", init="keras")
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms(keras))  # Keras' momentum 0.99
    assert torch.count_nonzero(keras.classifier[0].bias) == 0  # Keras' zero biases
    assert [type(m) for m in keras.classifier if isinstance(m, torch.nn.Dropout)] == [torch.nn.Dropout]


def test_reconstruction_loss_falls(mnist_dir, tmp_path):
    torch.manual_seed(0)
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), val_size=64, batch_size=32)
    datamodule.setup("fit")
    fixed = datamodule.normalize_images(datamodule.val_set.images)
    model = AutoEncoder()

    def mse() -> float:
        with torch.no_grad():
            return F.mse_loss(model.eval()(fixed), fixed).item()

    before = mse()
    model.train()
    quiet_trainer(tmp_path, max_steps=20, limit_val_batches=0).fit(model, datamodule=datamodule)
    after = mse()
    assert after < 0.7 * before, f"validation MSE {before:.4f} -> {after:.4f}"


@pytest.mark.slow
def test_classifier_autoencoder_optimises_mse_plus_ce_and_logs_accuracy(mnist_dir, tmp_path):
    torch.manual_seed(0)
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), val_size=64, batch_size=64)
    # The book recipe's settings, as configs/mnist/autoencoder_classifier.yaml has them.
    model = AutoEncoder(
        block="bn_pool",
        filters=(8, 16),
        classifier_hidden=(32,),
        classifier_dropout=0.0,
        init="keras",
        batch_norm="keras",
    )
    trainer = quiet_trainer(tmp_path, max_epochs=3)
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.callback_metrics
    for stage in ("train", "val"):
        # Epoch means are linear: mean(loss) = mean(mse) + mean(ce) when loss = mse + ce per batch.
        total = metrics[f"{stage}/mse"] + metrics[f"{stage}/ce"]
        assert metrics[f"{stage}/loss"] == pytest.approx(total.item(), rel=1e-5)
    assert metrics["val/acc"] > 0.5  # the bars of the fake digits are easy; chance is 0.1


@pytest.mark.parametrize("latent_dim", [2, 16])
def test_latent_plot_and_reconstruction_grid_files(mnist_dir, tmp_path, latent_dim):
    torch.manual_seed(0)
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), val_size=64, batch_size=64)
    model = AutoEncoder(task="denoise", latent_dim=latent_dim)
    callbacks = [LatentSpace(every_n_epochs=1, split="test", grid_size=5), ReconstructionGrid(num_images=4)]
    logger = CSVLogger(tmp_path, name="ae", version=0)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, logger=logger, callbacks=callbacks).fit(
        model, datamodule=datamodule
    )
    run = tmp_path / "ae" / "version_0"
    for name in ("latent/epoch000.png", "latent/final.png", "reconstructions/epoch000.png"):
        assert (run / name).is_file(), name
    width, height = Image.open(run / "latent/final.png").size
    assert width > height if latent_dim == 2 else width < 1.3 * height  # scatter + decoded plane vs PCA only
    rows = callbacks[1].panels(model, callbacks[1]._sample)
    assert [name for name, _ in rows] == ["noisy", "denoised", "clean"]
    assert all(images.shape == (4, 1, 28, 28) for _, images in rows)


def test_colorization_config_trains_and_draws_triplets(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))  # fake files
    root = write_cifar10(tmp_path / "data")
    one_batch = [f"--trainer.limit_{stage}_batches=1" for stage in ("train", "val", "test")]
    cli = main(["fit", "-c", str(ROOT / "configs/cifar10/colorization.yaml"), "--data.init_args.data_dir", str(root),
                "--data.init_args.val_size", "20", "--data.init_args.batch_size", "8",
                "--trainer.max_epochs", "1", *one_batch])  # fmt: skip
    assert (Path(cli.trainer.log_dir) / "reconstructions" / "epoch000.png").is_file()
    assert torch.isfinite(cli.trainer.callback_metrics["val/mse"])
    grid = cli.trainer.callbacks[[type(c).__name__ for c in cli.trainer.callbacks].index("ReconstructionGrid")]
    names = [name for name, _ in grid.panels(cli.model, grid._sample)]
    assert names == ["gray", "predicted", "true"]
