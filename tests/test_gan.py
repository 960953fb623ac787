"""GANs: the book's networks, one manual-optimisation step updating only the right player in each phase, fixed-noise
grids, the conditional-accuracy judge (a classifier trained here through the CLI), and predict -> PNG grid."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import quiet_trainer
from pytorch_lightning.callbacks import Callback
from train import main

from callbacks.generative import ConditionalAccuracy, GANSamples
from datamodules import MNISTDataModule
from lightning_modules.gan import GAN

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ land in the test's folder


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("conditional", [False, True])
def test_generator_and_discriminator_shapes(conditional):
    gan = GAN(conditional=conditional)
    labels = torch.tensor([0, 3, 9]) if conditional else None
    z = gan.sample_noise(3)
    assert z.shape == (3, 100) and z.min() >= -1 and z.max() <= 1
    images = gan(z, labels)
    assert images.shape == (3, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert gan.discriminate(images, labels).shape == (3,)
    # Keras summaries of the book's models (trainable parameters); the CGAN adds the one-hot inputs and
    # D's Dense 10 -> 784 label projection with its conv input channel.
    assert count(gan.generator) == (1_363_521 if conditional else 1_300_801)
    assert count(gan.discriminator) == (1_090_001 if conditional else 1_080_577)


def test_conditional_generator_uses_the_label():
    torch.manual_seed(0)
    gan = GAN(conditional=True).eval()
    z = gan.sample_noise(2)
    assert not torch.allclose(gan(z, torch.tensor([1, 1])), gan(z, torch.tensor([7, 7])))
    with pytest.raises(ValueError, match="labels"):
        gan(z)


class PhaseRecorder(Callback):
    """Snapshots of D's and G's parameters before each optimiser step and after the batch."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, dict[str, torch.Tensor]]] = []
        self.frozen: list[tuple[bool, bool]] = []

    def _snap(self, pl_module) -> None:
        self.snapshots.append(
            {
                name: {k: v.detach().clone() for k, v in getattr(pl_module, name).state_dict().items()}
                for name in ("generator", "discriminator")
            }
        )
        self.frozen.append(
            (
                not any(p.requires_grad for p in pl_module.generator.parameters()),
                not any(p.requires_grad for p in pl_module.discriminator.parameters()),
            )
        )

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self._snap(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._snap(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._snap(pl_module)


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize("conditional", [False, True])
def test_one_step_updates_d_then_g_and_only_them(mnist_dir, tmp_path, conditional):
    torch.manual_seed(0)
    gan = GAN(conditional=conditional, eval_generator_for_d=True)  # the book's generator.predict
    recorder = PhaseRecorder()
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), val_size=0, batch_size=16)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[recorder], limit_val_batches=0)
    trainer.fit(gan, datamodule=datamodule)
    assert trainer.global_step == 2  # two optimiser steps (D, G) in one training step
    start, before_d, before_g, after = recorder.snapshots
    # D phase: up to D's step nothing of G changed, BN running statistics included (D's fakes come from G in eval
    # mode, as Keras' generator.predict); G is frozen; D's step moves every D parameter and no G parameter.
    assert not changed(start["generator"], before_d["generator"])
    assert recorder.frozen[1] == (True, False)
    d_changed = changed(before_d["discriminator"], before_g["discriminator"])
    assert d_changed == set(before_d["discriminator"])
    g_params = {name for name, _ in gan.generator.named_parameters()}
    assert not changed(before_d["generator"], before_g["generator"]) & g_params
    # G phase: D frozen and untouched; G's train-mode forward updates its BN statistics and its step every weight.
    assert recorder.frozen[2] == (False, True)
    assert not changed(before_g["discriminator"], after["discriminator"])
    assert "net.2.running_mean" in changed(before_d["generator"], before_g["generator"])
    assert changed(before_g["generator"], after["generator"]) == g_params
    metrics = trainer.callback_metrics
    for key in ("train/d_loss", "train/g_loss", "train/d_acc_real", "train/d_acc_fake", "train/loss"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/loss"] == pytest.approx((metrics["train/d_loss"] + metrics["train/g_loss"]).item())


def test_defaults_are_pytorchs_and_keras_choices_are_asked_for():
    gan = GAN()
    (opt_d, opt_g), (sched_d, _) = gan.configure_optimizers()
    assert opt_d.defaults["lr"] == 2e-4 and opt_g.defaults["lr"] == 1e-4
    assert opt_d.defaults["alpha"] == 0.99 and opt_d.defaults["eps"] == 1e-8  # PyTorch's RMSprop, not Keras'
    for _ in range(3):
        opt_d.step()
        sched_d.step()
    assert opt_d.param_groups[0]["lr"] == 2e-4  # no Keras decay
    norms = [m for m in gan.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-5 and m.momentum == 0.1 for m in norms)
    keras = GAN(batch_norm="keras", init="keras")
    norms = [m for m in keras.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)  # Keras' momentum 0.99
    assert torch.count_nonzero(keras.discriminator.head.bias) == 0  # Keras' zero biases


def test_checkpoint_from_before_the_batch_norm_option_loads_with_keras_batch_norm(tmp_path):
    """Such checkpoints were trained with Keras' BatchNorm, then the only one: they must predict as they did."""
    import pytorch_lightning as pl

    trained = GAN(batch_norm="keras")
    hparams = {k: v for k, v in trained.hparams.items() if k != "batch_norm"}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": pl.__version__}, path)  # fmt: skip
    restored = GAN.load_from_checkpoint(path, weights_only=False)
    assert restored.hparams.batch_norm == "keras"
    z = trained.sample_noise(4)
    assert torch.allclose(restored.generate(z), trained.generate(z))


def test_keras_decay_lowers_the_learning_rate_per_update(mnist_dir, tmp_path):
    gan = GAN(d_decay=0.5, g_decay=0.25)
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), val_size=0, batch_size=16)
    quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(gan, datamodule=datamodule)
    opt_d, opt_g = gan.optimizers()
    # book lr / (1 + decay * updates) after 2 updates of each optimiser
    assert opt_d.param_groups[0]["lr"] == pytest.approx(2e-4 / (1 + 0.5 * 2))
    assert opt_g.param_groups[0]["lr"] == pytest.approx(1e-4 / (1 + 0.25 * 2))


