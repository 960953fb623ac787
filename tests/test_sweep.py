"""scripts/sweep.py: Optuna sweeps of ordinary CLI runs: parallel workers, pruning, a killed worker, bad input."""

from __future__ import annotations

import json
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
from sweep_spec import load_spec
from sweep_storage import load_study, open_storage, retry_callback_class

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
    return optuna.load_study(study_name="tiny", storage=open_storage(storage, {"interval": 1, "grace": 3}))


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


@pytest.mark.slow  # two worker processes, ~30 s on 2 slow cores; the journal-lock test below runs in CI
def test_a_worker_killed_beside_a_live_one_leaves_a_sound_journal_and_its_trial_is_retried(tmp_path, mnist_dir):
    """Two workers write the journal at once; one is SIGKILLed mid-trial. The live one finishes its own trial, fails
    the dead one's after the heartbeat grace and runs it again with the same parameters."""
    path = write_sweep(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "scripts")]))
    cmd = [sys.executable, str(ROOT / "scripts/sweep.py"), str(path), "--n-trials", "2"]
    slow = ["--trainer.max_epochs", "100000", "--early_stopping", "null", "--trainer.limit_train_batches", "2"]
    slow += ["--data.init_args.val_size", "64"]  # runs until killed
    data = ["--data.init_args.data_dir", str(mnist_dir)]
    doomed = subprocess.Popen([*cmd, "--worker", "0", *data, *slow], env=env, stderr=subprocess.DEVNULL)
    wait_for(lambda: [t.state for t in _trials()] == [TrialState.RUNNING])
    live = subprocess.Popen([*cmd, "--worker", "1", *data, *TINY], env=env, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(_trials()) == 2)  # both workers are in the journal now
    time.sleep(1)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert live.wait(timeout=120) == 0
    killed, finished, retried = load().get_trials()
    assert (killed.state, finished.state, retried.state) == (TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE)
    assert retried.params == killed.params
    assert retry_callback_class().retried_trial_number(retried) == killed.number
    assert finished.user_attrs["run_dir"] != retried.user_attrs["run_dir"]  # no trial ran twice in one directory
    lines = (tmp_path / "runs/sweeps/tiny/study.journal").read_bytes().splitlines(keepends=True)
    assert all(line.endswith(b"\n") and json.loads(line) for line in lines)  # whole JSON records, nothing torn


@pytest.mark.slow  # a 2-process DDP trial, ~25 s on 2 slow cores
def test_a_ddp_trial_runs_its_ranks_and_is_pruned_on_all_of_them(tmp_path, mnist_dir, capfd):
    """devices_per_trial 2: the trial's two CPU ranks (gloo) start in a child process; rank zero reports, and the
    pruner's decision stops both ranks (a rank left running would hang the run)."""
    path = write_sweep(tmp_path, devices_per_trial=2, pruner={"type": "threshold", "lower": 2.0})
    data = ["--data.init_args.data_dir", str(mnist_dir), "--trainer.accelerator", "cpu"]
    sweep.main([str(path), "--n-trials", "1", "--skip-dry-run", *data, *TINY])
    (trial,) = load().get_trials()
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    assert "x devices 2 x nodes 1" in "".join(capfd.readouterr())  # what rank zero's fit says
    config = yaml.safe_load((tmp_path / trial.user_attrs["run_dir"] / "config.yaml").read_text())
    assert (str(config["trainer"]["devices"]), config["trainer"]["strategy"]) == ("2", "ddp")
    record = yaml.safe_load((tmp_path / trial.user_attrs["run_dir"] / "run_info.yaml").read_text())
    assert record["sweep"]["trial"] == trial.number


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.3)


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
    storage = open_storage(str(journal), {"interval": 1, "grace": 3})
    other = load_spec(write_sweep(tmp_path, metric="val/loss", direction="minimize"))
    other["_storage"] = str(journal)
    load_study(other, storage, create=True)
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
    storage = open_storage(str(journal), {"interval": 1, "grace": 3})
    os.symlink(journal.resolve(), f"{journal.resolve()}.lock")  # what a worker killed inside the lock leaves
    spec = load_spec(write_sweep(tmp_path))
    spec["_storage"] = str(journal)
    start = time.time()
    load_study(spec, storage, create=True)  # waits out the grace period, then breaks the lock
    assert 2 < time.time() - start < 15
