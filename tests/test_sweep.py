"""scripts/sweep.py: Optuna sweeps of ordinary CLI runs: parallel workers, pruning, a killed worker, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sweep
import yaml
from cli_errors import ConfigError
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--data.init_args.val_size", "64"]
TINY += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def write_sweep(tmp_path: Path, **changes) -> Path:
    spec = {
        "config": "configs/mnist/mlp.yaml",
        "study_name": "tiny",
        "metric": "val/acc",
        "direction": "maximize",
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "heartbeat": {"interval": 1, "grace": 3},
        "parameters": {
            "model.init_args.dropout": {"type": "float", "low": 0.1, "high": 0.6},
            "model.init_args.optimizer.init_args.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "model.init_args.hidden_units": {"type": "categorical", "choices": [[32], [64, 64]]},
        },
    }
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def load(storage: str = "runs/sweeps/tiny/study.journal") -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=sweep.open_storage(storage, {"interval": 1, "grace": 3}))


def test_two_workers_share_one_study(tmp_path, mnist_dir):
    path = write_sweep(tmp_path)
    text = sweep.main(
        [str(path), "--n-trials", "4", "--workers", "2", "--data.init_args.data_dir", str(mnist_dir), *TINY]
    )
    trials = load().get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    runs = sorted((tmp_path / "runs" / "tiny").glob("version_*"))
    assert len(runs) == 4 and {t.user_attrs["run_dir"] for t in trials} == {f"runs/tiny/{r.name}" for r in runs}
    for trial in trials:  # the trial's number and parameters are in its run's record
        record = yaml.safe_load((tmp_path / trial.user_attrs["run_dir"] / "run_info.yaml").read_text())
        assert record["sweep"]["trial"] == trial.number
        assert record["sweep"]["params"]["model.init_args.dropout"] == trial.params["model.init_args.dropout"]
        assert trial.user_attrs["epochs"] == 2
    lines = text.splitlines()
    assert lines[0].startswith("| trial | state | model.init_args.dropout")
    assert sum(" COMPLETE " in line for line in lines) == 4
    best = max(trials, key=lambda t: t.value)
    best_line = next(line for line in lines if line.startswith("best: "))
    assert best_line.startswith(f"best: val/acc={best.value:.4g} model.init_args.dropout=")
    assert (tmp_path / "runs/sweeps/tiny/history.png").is_file()
    # --summary reads the study again: the same table
    assert sweep.main([str(path), "--summary", "--no-plots"]).splitlines()[:6] == lines[:6]


def test_a_trial_is_pruned(tmp_path, mnist_dir):
    # Any val/acc below 2 is pruned: the first epoch's report stops the run, the trial ends PRUNED.
    path = write_sweep(tmp_path, pruner={"type": "threshold", "lower": 2.0})
    sweep.main([str(path), "--n-trials", "1", "--skip-dry-run", "--data.init_args.data_dir", str(mnist_dir), *TINY])
    (trial,) = load().get_trials()
    assert trial.state == TrialState.PRUNED and trial.user_attrs["epochs"] == 1
    assert list(trial.intermediate_values) == [0]
    assert (tmp_path / trial.user_attrs["run_dir"] / "checkpoints" / "last.ckpt").is_file()  # an ordinary run


def test_a_killed_workers_trial_fails_and_is_retried(tmp_path, mnist_dir):
    path = write_sweep(tmp_path)
    slow = ["--trainer.max_epochs", "50", "--trainer.limit_train_batches", "2", "--data.init_args.val_size", "64"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "scripts")]))
    cmd = [sys.executable, str(ROOT / "scripts/sweep.py"), str(path), "--worker", "0", "--n-trials", "1"]
    worker = subprocess.Popen(
        [*cmd, "--data.init_args.data_dir", str(mnist_dir), *slow], env=env, stderr=subprocess.DEVNULL
    )
    journal = tmp_path / "runs/sweeps/tiny/study.journal"
    deadline = time.time() + 60
    while time.time() < deadline:  # until its trial has started
        if journal.is_file() and any(t.state == TrialState.RUNNING for t in _trials()):
            break
        time.sleep(0.5)
    time.sleep(1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert [t.state for t in _trials()] == [TrialState.RUNNING]  # until its heartbeat is older than the grace
    # Another worker fails the stale trial after the grace period and runs its copy (same parameters).
    sweep.main([str(path), "--worker", "1", "--n-trials", "1", "--data.init_args.data_dir", str(mnist_dir), *TINY])
    failed, retried = load().get_trials()
    assert (failed.state, retried.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retried.params == failed.params
    assert sweep.retry_callback_class().retried_trial_number(retried) == failed.number


def _trials():
    try:
        return load().get_trials()
    except KeyError:  # the study is not created yet
        return []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"parameters": {"model.init_args.dropout": {"type": "float", "low": 0.5, "high": 0.5}}}, "empty range"),
        ({"parameters": {"model.init_args.dropot": {"type": "float", "low": 0.1, "high": 0.5}}}, "dropout"),
        ({"metric": "val/accuracy"}, "never logged"),
        ({"storage": "postgresql://nobody@127.0.0.1:1/none"}, "unreachable"),
    ],
    ids=["empty-range", "unknown-key", "metric-never-logged", "unreachable-storage"],
)
def test_bad_input_is_one_clear_error_before_any_trial(tmp_path, mnist_dir, changes, message):
    path = write_sweep(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message):
        sweep.main([str(path), "--n-trials", "1", "--data.init_args.data_dir", str(mnist_dir), *TINY])
    assert not (tmp_path / "runs" / "tiny").exists()  # no trial ran


def test_a_study_of_another_sweep_is_refused(tmp_path, mnist_dir):
    journal = tmp_path / "runs/sweeps/tiny/study.journal"
    storage = sweep.open_storage(str(journal), {"interval": 1, "grace": 3})
    other = sweep.load_spec(write_sweep(tmp_path, metric="val/loss", direction="minimize"))
    other["_storage"] = str(journal)
    sweep.load_study(other, storage, create=True)
    path = write_sweep(tmp_path)
    with pytest.raises(ConfigError, match="made by another sweep"):
        sweep.main([str(path), "--n-trials", "1", "--data.init_args.data_dir", str(mnist_dir), *TINY])


def test_the_folds_of_a_cross_validation_are_a_grid_of_trials(tmp_path, mnist_dir):
    grid = {"data.init_args.fold": {"type": "int", "low": 0, "high": 2}}
    path = write_sweep(tmp_path, sampler={"type": "grid"}, args=["--data.init_args.num_folds", "3"], parameters=grid)
    tiny = [*TINY, "--trainer.max_epochs", "1"]
    sweep.main([str(path), "--n-trials", "10", "--skip-dry-run", "--data.init_args.data_dir", str(mnist_dir), *tiny])
    trials = load().get_trials()  # the budget stops at the grid's size: each fold once
    assert sorted(t.params["data.init_args.fold"] for t in trials) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_a_journal_lock_left_by_a_killed_worker_is_broken(tmp_path):
    journal = tmp_path / "runs/sweeps/tiny/study.journal"
    storage = sweep.open_storage(str(journal), {"interval": 1, "grace": 3})
    os.symlink(journal.resolve(), f"{journal.resolve()}.lock")  # what a worker killed inside the lock leaves
    spec = sweep.load_spec(write_sweep(tmp_path))
    spec["_storage"] = str(journal)
    start = time.time()
    sweep.load_study(spec, storage, create=True)  # waits out the grace period, then breaks the lock
    assert 2 < time.time() - start < 15