def test_fixed_noise_grids_are_identical_across_calls():
    torch.manual_seed(0)
    gan = GAN(conditional=True)
    samples = GANSamples(num_images=3, seed=5)
    first, second = samples.samples(gan), samples.samples(gan)
    assert torch.equal(first, second)
    # 10 rows (one per digit) of 3 images of 28 px with 2 px padding
    assert first.shape == (3, 2 + 10 * 30, 2 + 3 * 30)
    assert not torch.equal(first, GANSamples(num_images=3, seed=6).samples(gan))
    assert gan.generator.training  # drawing leaves the generator in train mode


def test_bad_data_is_explained(mnist_dir, tmp_path):
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), val_size=0, normalize="standardize")
    with pytest.raises(ValueError, match="normalize scale"):
        quiet_trainer(tmp_path, fast_dev_run=1).fit(GAN(), datamodule=datamodule)
    with pytest.raises(ValueError, match="shape"):
        quiet_trainer(tmp_path, fast_dev_run=1).fit(GAN(input_shape=(1, 32, 32)), datamodule=datamodule)


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, data_dir): the book CNN trained through the CLI on the fake digits (bars at row 2k)."""
    from conftest import write_mnist

    root = tmp_path_factory.mktemp("judge")
    data = write_mnist(root / "data", n_train=384, n_test=64)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cli = main(["fit", "-c", str(ROOT / "configs/mnist/cnn.yaml"), "--data.init_args.data_dir", str(data),
                    "--data.init_args.val_size", "64", "--data.init_args.batch_size", "32",
                    "--model.init_args.filters", "[16, 16, 16]", "--trainer.max_epochs", "4",
                    "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"])  # fmt: skip
        trainer = cli.trainer
        path = root / "judge.ckpt"
        trainer.save_checkpoint(path)
    return path, data


@pytest.mark.slow  # trains the judge through the CLI: ~1 min on 2 busy cores
def test_judge_scores_real_digits_high_and_wrong_labels_low(judge):
    path, data = judge
    callback = ConditionalAccuracy(classifier_ckpt=str(path))
    gan = GAN(conditional=True)
    callback.setup(None, gan, "fit")
    datamodule = MNISTDataModule(data_dir=str(data), val_size=64)
    datamodule.setup("test")
    images = datamodule.normalize_images(datamodule.test_set.images)  # [0, 1], like generator output
    labels = datamodule.test_set.targets
    assert callback.score(images, labels) > 0.6  # chance: 0.1; a 4-epoch judge on 320 images reaches ~0.75
    assert callback.score(images, (labels + 1) % 10) < 0.2
    with pytest.raises(ValueError, match="not conditional"):
        ConditionalAccuracy(classifier_ckpt=str(path)).setup(None, GAN(), "fit")


@pytest.mark.slow
def test_cgan_config_logs_conditional_accuracy_and_predict_writes_a_grid(judge, tmp_path):
    path, data = judge
    common = ["-c", str(ROOT / "configs/mnist/cgan.yaml"), "--data.init_args.data_dir", str(data),
              "--data.init_args.val_size", "64", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    fit = main(["fit", *common, "--trainer.max_steps", "4", "--trainer.limit_train_batches", "2",
                "--trainer.callbacks+=callbacks.generative.ConditionalAccuracy",
                "--trainer.callbacks.classifier_ckpt", str(path), "--trainer.callbacks.num_samples", "50"])  # fmt: skip
    run = Path(fit.trainer.log_dir)
    assert 0.0 <= fit.trainer.callback_metrics["gen/cond_acc"] <= 1.0
    assert "gen/cond_acc" in (run / "metrics.csv").read_text()
    assert (run / "samples" / "step000002.png").is_file()  # the end-of-fit grid (2 training steps)
    predict = main(["predict", *common, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                    "--trainer.limit_predict_batches", "1"])  # fmt: skip
    images = predict.trainer.predict_loop.predictions[0]
    assert images.shape == (64, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert (Path(predict.trainer.log_dir) / "predictions.png").is_file()


def test_ddp_without_find_unused_parameters_is_refused_with_the_strategy_to_use():
    """Each update idles one player's parameters; DDP accepts that only with find_unused_parameters=True."""
    from torch.nn.parallel import DistributedDataParallel

    gan = GAN()
    for find_unused, refused in ((False, True), (True, False)):
        wrapper = mock.Mock(spec=DistributedDataParallel, find_unused_parameters=find_unused)
        gan.trainer = mock.Mock(**{"strategy.model": wrapper})
        if refused:
            with pytest.raises(ValueError, match=r"--trainer\.strategy ddp_find_unused_parameters_true"):
                gan.on_fit_start()
        else:
            gan.on_fit_start()
    gan.trainer = mock.Mock(**{"strategy.model": gan})  # one device: no DDP wrapper, nothing to check
    gan.on_fit_start()


@pytest.mark.slow
def test_dcgan_under_ddp_on_two_cpu_processes(mnist_dir, tmp_path):
    """`--trainer.strategy ddp_find_unused_parameters_true` trains; plain `ddp` stops at once with that advice."""
    import subprocess

    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "-c", str(ROOT / "configs/mnist/dcgan.yaml"),
               "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64",
               "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "6",
               "--trainer.enable_progress_bar", "false", "--trainer.strategy"]  # fmt: skip
    result = subprocess.run([*command, "ddp_find_unused_parameters_true"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    refused = subprocess.run([*command, "ddp"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "ddp_find_unused_parameters_true" in refused.stdout + refused.stderr
