"""scripts/plain_fast_omniglot.py: the fast Omniglot recipe as a plain PyTorch loop, its settings read from the
config."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml
from omniglot_fakes import write_tree
from plain_fast_omniglot import CONFIG, main, recipe
from train import main as train_main

from datamodules.base import DataNotFoundError


def test_the_loop_takes_the_shipped_recipe_from_the_config(tmp_path):
    hp = recipe()
    assert hp["epochs"] == 10 and hp["model"]["filters"] == [32, 64, 128, 256] and hp["model"]["all_pairs"]
    assert hp["model"]["tta_symmetries"] == 8 and hp["model"]["blocks"] == 4 and hp["model"]["tta_shift"] == 0
    assert hp["optimizer"]["class_path"] == "torch.optim.AdamW" and hp["lr_scheduler"]["init_args"]["max_lr"] == 0.004
    assert hp["augment"]["rotation_range"] == 10 and hp["data"]["train_way"] == 20 and hp["data"]["channels_last"]
    settings = yaml.safe_load(CONFIG.read_text())
    del settings["model"]["init_args"]["input_shape"]
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert recipe(config)["model"]["input_shape"] == (1, 28, 28)  # ProtoNet's base class, FewShotModule, sets it


def test_the_loop_learns_as_the_cli_run_of_its_config_does(tmp_path, capsys, monkeypatch):
    base = tmp_path / "omniglot-py"
    write_tree(base / "images_background_small1", {"Alpha": 6, "Beta": 6}, size=35, seed=1)
    write_tree(base / "images_background_small2", {"Gamma": 7}, size=35, seed=1)
    settings = yaml.safe_load(CONFIG.read_text())
    settings["model"]["init_args"].update(num_classes=5, filters=[8, 16, 16, 32])
    settings["data"]["init_args"].update(train_way=5, train_episodes=30, test_way=5, test_episodes=40)
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(settings))
    args = ["--data-dir", str(tmp_path), "--config", str(config), "--epochs", "3", "--test-alphabets", "Gamma"]
    accuracy = main(args)
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"epoch \d: loss ([\d.]+)", out)]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]  # untrained (lr 0): about 3.0 every epoch
    assert "over 40 runs" in out and accuracy >= 0.95  # 5-way runs of the unseen alphabet; untrained: 0.9
    # The CLI run of the same config and seed trains on the same episodes from the same weights: the same losses.
    monkeypatch.chdir(tmp_path)
    cli = train_main(["fit", "-c", str(config), "--data.init_args.data_dir", str(tmp_path), "--trainer.max_epochs", "3",
                      "--data.init_args.test_alphabets", "[Gamma]", "--trainer.accelerator", "cpu",
                      "--trainer.enable_progress_bar", "false", "--curves", "null"])  # fmt: skip
    with (Path(cli.trainer.log_dir) / "metrics.csv").open(newline="") as f:
        cli_losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert cli_losses == pytest.approx(losses, abs=1e-4)
    assert cli.trainer.callback_metrics["test/acc"] == pytest.approx(accuracy)


def test_missing_drawings_name_the_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match="omniglot-py"):
        main(["--data-dir", str(tmp_path)])
