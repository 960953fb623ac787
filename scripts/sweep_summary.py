"""The results of a sweep: the Markdown table of its trials, the best line, and Optuna's plots beside the storage."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def summary(spec: dict[str, Any], study: Any, plots: bool = True) -> str:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    keys = list(spec["parameters"])
    metric = spec["metric"]
    head = ["trial", "state", *keys, metric, "epochs", "wall time", "run dir"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for t in trials:
        wall = t.user_attrs.get("wall_s")
        if wall is None and t.datetime_start and t.datetime_complete:
            wall = (t.datetime_complete - t.datetime_start).total_seconds()
        value = (
            t.value
            if t.value is not None
            else (max(t.intermediate_values.items())[1] if t.intermediate_values else None)
        )
        row = [
            str(t.number),
            t.state.name,
            *(_fmt(t.params.get(k)) for k in keys),
            _fmt(value),
            str(t.user_attrs.get("epochs", "")),
            f"{wall:.0f} s" if wall is not None else "",
            t.user_attrs.get("run_dir", ""),
        ]
        lines.append("| " + " | ".join(row) + " |")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        params = " ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        lines.append(
            f"best: {metric}={_fmt(best.value)} {params} (trial {best.number}, {best.user_attrs.get('run_dir')})"
        )
    else:
        lines.append(f"best: none (no complete trial out of {len(trials)})")
    if plots:
        lines += _plots(
            study,
            Path(spec["_storage"]).parent
            if "://" not in spec["_storage"]
            else Path("runs/sweeps") / spec["study_name"],
            len(complete),
        )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _plots(study: Any, folder: Path, complete: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    folder.mkdir(parents=True, exist_ok=True)
    notes = []
    kinds = {
        "history": plots.plot_optimization_history,
        "importances": plots.plot_param_importances,
        "parallel_coordinate": plots.plot_parallel_coordinate,
    }
    for name, plot in kinds.items():
        if complete < (2 if name == "importances" else 1):
            notes.append(
                f"({name}: skipped, needs {'2 complete trials' if name == 'importances' else 'a complete trial'})"
            )
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            path = folder / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            matplotlib.pyplot.close(figure)
            notes.append(f"(plot: {path})")
        except Exception as error:  # importances need parameters that vary, etc.
            notes.append(f"({name}: skipped, {' '.join(str(error).split())[:150]})")
    return notes
