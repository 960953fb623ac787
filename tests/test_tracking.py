"""Run records and Weights & Biases: run_info.yaml, the config sent to W&B, resuming the same W&B run, sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb
import yaml
from train import main

from lifecycle.run_record import git_info, wandb_run_id

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "configs/mnist/mlp.yaml")
WANDB = str(ROOT / "configs/logger/wandb.yaml")


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def fit_args(mnist_dir, *extra: str) -> list[str]:
    return ["fit", "-c", MLP, "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64",
            "--model.init_args.hidden_units", "[32]", "--trainer.limit_train_batches", "2", *extra]  # fmt: skip


def test_run_info_records_code_and_environment(mnist_dir):
    cli = main(fit_args(mnist_dir, "--trainer.max_epochs", "1"))
    record = yaml.safe_load((Path(cli.trainer.log_dir) / "run_info.yaml").read_text())
    (launch,) = record["launches"]
    assert launch["git"]["commit"] == git_info()["commit"] and len(launch["git"]["commit"]) == 40
    assert launch["packages"]["torch"] and launch["packages"]["pytorch-lightning"]
    assert launch["world_size"] == 1 and launch["ckpt_path"] is None and launch["stage"] == "fit"
    assert "wandb" not in record  # no W&B logger in this run


def test_wandb_gets_the_config_and_a_resume_continues_the_same_run(mnist_dir, tmp_path):
    first = main(fit_args(mnist_dir, "-c", WANDB, "--trainer.max_epochs", "1"))
    run_dir = Path(first.trainer.log_dir)
    run_id = wandb_run_id(run_dir)
    assert run_id
    config = first.trainer.loggers[-1].experiment.config
    assert config["model"]["class_path"] == "lightning_modules.mlp.MLPClassifier"
    assert config["trainer"]["max_epochs"] == 1 and config["data"]["init_args"]["val_size"] == 64
    wandb.finish()  # as at the end of a process: flushes the offline run file
    (offline,) = (tmp_path / "runs" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert b"lightning_modules.mlp.MLPClassifier" in offline.read_bytes()  # written for `wandb sync`

    last = run_dir / "checkpoints" / "last.ckpt"
    second = main(fit_args(mnist_dir, "-c", WANDB, "--trainer.max_epochs", "2", "--ckpt_path", str(last)))
    assert second.trainer.loggers[-1].experiment.id == run_id
    assert second.trainer.current_epoch == 2
    wandb.finish()
    record = yaml.safe_load((Path(second.trainer.log_dir) / "run_info.yaml").read_text())
    assert record["wandb"]["id"] == run_id
    assert record["launches"][-1]["ckpt_path"] == str(last)


def test_sweep_parameters_are_cli_keys(capsys):
    from sweep import _cli_value, load_spec

    spec = load_spec(ROOT / "configs/sweeps/mnist_mlp.yaml")  # the Optuna sweep file (scripts/sweep.py)
    assert spec["config"][0].endswith("configs/mnist/mlp.yaml")
    args = []
    for key, dist in spec["parameters"].items():
        value = dist["choices"][-1] if dist["type"] == "categorical" else dist["low"]
        args.append(f"--{key}={_cli_value(value)}")  # as scripts/sweep.py passes a trial's parameters
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", MLP, *args, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["hidden_units"] == [512, 512]
    assert printed["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(1e-4)
    assert printed["data"]["init_args"]["batch_size"] == 256
