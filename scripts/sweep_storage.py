"""The sweep's study storage: a journal file (with Optuna's heartbeat protocol) or an RDB URL, and the study itself.

A journal file needs no database server and works on a cluster's shared filesystem; each running trial writes a
heartbeat, and a trial whose worker died is failed after the grace period and re-enqueued by the retry callback.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from cli_errors import ConfigError
from sweep_spec import fingerprint, make_pruner, make_sampler


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


def study_exists(spec: dict[str, Any], storage: Any) -> bool:
    import optuna

    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    return spec["study_name"] in names
