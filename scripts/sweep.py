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
- Workers: ``--workers N`` starts N processes sharing the study, each pinned to its GPUs (``CUDA_VISIBLE_DEVICES``)
  when there are GPUs: one, or ``devices_per_trial`` for DDP trials (run in a child process per trial); a SLURM
  array runs one worker per task. The budget (``--n-trials``) counts the study's finished (complete or pruned)
  trials, so workers joining later or requeued ones only do what is left.
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
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_errors import ConfigError, run_command
from sweep_spec import _cli_value, grid_space, load_spec, make_pruner, make_sampler, suggest
from sweep_storage import load_study, open_storage, retry_callback_class, storage_url, study_exists
from sweep_summary import summary

warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended.*")
warnings.filterwarnings("ignore", ".*is experimental.*")  # Optuna's heartbeat, retry callback, journal API


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
    if spec["devices_per_trial"] > 1:  # before the sweep's args and overrides, which may choose another strategy
        args += ["--trainer.devices", str(spec["devices_per_trial"]), "--trainer.strategy", "ddp"]
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


def run_trial(spec: dict[str, Any], trial: Any, extra: list[str]) -> tuple[dict[str, Any], Any]:
    """One trial as an ordinary fit (``train.main`` in this process); returns its result and the CLI."""
    from train import main as train_main

    params = suggest(trial, spec["parameters"])  # a trial that holds them already gets the same values back
    reporter = _reporter_class()(trial, spec["metric"])
    retry_of = retry_callback_class().retried_trial_number(trial.study._storage.get_trial(trial._trial_id))
    info = {"sweep": {"study": spec["study_name"], "storage": spec["_storage"], "trial": trial.number}}
    info["sweep"] |= {"params": params, "retry_of": retry_of}
    cli = train_main(train_args(spec, params, extra), callbacks=[reporter], run_info=info)
    result = {"run_dir": str(cli.trainer.log_dir), "values": reporter.values, "pruned": reporter.pruned}
    return result, cli


def run_trial_in_processes(spec: dict[str, Any], trial: Any, extra: list[str]) -> dict[str, Any]:
    """A DDP trial: ``sweep.py --run-trial`` in a child process, whose ranks Lightning's launcher starts (it re-runs
    the child's command line per rank, which would start new trials if it were this worker's). Rank zero reports to
    the trial through the storage and writes the result; this worker keeps the trial's heartbeat."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), spec["_path"], "--storage", spec["_storage"]]
        cmd += ["--study-name", spec["study_name"], "--run-trial", str(trial._trial_id), "--result", str(result)]
        env = dict(os.environ)
        if "SLURM_NTASKS" in env:  # one SLURM task per worker: Lightning's launcher, not srun, starts the ranks
            env["SLURM_JOB_NAME"] = "interactive"  # how Lightning's SLURMEnvironment is told so
        code = subprocess.run([*cmd, *extra], env=env).returncode
        if code or not result.is_file():
            raise RuntimeError(f"the trial's process exited with code {code} (its output is above)")
        return json.loads(result.read_text())


def objective_for(spec: dict[str, Any], extra: list[str]):
    import optuna

    def objective(trial: optuna.Trial) -> float:
        suggest(trial, spec["parameters"])
        start = time.time()
        if spec["devices_per_trial"] > 1:
            result = run_trial_in_processes(spec, trial, extra)
        else:
            result = run_trial(spec, trial, extra)[0]
        values = result["values"]
        trial.set_user_attr("run_dir", result["run_dir"])
        trial.set_user_attr("epochs", len(values))
        trial.set_user_attr("wall_s", round(time.time() - start, 1))
        if not values:
            raise RuntimeError(f"the run logged no {spec['metric']} (did it validate?)")
        if result["pruned"]:
            raise optuna.TrialPruned(f"pruned after {len(values)} epochs")
        return max(values) if spec["direction"] == "maximize" else min(values)

    return objective


def trial_process(spec: dict[str, Any], trial_id: int, result: str | None, extra: list[str]) -> None:
    """``--run-trial``: every rank of a DDP trial runs this; global rank zero writes the result for the worker."""
    import optuna

    study = load_study(spec, open_storage(spec["_storage"], spec["heartbeat"]), create=False)
    outcome, cli = run_trial(spec, optuna.Trial(study, trial_id), extra)
    if result and cli.trainer.is_global_zero:
        Path(result).write_text(json.dumps(outcome))


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
    """``workers`` processes of this script (``--worker i``), each pinned to its own ``devices_per_trial`` GPUs
    when there are GPUs."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g] if visible else [str(i) for i in range(torch.cuda.device_count())]
    per = spec["devices_per_trial"]
    if gpus and len(gpus) < workers * per:
        raise ConfigError(
            f"{workers} workers x devices_per_trial {per} need {workers * per} GPUs; this machine shows {len(gpus)}. "
            "Start fewer workers (--workers) or lower devices_per_trial."
        )
    procs = []
    for i in range(workers):
        env = dict(os.environ, WANDB_RUN_GROUP=spec["study_name"])
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * per : (i + 1) * per])
        else:  # CPU trials: share the cores instead of each process's torch using all of them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (workers * per))))
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
    parser.add_argument("--run-trial", type=int, default=None, help=argparse.SUPPRESS)  # a DDP trial's process
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)  # where --run-trial writes its result
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> str | None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    options, extra = parse(argv)
    spec = load_spec(options.sweep)
    if options.study_name:
        spec["study_name"] = options.study_name
    spec["_storage"] = storage_url(spec, options.storage)
    spec["_path"] = str(Path(options.sweep).resolve())
    if options.run_trial is not None:  # every rank of a DDP trial (run_trial_in_processes)
        trial_process(spec, options.run_trial, options.result, extra)
        return None
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
    if study_exists(spec, storage):
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


if __name__ == "__main__":
    sys.exit(run_command(main))
