"""The sweep file of ``scripts/sweep.py``: reading and checking it, the search space, the sampler and the pruner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from cli_errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

PARAM_TYPES = ("float", "int", "categorical")
DEFAULT_HEARTBEAT = {"interval": 60, "grace": 180, "max_retry": 2}


def _cli_value(value: Any) -> str:
    """A parameter value as the CLI reads it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _optuna_choice(value: Any) -> Any:
    """Optuna's categorical choices are None/bool/int/float/str: a list (``[256, 256]``) becomes its JSON text."""
    return value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file; every problem is a :class:`ConfigError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Sweep file {path} not found.")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping (config, metric, direction, parameters, ...).")
    known = {"config", "args", "study_name", "storage", "metric", "direction", "n_trials", "sampler", "pruner"}
    known |= {"heartbeat", "parameters", "devices_per_trial"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a sweep file has {sorted(known)}.")
    configs = spec.get("config")
    configs = [configs] if isinstance(configs, str) else configs
    if not configs or not all(isinstance(c, str) for c in configs):
        raise ConfigError(f"{path}: `config` must name the experiment's YAML (or a list of them).")
    # A path relative to the working directory, else to the repository (runs go to the working directory).
    spec["config"] = [c if Path(c).exists() or not (ROOT / c).exists() else str(ROOT / c) for c in configs]
    spec["args"] = [str(a) for a in spec.get("args") or []]
    if not spec.get("metric"):
        raise ConfigError(f"{path}: `metric` (a logged key, e.g. val/acc) is missing.")
    direction = spec.setdefault("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"{path}: direction must be maximize or minimize, not {direction!r}.")
    spec.setdefault("study_name", f"{path.stem}_sweep")
    spec.setdefault("n_trials", 10)
    spec["heartbeat"] = {**DEFAULT_HEARTBEAT, **(spec.get("heartbeat") or {})}
    devices = spec.setdefault("devices_per_trial", 1)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ConfigError(
            f"{path}: devices_per_trial (the devices of one DDP trial) must be an integer >= 1, not {devices!r}."
        )
    parameters = spec.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"{path}: `parameters` (the search space, LightningCLI keys) is missing or empty.")
    for key, dist in parameters.items():
        where = f"{path}: parameter {key}"
        if not isinstance(dist, dict) or dist.get("type") not in PARAM_TYPES:
            raise ConfigError(f"{where}: give {{type: float|int|categorical, ...}}, not {dist!r}.")
        if dist["type"] == "categorical":
            if not dist.get("choices"):
                raise ConfigError(f"{where}: categorical needs a non-empty `choices` list.")
            continue
        if "low" not in dist or "high" not in dist:
            raise ConfigError(f"{where}: {dist['type']} needs `low` and `high`.")
        low, high = dist["low"], dist["high"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(f"{where}: low and high must be numbers, not {low!r} and {high!r}.")
        if low >= high:
            raise ConfigError(f"{where}: empty range, low ({low}) must be below high ({high}).")
        if dist.get("log") and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, not {low}.")
        extra = set(dist) - {"type", "low", "high", "log", "step"}
        if extra:
            raise ConfigError(f"{where}: unknown option(s) {sorted(extra)} (type, low, high, log, step).")
    return spec


def fingerprint(spec: dict[str, Any]) -> str:
    """What makes a study: configs, fixed args, metric, direction and search space (not budget nor workers)."""
    keys = ("config", "args", "metric", "direction", "parameters")
    text = json.dumps({k: spec.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def suggest(trial: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    """The trial's parameters, drawn by the study's sampler."""
    params = {}
    for key, dist in parameters.items():
        kind = dist["type"]
        if kind == "float":
            params[key] = trial.suggest_float(
                key, dist["low"], dist["high"], log=bool(dist.get("log")), step=dist.get("step")
            )
        elif kind == "int":
            params[key] = trial.suggest_int(
                key, dist["low"], dist["high"], log=bool(dist.get("log")), step=dist.get("step") or 1
            )
        else:
            params[key] = trial.suggest_categorical(key, [_optuna_choice(c) for c in dist["choices"]])
    return params


def grid_space(parameters: dict[str, Any]) -> dict[str, list[Any]]:
    """The grid sampler's values: categorical choices, integer ranges, float ranges with a ``step``."""
    grid = {}
    for key, dist in parameters.items():
        if dist["type"] == "categorical":
            grid[key] = [_optuna_choice(c) for c in dist["choices"]]
        elif dist["type"] == "int":
            grid[key] = list(range(dist["low"], dist["high"] + 1, dist.get("step") or 1))
        elif dist.get("step"):
            n = round((dist["high"] - dist["low"]) / dist["step"])
            grid[key] = [round(dist["low"] + i * dist["step"], 12) for i in range(n + 1)]
        else:
            raise ConfigError(f"parameter {key}: the grid sampler needs a `step` for a float range (or choices).")
    return grid


def make_sampler(spec: dict[str, Any], worker: int = 0) -> Any:
    import optuna

    options = dict(spec.get("sampler") or {})
    kind = options.pop("type", "tpe")
    if options.get("seed") is not None:
        options["seed"] = int(options["seed"]) + worker  # workers with one seed would draw the same trials
    if kind == "tpe":
        options.setdefault("constant_liar", True)  # running trials count as bad: parallel workers spread out
        return optuna.samplers.TPESampler(**options)
    if kind == "random":
        return optuna.samplers.RandomSampler(**options)
    if kind == "grid":
        return optuna.samplers.GridSampler(grid_space(spec["parameters"]), **options)
    raise ConfigError(f"sampler type {kind!r}: use tpe (default), random or grid.")


def make_pruner(spec: dict[str, Any]) -> Any:
    import optuna

    options = dict(spec.get("pruner") or {})
    kind = options.pop("type", "median")
    classes = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "threshold": optuna.pruners.ThresholdPruner,
        "none": optuna.pruners.NopPruner,
    }
    if kind not in classes:
        raise ConfigError(f"pruner type {kind!r}: use one of {sorted(classes)}.")
    try:
        return classes[kind](**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"pruner {kind}: {error}") from None
