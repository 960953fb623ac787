"""Hyperparameter sweeps on Optuna: many trials of any experiment, in parallel, one GPU per worker, one study.

    python scripts/sweep.py configs/sweeps/mnist_mlp.yaml --n-trials 8 --workers 2 [train.py overrides ...]
    python scripts/sweep.py configs/sweeps/mnist_mlp.yaml --summary      # table, best line, plots
    sbatch --array=0-15 scripts/slurm/sweep.sbatch configs/sweeps/mnist_mlp.yaml --n-trials 64

The sweep YAML (docs/sweeps.md) names the base experiment config(s), the metric and its direction, the budget, the
search space in LightningCLI keys, the sampler and the pruner. Every trial is an ordinary ``scripts/train.py fit``
run (``train.main`` in the worker's process, no second training loop) in ``runs/<study>/version_N``; its trial
number and parameters go into the run's ``run_info.yaml``, and with ``-c configs/logger/wandb.yaml`` each trial is a
W&B run in the group named after the study.

- Storage: Optuna's JournalStorage on a file (``runs/sweeps/<study>/study.journal`` unless the YAML or
  ``--storage`` says otherwise): no database server, works on a shared filesystem; any RDB URL works too.
- Workers: ``--workers N`` starts N processes sharing the study, each pinned to one GPU (``CUDA_VISIBLE_DEVICES``)
  when there are GPUs; a SLURM array runs one worker per task. The budget (``--n-trials``) counts the study's
  finished (complete or pruned) trials, so workers joining later or requeued ones only do what is left.
- Faults: each running trial writes a heartbeat; a trial whose worker died (SIGKILL, preemption) is marked FAIL
  after ``grace`` seconds by any live worker and re-enqueued with the same parameters (Optuna's retry callback).
- Pruning: :class:`TrialReporter` reports the metric after every validation epoch (global rank zero) and stops
  the run when the pruner says so (the decision is broadcast to every rank); the trial ends PRUNED.
- Before any trial starts: the sweep file is checked, the storage opened (a study written by another sweep file
  is refused), and one dry run (``--trainer.fast_dev_run true``, one batch, nothing written) parses the config
  with the search space's keys and checks that the module logs the metric.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_errors import ConfigError, run_command
from sweep_spec import (
    _cli_value,
    fingerprint,
    grid_space,
    load_spec,
    make_pruner,
    make_sampler,
    suggest,
)
from sweep_summary import summary

warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended.*")
warnings.filterwarnings("ignore", ".*is experimental.*")  # Optuna's heartbeat, retry callback, journal API


# ---- storage ------------------------------------------------------------------------------------------------
def _journal_with_heartbeat():
    """JournalStorage with Optuna's heartbeat protocol (Optuna implements it for RDB storages only): the
    heartbeat is a trial system attribute holding the time, and a RUNNING trial whose heartbeat is older than the
    grace period is stale (any live worker fails it and runs the retry callback)."""
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalStorage
    from optuna.trial import TrialState

    class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
        def __init__(self, backend, interval: int, grace: int, callback) -> None:
            super().__init__(backend)
            self._interval, self._grace, self._callback = interval, grace, callback

        def record_heartbeat(self, trial_id: int) -> None:
            with contextlib.suppress(Exception):  # the trial may just have finished
                self.set_trial_system_attr(trial_id, "heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            stale = []
            for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                beat = trial.system_attrs.get("heartbeat")
                start = trial.datetime_start.timestamp() if trial.datetime_start else now
                if now - (beat if beat is not None else start) > self._grace:
                    stale.append(trial._trial_id)
            return stale

        def get_heartbeat_interval(self) -> int | None:
            return self._interval

        def get_heartbeat_stale_trial_callback(self):
            return self._callback

    return HeartbeatJournalStorage


def open_storage(url: str, heartbeat: dict[str, Any]) -> Any:
    """A journal file (a path, or ``journal:///path``) or an RDB URL, with heartbeat and retries."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    interval, grace = int(heartbeat["interval"]), int(heartbeat["grace"])
    if grace <= interval:
        raise ConfigError(f"heartbeat: grace ({grace} s) must exceed interval ({interval} s).")
    retry = retry_callback_class()(max_retry=heartbeat.get("max_retry"))
    if "://" in url and not url.startswith("journal://"):
        try:
            with optuna.logging.warnings.catch_warnings():
                optuna.logging.warnings.simplefilter("ignore")
                beat = {"heartbeat_interval": interval, "grace_period": grace}
                try:  # Optuna >= 4.9 names the callback so; earlier versions failed_trial_callback
                    return optuna.storages.RDBStorage(url, **beat, heartbeat_stale_trial_callback=retry)
                except TypeError:
                    return optuna.storages.RDBStorage(url, **beat, failed_trial_callback=retry)
        except Exception as error:
            raise ConfigError(
                f"Storage {url} is unreachable: {' '.join(str(error).split())[:300]}. Check the URL, that the "
                "database server runs and its driver is installed, or leave `storage` out for a journal file."
            ) from None
    path = Path(url.removeprefix("journal://"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # An absolute path: Optuna's lock is a symlink to the journal, and a relative one dangles, which makes its
        # stale-lock check spin forever when a killed worker left the lock behind. A lock older than the heartbeat
        # grace (at most 30 s, Optuna's default) is a dead worker's and is broken.
        target = str(path.resolve())
        backend = JournalFileBackend(target, lock_obj=JournalFileSymlinkLock(target, grace_period=min(30, grace)))
    except OSError as error:
        raise ConfigError(f"Storage file {path} cannot be written: {error}.") from None
    return _journal_with_heartbeat()(backend, interval, grace, retry)


def retry_callback_class() -> type:
    """Optuna's callback that re-enqueues a stale trial (renamed in Optuna 4.9)."""
    import optuna

    storages = optuna.storages
    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback


def storage_url(spec: dict[str, Any], given: str | None) -> str:
    return given or spec.get("storage") or str(Path("runs") / "sweeps" / spec["study_name"] / "study.journal")


def load_study(spec: dict[str, Any], storage: Any, create: bool, worker: int = 0) -> Any:
    """The sweep's study; refuses one made from another sweep file (another search space, metric, configs)."""
    import optuna

    name = spec["study_name"]
    exists = name in [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    if not exists and not create:
        raise ConfigError(f"No study {name!r} in storage {spec['_storage']}: run the sweep first.")
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction=spec["direction"],
        sampler=make_sampler(spec, worker),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    mine = fingerprint(spec)
    theirs = study.user_attrs.get("sweep_fingerprint")
    if theirs is None and create:
        study.set_user_attr("sweep_fingerprint", mine)
        study.set_user_attr("sweep_spec", json.loads(json.dumps(_public(spec), default=str)))
    elif theirs is not None and theirs != mine:
        raise ConfigError(
            f"Study {name!r} in {spec['_storage']} was made by another sweep (other configs, metric or search "
            f"space: {study.user_attrs.get('sweep_spec')}). Give this sweep its own study_name or --storage."
        )
    return study


def _public(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if not k.startswith("_")}


# ---- trials -------------------------------------------------------------------------------------------------
def _reporter_class():
    from pytorch_lightning.callbacks import Callback

    class TrialReporter(Callback):
        """Reports the metric to the trial after every validation epoch; stops the run when the pruner says so.

        Global rank zero reports and asks the pruner; the decision is broadcast so every DDP rank stops together.
        ``trial`` None: only records the metrics (the dry run).
        """

        def __init__(self, trial: Any, metric: str) -> None:
            self.trial, self.metric = trial, metric
            self.values: list[float] = []
            self.logged: set[str] = set()
            self.pruned = False

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            self.logged |= set(trainer.callback_metrics)
            value = trainer.callback_metrics.get(self.metric)
            if value is None:
                return
            self.values.append(float(value))
            prune = False
            if self.trial is not None and trainer.is_global_zero:
                self.trial.report(float(value), step=trainer.current_epoch)
                prune = self.trial.should_prune()
            prune = bool(trainer.strategy.broadcast(prune, src=0))
            if prune:
                self.pruned = True
                trainer.should_stop = True

    return TrialReporter


def train_args(spec: dict[str, Any], params: dict[str, Any], extra: list[str]) -> list[str]:
    args = ["fit"]
    for config in spec["config"]:
        args += ["-c", config]
    args += spec["args"]
    for key, value in params.items():
        args += [f"--{key}", _cli_value(value)]
    return [*args, "--experiment", spec["study_name"], *extra]


def dry_run(spec: dict[str, Any], extra: list[str]) -> None:
    """Parse the config with a value for every searched key and run one batch: unknown keys and a metric the
    module never logs are refused before any trial starts."""
    from train import main as train_main

    values = {}
    for key, dist in spec["parameters"].items():
        values[key] = dist["choices"][0] if dist["type"] == "categorical" else dist["low"]
    probe = _reporter_class()(None, spec["metric"])
    args = [*train_args(spec, values, extra), "--trainer.fast_dev_run", "true", "--test_after_fit", "false"]
    try:
        train_main(args, callbacks=[probe])
    except ConfigError as error:
        raise ConfigError(f"The search space or the overrides do not fit the config: {error}") from None
    if spec["metric"] not in probe.logged:
        raise ConfigError(
            f"metric {spec['metric']!r} is never logged by this experiment (a one-batch dry run logged: "
            f"{', '.join(sorted(k for k in probe.logged if not k.endswith('_ema'))) or 'nothing'})."
        )


def objective_for(spec: dict[str, Any], extra: list[str]):
    import optuna
    from train import main as train_main

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, spec["parameters"])
        reporter = _reporter_class()(trial, spec["metric"])
        info = {
            "sweep": {
                "study": spec["study_name"],
                "storage": spec["_storage"],
                "trial": trial.number,
                "params": params,
                "retry_of": retry_callback_class().retried_trial_number(
                    trial.study._storage.get_trial(trial._trial_id)
                ),
            }
        }
        start = time.time()
        cli = train_main(train_args(spec, params, extra), callbacks=[reporter], run_info=info)
        trial.set_user_attr("run_dir", str(cli.trainer.log_dir))
        trial.set_user_attr("epochs", len(reporter.values))
        trial.set_user_attr("wall_s", round(time.time() - start, 1))
        if not reporter.values:
            raise RuntimeError(f"the run logged no {spec['metric']} (did it validate?)")
        if reporter.pruned:
            raise optuna.TrialPruned(f"pruned after {len(reporter.values)} epochs")
        pick = max if spec["direction"] == "maximize" else min
        return pick(reporter.values)

    return objective


def run_worker(spec: dict[str, Any], n_trials: int, extra: list[str], worker: int = 0) -> int:
    """Run trials until the study holds ``n_trials`` finished ones; returns how many this worker ran."""
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec["_storage"], spec["heartbeat"])
    study = load_study(spec, storage, create=True, worker=worker)
    if (spec.get("sampler") or {}).get("type") == "grid":
        n_trials = min(n_trials, math.prod(len(v) for v in grid_space(spec["parameters"]).values()))
    objective = objective_for(spec, extra)
    ran = failures = 0
    poll = max(1, min(5, int(spec["heartbeat"]["interval"])))
    while True:
        fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
        running, waiting = states.count(TrialState.RUNNING), states.count(TrialState.WAITING)
        if done >= n_trials:
            return ran
        if done + running >= n_trials and not waiting:
            time.sleep(poll)  # others finish the budget; if one dies, its trial is retried here
            continue
        try:
            study.optimize(objective, n_trials=1)
            ran += 1
            failures = 0
        except Exception as error:
            failures += 1
            print(f"worker {worker}: trial failed: {error}", file=sys.stderr)
            if failures >= 3:
                raise RuntimeError(f"3 trials in a row failed in worker {worker}; last: {error}") from error


def start_workers(config: str, spec: dict[str, Any], n_trials: int, workers: int, extra: list[str]) -> None:
    """``workers`` processes of this script (``--worker i``), one GPU each when there are GPUs."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g] if visible else [str(i) for i in range(torch.cuda.device_count())]
    procs = []
    for i in range(workers):
        env = dict(os.environ, WANDB_RUN_GROUP=spec["study_name"])
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        else:  # CPU trials: share the cores instead of each worker's torch using all of them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        cmd = [sys.executable, str(Path(__file__).resolve()), config, "--worker", str(i)]
        cmd += ["--n-trials", str(n_trials), "--storage", spec["_storage"], "--study-name", spec["study_name"]]
        procs.append(subprocess.Popen([*cmd, *extra], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"worker exit codes {codes}; the study keeps every finished trial, rerun to continue.")


# ---- command line -------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("sweep", help="the sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--n-trials", type=int, default=None, help="finished trials the study should hold")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine (one GPU each)")
    parser.add_argument("--storage", default=None, help="journal file path or RDB URL (default: the YAML's)")
    parser.add_argument("--study-name", default=None, help="default: the YAML's study_name, else <file>_sweep")
    parser.add_argument("--summary", action="store_true", help="print the table and best line, write the plots")
    parser.add_argument("--no-plots", action="store_true", help="with --summary: the table only")
    parser.add_argument("--check", action="store_true", help="run the checks and the dry run, start no trial")
    parser.add_argument("--skip-dry-run", action="store_true", help="skip the one-batch check run")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # a started worker process
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> str | None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    options, extra = parse(argv)
    spec = load_spec(options.sweep)
    if options.study_name:
        spec["study_name"] = options.study_name
    spec["_storage"] = storage_url(spec, options.storage)
    n_trials = options.n_trials if options.n_trials is not None else int(spec["n_trials"])
    if options.worker is not None:  # a process started by start_workers (or by hand / by SLURM)
        run_worker(spec, n_trials, extra, options.worker)
        return None
    storage = open_storage(spec["_storage"], spec["heartbeat"])
    if options.summary:
        text = summary(spec, load_study(spec, storage, create=False), plots=not options.no_plots)
        print(text)
        return text
    if n_trials < 1 or options.workers < 1:
        raise ConfigError("--n-trials and --workers must be at least 1.")
    make_sampler(spec)  # their options, checked
    make_pruner(spec)
    if _exists(spec, storage):
        load_study(spec, storage, create=False)  # a study of another sweep file is refused here
    if not options.skip_dry_run:
        dry_run(spec, extra)
    if options.check:
        print(f"sweep {options.sweep}: checks passed (study {spec['study_name']!r}, storage {spec['_storage']}).")
        return None
    load_study(spec, storage, create=True)
    started = time.time()
    if options.workers == 1:
        os.environ.setdefault("WANDB_RUN_GROUP", spec["study_name"])
        run_worker(spec, n_trials, extra)
    else:
        start_workers(options.sweep, spec, n_trials, options.workers, extra)
    text = summary(spec, load_study(spec, storage, create=False), plots=True)
    print(f"{text}\nsweep wall time: {time.time() - started:.0f} s")
    return text


def _exists(spec: dict[str, Any], storage: Any) -> bool:
    import optuna

    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    return spec["study_name"] in names


if __name__ == "__main__":
    sys.exit(run_command(main))
