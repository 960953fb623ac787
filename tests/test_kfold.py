"""K-fold cross-validation: fold indices, stratification, averaged curves, retrain at the chosen epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kfold import EpochHistory, fold_options, main, summarize

from datamodules import DigitsDataModule, OmniglotDataModule
from datamodules.splits import fold_indices

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _folds(targets, num_folds, seed, stratify):
    return [fold_indices(targets, k, num_folds, seed, stratify) for k in range(num_folds)]


@pytest.mark.parametrize("stratify", [False, True])
def test_fold_indices_are_disjoint_and_cover_the_pool(stratify):
    targets = np.repeat(np.arange(3), [50, 30, 20])
    folds = _folds(targets, 5, seed=0, stratify=stratify)
    vals = np.concatenate([val.numpy() for _, val in folds])
    assert sorted(vals.tolist()) == list(range(100))  # every sample validated exactly once
    for train, val in folds:
        assert not set(train.tolist()) & set(val.tolist()) and len(train) + len(val) == 100
    same = _folds(targets, 5, seed=0, stratify=stratify)  # seeded: the same folds again
    assert [v.tolist() for _, v in folds] == [v.tolist() for _, v in same]
    other = _folds(targets, 5, seed=1, stratify=stratify)
    assert [v.tolist() for _, v in folds] != [v.tolist() for _, v in other]


def test_stratification_keeps_class_ratios():
    targets = np.repeat(np.arange(3), [50, 30, 20])
    for _, val in _folds(targets, 5, seed=1, stratify=True):
        assert np.bincount(targets[val.numpy()], minlength=3).tolist() == [10, 6, 4]


def test_too_few_folds_is_explained():
    with pytest.raises(ValueError, match="at least 2"):
        fold_indices(np.zeros(10), 0, 1, 0, False)


def test_the_driver_passes_the_datamodule_fold_options():
    options = fold_options(DigitsDataModule(), folds=4, fold_seed=7, stratify="no")
    assert options == [
        "--data.init_args.num_folds", "4", "--data.init_args.seed", "7", "--data.init_args.stratify_folds", "false"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--folds 1"):
        fold_options(DigitsDataModule(), folds=1, fold_seed=7, stratify="auto")
    with pytest.raises(TypeError, match="OmniglotDataModule has no fold/num_folds options"):
        fold_options(OmniglotDataModule(), folds=4, fold_seed=7, stratify="auto")


def _history(values: list[float]) -> EpochHistory:
    history = EpochHistory()
    history.rows = [{"epoch": i, "val/loss": v} for i, v in enumerate(values)]
    return history


def test_averaged_curve_is_the_mean_of_the_folds_and_picks_the_smoothed_best():
    folds = [[4.0, 2.0, 1.0, 1.5, 3.0], [5.0, 3.0, 2.0, 1.0, 2.5], [3.0, 2.5, 0.5, 2.0, 3.5]]
    summary = summarize([_history(f) for f in folds], "val/loss", higher=False, smoothing=0.0)
    assert np.allclose(summary.mean, np.mean(folds, axis=0))
    assert np.allclose(summary.std, np.std(folds, axis=0))
    assert summary.best_epoch == 2
    # A fold that stopped early: the mean uses the folds present, the choice only epochs all folds reached.
    short = summarize([_history([3.0, 2.0, 1.0, 0.1]), _history([3.0, 2.0])], "val/loss", False, 0.0)
    assert np.allclose(short.mean, [3.0, 2.0, 1.0, 0.1]) and short.common_epochs == 2 and short.best_epoch == 1
    smoothed = summarize([_history([1.0, 0.0, 1.0])], "val/loss", False, 0.5)
    assert np.allclose(smoothed.smoothed, [1.0, 0.5, 0.75])


def test_kfold_end_to_end_retrains_for_the_chosen_epochs(tmp_path):
    config = str(ROOT / "configs/tabular/diabetes_mlp.yaml")
    result = main(
        ["--folds", "2", "--monitor", "val/mae", "--smoothing", "0", "-c", config, "--trainer.max_epochs", "3",
         "--trainer.limit_train_batches", "3", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
    )  # fmt: skip
    out = Path(result["output_dir"])
    assert result["stratified"] is False and len(result["per_fold"]) == 2
    assert result["retrain_epochs"] == result["best_epoch"] + 1 == result["epochs_to_retrain"]
    assert "test/mae" in result["test"]
    assert {p.name for p in out.iterdir()} >= {
        "fold0",
        "fold1",
        "retrain",
        "folds.csv",
        "summary.md",
        "kfold_curves.png",
    }
    curves = np.genfromtxt(out / "mean_curve.csv", delimiter=",", names=True)
    assert len(curves) == 3 and (curves["folds_reporting"] == 2).all()
    assert json.loads((out / "summary.json").read_text())["best_epoch"] == result["best_epoch"]
    config = (out / "retrain" / "config.yaml").read_text()
    assert "max_epochs: " + str(result["best_epoch"] + 1) in config and "val_size: 0" in config
    for k in range(2):  # each fold is an ordinary run with the datamodule's fold options
        config = (out / f"fold{k}" / "config.yaml").read_text()
        assert f"fold: {k}" in config and "num_folds: 2" in config
