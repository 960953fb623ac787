"""scripts/plain_fast_mnist.py: the fast MNIST recipe as a plain PyTorch loop, its settings read from the config."""

from __future__ import annotations

import pytest
import yaml
from plain_fast_mnist import CONFIG, main, recipe

from datamodules.base import DataNotFoundError
from datamodules.synthetic import write_mnist


def test_the_loop_takes_its_settings_from_the_config(tmp_path):
    config = tmp_path / "fast.yaml"
    config.write_text(
        "trainer: {max_epochs: 3}\n"
        "model: {init_args: {filters: [8], dropout: 0.3, label_smoothing: 0.2,\n"
        "  optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1}},\n"
        "  lr_scheduler: {class_path: torch.optim.lr_scheduler.OneCycleLR, init_args: {max_lr: 0.5}}}}\n"
        "data: {init_args: {val_size: 0, augment: {init_args: {rotation_range: 5}}}}\n"
    )
    hp = recipe(config)
    assert hp["epochs"] == 3 and hp["data"] == {"val_size": 0} and hp["augment"] == {"rotation_range": 5}
    assert hp["model"]["filters"] == [8] and hp["model"]["dropout"] == 0.3 and hp["model"]["label_smoothing"] == 0.2
    assert hp["model"]["kernel_size"] == 3 and hp["model"]["activation"] == "relu"  # CNNClassifier's defaults
    assert hp["optimizer"]["class_path"] == "torch.optim.SGD" and hp["lr_scheduler"]["init_args"] == {"max_lr": 0.5}
    shipped = recipe()
    assert shipped["epochs"] == 15 and shipped["model"]["filters"] == [32, 64, 128] and shipped["model"]["batch_norm"]


def test_the_loop_learns_mnist_files(tmp_path, capsys):
    # The generated digits are horizontal bars two rows apart: the recipe's vertical shifts, rotations and zooms
    # would change their class, so this config shifts sideways only.
    settings = yaml.safe_load(CONFIG.read_text())
    settings["data"]["init_args"]["batch_size"] = 32
    settings["data"]["init_args"]["augment"]["init_args"].update(height_shift_range=0, rotation_range=0, zoom_range=0)
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert recipe(config)["augment"]["height_shift_range"] == 0 and recipe(config)["data"]["batch_size"] == 32
    write_mnist(tmp_path, n_train=256, n_test=128)
    assert main(["--data-dir", str(tmp_path), "--config", str(config), "--epochs", "4"]) > 0.8
    out = capsys.readouterr().out
    assert "epoch 3: loss" in out and "on 128 images" in out


def test_missing_files_name_the_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"MNIST train files are missing from .*MNIST/raw"):
        main(["--data-dir", str(tmp_path)])
