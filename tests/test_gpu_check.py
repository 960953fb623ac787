"""scripts/gpu_check.py: the command line each config gets (its runs need a GPU; try it on CPU, see its docstring)."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import gpu_check

ROOT = Path(__file__).resolve().parents[1]
GPU = argparse.Namespace(accelerator="gpu", precision="bf16-mixed", compile=True)


def flags(args: list[str]) -> dict[str, str]:
    return {key: value for key, value in itertools.pairwise(args) if key.startswith("--")}


def test_every_experiment_is_checked_and_no_snippet():
    names = {str(p.relative_to(ROOT / "configs")) for p in gpu_check.experiments(None)}
    assert {"mnist/mlp.yaml", "cifar10/resnet20_v1.yaml", "imdb/glove.yaml", "omniglot/protonet_1shot.yaml"} <= names
    snippets = ("logger", "sweeps", "trainer", "results", "variants")
    assert not {n for n in names if n.split("/")[0] in snippets or "/" not in n}


def test_a_config_runs_one_step_in_bf16_compiled_channels_last_on_the_generated_data(tmp_path):
    cnn = flags(gpu_check.config_args(ROOT / "configs/mnist/cnn.yaml", tmp_path, GPU))
    assert cnn["--trainer.precision"] == "bf16-mixed" and cnn["--compile"] == "true"
    assert cnn["--trainer.fast_dev_run"] == "true" and cnn["--data.init_args.channels_last"] == "true"
    text = flags(gpu_check.config_args(ROOT / "configs/imdb/glove.yaml", tmp_path, GPU))
    assert "--data.init_args.channels_last" not in text  # the IMDB datamodule has no such option
    assert text["--model.init_args.embedding_file"] == str(tmp_path / "glove.txt")
    transfer = flags(gpu_check.config_args(ROOT / "configs/image_folder/cats_vs_dogs_frozen.yaml", tmp_path, GPU))
    assert transfer["--model.init_args.weights"] == "random"  # ImageNet weights would be a download
    assert transfer["--data.init_args.data_dir"] == str(tmp_path / "folder")


def test_the_cifar_recipe_runs_then_its_muon_and_residual_variants(tmp_path, monkeypatch):
    commands = []

    def record(command, timeout, env=None, cwd=None):
        commands.append(command)
        return {"code": 0, "seconds": 1.0, "output": "test/acc = 0.1"}

    monkeypatch.setattr(gpu_check, "run", record)
    (tmp_path / "cifar" / "train").mkdir(parents=True)
    options = argparse.Namespace(accelerator="gpu", cifar_dir=tmp_path / "cifar")
    report = "\n".join(gpu_check.cifar_recipe(options, tmp_path))
    sgd, *variants = commands
    assert "--data=datamodules.ImageFolderDataModule" in sgd and len(variants) == 2
    for command, name in zip(variants, ("muon", "residual"), strict=True):
        assert command[: len(sgd)] == sgd
        variant = command[command.index("-c", len(sgd)) + 1]
        assert Path(variant) == ROOT / "configs" / "variants" / f"cifar10_{name}.yaml" and Path(variant).is_file()
    assert "Muon variant (8 epochs)" in report and "residual variant" in report
