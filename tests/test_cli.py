"""The CLI end to end: every config instantiates, every MNIST topic fits, fit -> test --ckpt_path best works."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_errors import ConfigError, run_command
from gpu_check import SKIP
from train import main

from lifecycle.runs import RunError
from lightning_modules import MLPClassifier

ROOT = Path(__file__).resolve().parents[1]
# Snippets appended to an experiment's config (logger, trainer, variants), W&B sweeps and results presets are not
# experiments themselves: the folders gpu_check skips.
SNIPPETS = SKIP
EXPERIMENTS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if not SNIPPETS & set(p.parts) and p.name != "defaults.yaml"
)
MNIST_TOPICS = sorted((ROOT / "configs" / "mnist").glob("*.yaml"))
# The fast recipe (test_after_fit, its own module) has its own tests: tests/test_fast_cifar.py.
CIFAR_BOOK = sorted(
    p for p in (ROOT / "configs" / "cifar10").glob("*.yaml") if not p.stem.startswith("transfer") and p.stem != "fast"
)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ and any default_root_dir land in the test's folder
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_instantiates(config):
    cli = main(["-c", str(config)], run=False)
    assert tuple(cli.model.hparams.input_shape) == tuple(cli.datamodule.dims)
    if "image_folder" not in config.parts:  # there the classes are the data's folders: tested in test_image_folder
        assert cli.model.hparams.num_classes == cli.datamodule.num_classes


def optimizer_specs(node):
    """Every ``{class_path: torch.optim..., init_args: ...}`` in a parsed config."""
    if isinstance(node, dict):
        if str(node.get("class_path", "")).startswith("torch.optim."):
            yield node["class_path"], node.get("init_args") or {}
        for value in node.values():
            yield from optimizer_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from optimizer_specs(value)


def test_every_adam_config_uses_the_fused_kernel():
    """README, Speed: one kernel per update (2.6x faster than the per-parameter loop for the MNIST MLP on a CPU)."""
    adams = [
        (config.name, args)
        for config in EXPERIMENTS
        for path, args in optimizer_specs(yaml.safe_load(config.read_text()))
        if path in ("torch.optim.Adam", "torch.optim.AdamW")
    ]
    assert len(adams) >= 10
    assert [name for name, args in adams if args.get("fused") is not True] == []
    cli = main(["-c", str(ROOT / "configs/mnist/mlp.yaml")], run=False)
    assert cli.model.configure_optimizers().defaults["fused"] is True  # and it reaches the optimiser


def test_wandb_snippet_appends_a_logger():
    cli = main(["-c", str(ROOT / "configs/mnist/cnn.yaml"), "-c", str(ROOT / "configs/logger/wandb.yaml")], run=False)
    names = [type(logger).__name__ for logger in cli.trainer.loggers]
    assert names == ["CSVLogger", "TensorBoardLogger", "WandbLogger"]


@pytest.mark.parametrize("config", MNIST_TOPICS, ids=lambda p: p.stem)
def test_fit_fast_dev_run(config, mnist_dir):
    cli = main(
        [
            "fit",
            "-c",
            str(config),
            "--data.init_args.data_dir",
            str(mnist_dir),
            "--trainer.fast_dev_run",
            "2",
            "--data.init_args.val_size",
            "64",
            "--test_after_fit",  # a test would replace the fit's callback_metrics (configs/mnist/fast.yaml tests)
            "false",
        ]
    )
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_fit_then_test_best_checkpoint_in_a_new_process(mnist_dir, tmp_path, caplog):
    common = [
        "-c",
        str(ROOT / "configs/mnist/mlp.yaml"),
        "--data.init_args.data_dir",
        str(mnist_dir),
        "--data.init_args.val_size",
        "64",
    ]
    fit = main(["fit", *common, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2"])
    run_dir = Path(fit.trainer.log_dir).resolve()
    assert run_dir == tmp_path / "runs" / "mnist_mlp" / "version_0"
    # One directory holds everything of the run: resolved config, CSV metrics, TensorBoard events, checkpoints.
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.csv").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 3
    best = fit.trainer.checkpoint_callback.best_model_path
    # The checkpoint alone rebuilds the module, optimiser config included (no training script needed).
    restored = MLPClassifier.load_from_checkpoint(best)
    assert restored.hparams.hidden_units == [256, 256]
    assert restored.configure_optimizers().defaults["eps"] == 1e-07

    caplog.clear()
    with caplog.at_level(logging.INFO):
        test = main(["test", *common, "--ckpt_path", "best"])
    assert test.trainer.ckpt_path == best
    assert 0.0 <= test.trainer.callback_metrics["test/acc"] <= 1.0
    assert f"Evaluated checkpoint: {best}" in caplog.text and "test/acc = " in caplog.text


def test_ckpt_alias_without_earlier_run_is_explained(mnist_dir):
    with pytest.raises(RunError, match="Run `fit` first"):
        main(
            [
                "test",
                "-c",
                str(ROOT / "configs/mnist/mlp.yaml"),
                "--data.init_args.data_dir",
                str(mnist_dir),
                "--ckpt_path",
                "best",
            ]
        )


def test_unknown_config_key_names_the_closest_valid_keys(capsys, tmp_path):
    """A misspelt key: one paragraph naming the closest valid keys (not a 60-line usage), exit code 2."""
    cnn = ["fit", "-c", str(ROOT / "configs/mnist/cnn.yaml")]
    with pytest.raises(ConfigError, match=r"Unknown key 'model\.init_args\.dropuot'.*Did you mean 'dropout'"):
        main([*cnn, "--model.init_args.dropuot", "0.3"])
    assert run_command(lambda: main([*cnn, "--model.init_args.optimizer.init_args.lrr", "0.1"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err
    assert "Unknown key 'model.init_args.optimizer.init_args.lrr'" in err and "Did you mean 'lr'" in err
    assert "torch.optim.Adam accepts: lr, betas, eps" in err
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  max_epoch: 3\n")  # in a config file too
    with pytest.raises(ConfigError, match=r"Unknown key 'trainer\.max_epoch'.*Did you mean 'trainer\.max_epochs'"):
        main([*cnn, "-c", str(config)])


def test_print_config_reflects_overrides(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "-c",
                str(ROOT / "configs/mnist/cnn.yaml"),
                "--model.init_args.dropout",
                "0.3",
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["dropout"] == 0.3
    assert printed["model"]["init_args"]["optimizer"]["init_args"]["eps"] == 1e-07


def test_quickstart_config_trains_and_tests(tmp_path):
    cli = main(["fit", "-c", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_epochs", "2"])
    assert cli.trainer.current_epoch == 2
    assert "test/acc" in cli.trainer.callback_metrics
    assert (Path(cli.trainer.log_dir) / "curves.png").is_file()


def test_validate_and_predict_from_the_last_checkpoint(mnist_dir):
    common = ["-c", str(ROOT / "configs/mnist/cnn.yaml"), "--data.init_args.data_dir", str(mnist_dir)]
    common += ["--data.init_args.val_size", "64", "--trainer.callbacks+=callbacks.ActivationMaps"]
    main(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    validate = main(["validate", *common, "--ckpt_path", "last"])
    assert validate.trainer.ckpt_path.endswith("version_0/checkpoints/last.ckpt")
    assert 0.0 <= validate.trainer.callback_metrics["val/acc"] <= 1.0
    predict = main(["predict", *common, "--ckpt_path", "last"])
    probabilities = torch.cat(predict.trainer.predict_loop.predictions)
    assert probabilities.shape == (64, 10)  # the 64 images of the generated t10k split
    assert torch.allclose(probabilities.sum(1), torch.ones(64), atol=1e-5)


def test_wandb_offline_run(mnist_dir, tmp_path):
    cli = main(
        ["fit", "-c", str(ROOT / "configs/mnist/mlp.yaml"), "-c", str(ROOT / "configs/logger/wandb.yaml"),
         "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64",
         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    )  # fmt: skip
    assert cli.trainer.state.finished
    offline_runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


@pytest.mark.slow  # two DDP launches, ~50 s on 2 slow cores; test_ddp.py checks DDP training in CI
def test_fit_under_ddp_with_two_cpu_processes(tmp_path):
    """Real DDP through the CLI (Lightning re-launches the script per rank, gloo): one run dir, one set of files."""
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "-c", str(ROOT / "configs/quickstart.yaml"),
               "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
               "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stderr[-1500:]}"
    runs = list((tmp_path / "runs" / "quickstart").iterdir())
    assert [p.name for p in runs] == ["version_0"]
    assert (runs[0] / "curves.png").is_file() and (runs[0] / "config.yaml").is_file()
    assert "test/acc = " in result.stderr + result.stdout
    # predict on 2 processes: each scores half of the 360 test images; the table has all of them, in order.
    command[2:3] = ["predict", "--ckpt_path", "last"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stderr[-1500:]}"
    with (tmp_path / "runs" / "quickstart" / "version_1" / "predictions.csv").open(newline="") as file:
        assert [int(row["id"]) for row in csv.DictReader(file)] == list(range(360))


def test_test_best_from_another_working_directory(mnist_dir, tmp_path, monkeypatch):
    config = ["-c", str(ROOT / "configs/mnist/mlp.yaml"), "--data.init_args.data_dir", str(mnist_dir)]
    config += ["--data.init_args.val_size", "64"]
    fit = main(["fit", *config, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    best = Path(fit.trainer.checkpoint_callback.best_model_path).resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded best path is relative to tmp_path: it must still be found
    logger = {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "mnist_mlp"}}
    test = main(["test", *config, "--ckpt_path", "best", "--trainer.logger", json.dumps([logger])])
    assert Path(test.trainer.ckpt_path).resolve() == best


@pytest.mark.parametrize("config", CIFAR_BOOK, ids=lambda p: p.stem)
def test_cifar10_book_configs_fast_dev_run(config, tmp_path, monkeypatch):
    from conftest import write_cifar10
    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))  # fake files
    root = write_cifar10(tmp_path / "data")
    cli = main(["fit", "-c", str(config), "--data.init_args.data_dir", str(root), "--data.init_args.val_size", "20",
                "--data.init_args.batch_size", "4", "--trainer.fast_dev_run", "1"])  # fmt: skip
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_speed_switches(mnist_dir):
    configs = ["-c", str(ROOT / "configs/mnist/cnn.yaml"), "-c", str(ROOT / "configs/trainer/gpu_fast.yaml")]
    cli = main(configs, run=False)
    assert cli.trainer.precision == "bf16-mixed" and torch.backends.cudnn.benchmark
    assert cli.config.compile and cli.config.float32_matmul_precision == "high"

    cli = main(["fit", "-c", str(ROOT / "configs/mnist/cnn.yaml"), "--data.init_args.data_dir", str(mnist_dir),
                "--data.init_args.val_size", "64", "--data.init_args.channels_last", "true",
                "--compile", "true", "--compile_backend", "eager", "--trainer.fast_dev_run", "2"])  # fmt: skip
    assert isinstance(cli.model, torch._dynamo.eval_frame.OptimizedModule) and cli.trainer.state.finished
    conv = next(m for m in cli.model._orig_mod.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_no_profiler_by_default_and_a_requested_one_is_kept():
    from pytorch_lightning.profilers import SimpleProfiler

    from lifecycle.speedups import NullProfiler

    cli = main(["-c", str(ROOT / "configs/mnist/mlp.yaml")], run=False)
    profiler = cli.trainer.profiler
    assert isinstance(profiler, NullProfiler)
    with profiler.profile("a") as first, profiler.profile("b") as second:  # shared, reentrant, no state
        assert first is None and second is None
    cli = main(["-c", str(ROOT / "configs/mnist/mlp.yaml"), "--trainer.profiler", "simple"], run=False)
    assert isinstance(cli.trainer.profiler, SimpleProfiler)
