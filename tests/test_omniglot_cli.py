"""Few-shot Omniglot through the CLI: the ProtoNet and nearest-neighbour configs fit and test on fake trees in the
real layout, and the support-folder predict script labels queries from a checkpoint or from pixels."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from few_shot_predict import main as predict_main
from PIL import Image
from train import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "omniglot"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_protonet_5shot_config_fast_dev_run(omniglot_dir, in_tmp):
    cli = main(
        ["fit", "-c", str(CONFIGS / "protonet_5shot.yaml"), "--data.init_args.data_dir", str(omniglot_dir),
         "--trainer.fast_dev_run", "2", "--data.init_args.train_way", "20", "--model.init_args.num_classes", "20",
         "--trainer.accelerator", "cpu"]
    )  # fmt: skip
    assert cli.trainer.state.finished
    assert 0 <= cli.trainer.callback_metrics["test/acc"] <= 1  # test_after_fit: true
    assert cli.datamodule.hparams.train_shot == cli.datamodule.hparams.test_shot == 5


@pytest.fixture
def protonet_run(omniglot_dir, in_tmp) -> Path:
    """A short CLI fit of the 1-shot config (3 episodes, 60-way as configured, then 20-way-capable test)."""
    cli = main(
        ["fit", "-c", str(CONFIGS / "protonet_1shot.yaml"), "--data.init_args.data_dir", str(omniglot_dir),
         "--data.init_args.train_episodes", "3", "--trainer.max_epochs", "1",
         "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "3",
         "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--model.init_args.filters", "16"]
    )  # fmt: skip
    run = Path(cli.trainer.log_dir)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("train/loss") for row in rows) and any(row.get("val/acc") for row in rows)
    test = [row for row in rows if row.get("test/acc")][-1]
    assert 0 <= float(test["test/acc"]) <= 1 and float(test["test/episodes"]) == 3
    return run


def test_nn_baseline_config_tests_20_way(omniglot_dir, in_tmp):
    cli = main(
        ["test", "-c", str(CONFIGS / "nn_baseline.yaml"), "--data.init_args.data_dir", str(omniglot_dir),
         "--trainer.fast_dev_run", "2", "--data.init_args.test_way", "10", "--trainer.accelerator", "cpu"]
    )  # fmt: skip
    assert cli.trainer.callback_metrics["test/episodes"] == 2
    assert 0.1 < cli.trainer.callback_metrics["test/acc"] <= 1


def make_support_and_queries(root: Path, tree: Path) -> tuple[Path, Path, dict[str, str]]:
    """Support: 2 drawings of 5 characters (one sub-folder per character); queries: another drawing of each."""
    support, query, truth = root / "support", root / "query", {}
    for character in sorted(tree.glob("*/*"))[:5]:
        name = f"{character.parent.name}-{character.name}"
        (support / name).mkdir(parents=True)
        drawings = sorted(character.glob("*.png"))
        for d in drawings[:2]:
            shutil.copy(d, support / name / d.name)
        query.mkdir(exist_ok=True)
        shutil.copy(drawings[5], query / f"q_{name}.png")
        truth[f"q_{name}.png"] = name
    return support, query, truth


def test_protonet_1shot_config_fits_tests_and_predicts(protonet_run, omniglot_dir, tmp_path):
    support, query, truth = make_support_and_queries(tmp_path, omniglot_dir / "omniglot-py" / "images_evaluation")
    rows = predict_main(["--baseline", "pixels", "--support", str(support), "--query", str(query)])
    assert sorted(q for q, _, _ in rows) == sorted(truth) and all(0 < p <= 1 for _, _, p in rows)
    assert sum(label == truth[q] for q, label, _ in rows) >= 3  # 1-NN on pixels of fake drawings: mostly right
    # The run's checkpoint: preprocessing comes from the checkpoint's datamodule settings.
    checkpoint = protonet_run / "checkpoints" / "last.ckpt"
    output = tmp_path / "predictions.csv"
    rows = predict_main(["--checkpoint", str(checkpoint), "--support", str(support), "--query", str(query),
                         "--output", str(output)])  # fmt: skip
    with open(output) as f:
        written = list(csv.reader(f))
    assert written[0] == ["query", "label", "probability"] and len(written) == 6
    assert {label for _, label, _ in rows} <= set(truth.values())
    centred = predict_main(["--checkpoint", str(checkpoint), "--support", str(support), "--query", str(query),
                            "--centre_sets"])  # fmt: skip
    assert len(centred) == 5 and {label for _, label, _ in centred} <= set(truth.values())
    (lone := tmp_path / "lone").mkdir()
    shutil.copy(query / sorted(truth)[0], lone)
    with pytest.raises(ValueError, match="1 queries for 5 classes"):  # a set of one query has no mean to remove
        predict_main(["--checkpoint", str(checkpoint), "--support", str(support), "--query", str(lone),
                      "--centre_sets"])  # fmt: skip
    with pytest.raises(SystemExit, match="at least 2"):
        only = tmp_path / "one_class"
        (only / "a").mkdir(parents=True)
        Image.new("L", (10, 10)).save(only / "a" / "x.png")
        predict_main(["--baseline", "pixels", "--support", str(only), "--query", str(query)])
