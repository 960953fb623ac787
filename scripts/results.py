"""Run a list of experiments and write the results table (Markdown + CSV), optionally into README.md.

    python scripts/results.py configs/results/cpu.yaml                    # a few minutes on a CPU
    python scripts/results.py configs/results/gpu.yaml --readme README.md # the full table, on a GPU
    python scripts/results.py configs/results/cpu.yaml --only "Digits MLP" --dry_run

A preset is a YAML file::

    title: Scaled-down CPU results
    max_time: "00:00:03:00"          # default time budget per experiment (Lightning's DD:HH:MM:SS)
    experiments:
      - name: Majority class (digits)
        configs: [configs/baselines/digits_majority.yaml]
        metric: test/acc
      - name: Digits MLP
        configs: [configs/quickstart.yaml]
        args: [--trainer.max_epochs, "20"]        # any scripts/train.py override
        metric: test/acc
        baseline: Majority class (digits)         # another experiment's row: the floor shown beside this one
        reference: "98.3 % (book, MNIST)"         # the book's or paper's number, as text
      - name: Diabetes MLP, 4-fold CV
        kind: kfold                               # scripts/kfold.py: the test metric of the retrained model
        configs: [configs/tabular/diabetes_mlp.yaml]
        kfold: {folds: 4, monitor: val/mae}
        metric: test/mae

Every experiment runs through ``scripts/train.py``'s CLI in this process (``fit`` with ``--test_after_fit``,
so the test metric is that of the best checkpoint when the config monitors one) or through ``scripts/kfold.py``.
``metric`` is any logged key: a ``test/...`` one is the tested checkpoint's, any other (``val/acc``) its value in
the epoch of the best checkpoint. An experiment that fails becomes a row saying why; the others still run and the
table is written. The table gives ours, the baseline, the reference, epochs run, wall time and the hardware.
``--readme`` replaces the block between ``<!-- results:start -->`` and ``<!-- results:end -->`` in that file and
nothing else.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_errors import describe

from lightning_modules.checkpoints import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
COLUMNS = ["experiment", "metric", "ours", "baseline", "book / paper", "epochs", "wall time", "hardware"]


def hardware() -> str:
    """The device the experiments ran on, in words."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"{count} x {torch.cuda.get_device_name(0)}" if count > 1 else torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores)"


def load_preset(path: str | Path) -> dict[str, Any]:
    """Read and check a preset; errors name the experiment and the fix."""
    preset = yaml.safe_load(Path(path).read_text())
    if not isinstance(preset, dict) or not isinstance(preset.get("experiments"), list) or not preset["experiments"]:
        raise ValueError(f"{path}: a preset needs an 'experiments:' list (see scripts/results.py's docstring).")
    names = [e.get("name") for e in preset["experiments"]]
    for exp in preset["experiments"]:
        if not exp.get("name") or not exp.get("configs") or not exp.get("metric"):
            raise ValueError(f"{path}: experiment {exp!r} needs 'name', 'configs' (a list) and 'metric'.")
        if exp.get("kind", "fit") not in ("fit", "kfold"):
            raise ValueError(f"{path}: experiment {exp['name']!r} has kind {exp['kind']!r}; choose 'fit' or 'kfold'.")
        if exp.get("baseline") and exp["baseline"] not in names:
            raise ValueError(
                f"{path}: experiment {exp['name']!r} names baseline {exp['baseline']!r}, not in the preset."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: experiment names must be unique (they label rows and baselines).")
    return preset


def _config_args(exp: dict[str, Any]) -> list[str]:
    args = []
    for config in exp["configs"]:
        path = Path(config)
        args += ["-c", str(path if path.is_absolute() else ROOT / path)]
    return args


def command(exp: dict[str, Any], max_time: str | None) -> list[str]:
    """scripts/train.py arguments (without the subcommand) of one experiment."""
    args = [*_config_args(exp), "--trainer.enable_progress_bar", "false"]
    budget = exp.get("max_time", max_time)
    if budget:
        args += ["--trainer.max_time", str(budget)]
    return args + [str(a) for a in exp.get("args", [])]


def run_experiment(exp: dict[str, Any], max_time: str | None) -> dict[str, Any]:
    """Run one experiment; returns its row values (metric value, epochs, wall time, extra notes)."""
    metric = exp["metric"]
    start = time.perf_counter()
    if exp.get("kind", "fit") == "kfold":
        from kfold import run_kfold

        result = run_kfold(command(exp, max_time), **exp.get("kfold", {}))
        value = result.get("test", {}).get(metric)
        note = f"CV {result['monitor']} {result['mean_at_best']:.4g} +- {result['std_at_best']:.3g}"
        epochs = result.get("retrain_epochs", result["epochs_to_retrain"])
    else:
        from train import main

        cli = main(["fit", *command(exp, max_time), "--test_after_fit", "true"])
        value = logged_value(cli.trainer, metric)
        note, epochs = "", cli.trainer.current_epoch
    if value is None:
        raise KeyError(f"metric {metric!r} was not logged by this experiment; check 'metric' in the preset.")
    return {"value": value, "epochs": epochs, "wall_s": time.perf_counter() - start, "note": note}


def logged_value(trainer: Any, metric: str) -> float | None:
    """``metric`` of a finished ``fit --test_after_fit``: a test metric is the tested checkpoint's; any other logged
    metric (``val/acc``, ``train/loss``, ...) is its value in the epoch of the best checkpoint, or its last value
    when the run kept no best checkpoint. None if the run never logged it."""
    if metric in trainer.callback_metrics:
        return float(trainer.callback_metrics[metric])
    path = Path(trainer.log_dir) / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as file:
        values = [(row.get("epoch"), float(row[metric])) for row in csv.DictReader(file) if row.get(metric)]
    if not values:
        return None
    best = getattr(trainer.checkpoint_callback, "best_model_path", None)
    if best:
        epoch = str(read_checkpoint(best)["epoch"])
        at_best = [value for row_epoch, value in values if row_epoch == epoch]
        if at_best:
            return at_best[-1]
    return values[-1][1]


def failed_row(error: Exception, wall_s: float) -> dict[str, Any]:
    """The row of an experiment that raised: no value, and the one-paragraph reason."""
    return {"value": None, "epochs": "", "wall_s": wall_s, "note": "", "error": describe(error)}


def format_value(metric: str, value: float | None) -> str:
    if value is None:
        return ""
    name = metric.partition("/")[2] or metric
    if any(word in name for word in ("acc", "err")):
        return f"{100 * value:.2f} %"
    return f"{value:.4g}"


def table(preset: dict[str, Any], rows: dict[str, dict[str, Any]], device: str) -> str:
    """The Markdown table of the experiments that ran, in preset order."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "| --- | --- | ---: | ---: | --- | ---: | ---: | --- |"]
    for exp in preset["experiments"]:
        row = rows.get(exp["name"])
        if row is None:
            continue
        metric = exp["metric"]
        ours = format_value(metric, row["value"]) + (f" ({row['note']})" if row["note"] else "")
        if row.get("error"):
            reason = row["error"]
            ours = "failed: " + (reason if len(reason) <= 100 else reason[:99] + "…")
        base = rows.get(exp.get("baseline") or "")
        cells = [
            exp["name"],
            f"`{metric}`",
            ours,
            format_value(metric, base["value"]) if base else "",
            str(exp.get("reference", "")),
            str(row["epochs"]),
            f"{row['wall_s']:.0f} s",
            device,
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    title = preset.get("title")
    header = [f"_{title}: `python scripts/results.py {preset.get('_path', '')}`, {time.strftime('%Y-%m-%d')}._", ""]
    return "\n".join((header if title else []) + lines)


def replace_block(path: str | Path, block: str) -> None:
    """Replace the text between the results markers of ``path`` (markers kept, the rest untouched)."""
    path = Path(path)
    text = path.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(
            f"{path} has no '{START}' ... '{END}' block (both markers, in that order). Add the two lines where the "
            "table belongs; the text between them is replaced on every run."
        )
    path.write_text(text[: start + len(START)] + "\n" + block.strip() + "\n" + text[end:])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Run a results preset and write its table.", allow_abbrev=False)
    parser.add_argument("preset", help="preset YAML, e.g. configs/results/cpu.yaml")
    parser.add_argument("--readme", default=None, help="also replace the results block of this Markdown file")
    parser.add_argument(
        "--output", default=None, help="folder for results.md/.csv/.json (default runs/results/<preset>)"
    )
    parser.add_argument("--only", action="append", default=None, help="run only this experiment (repeatable)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    preset = load_preset(args.preset)
    preset["_path"] = args.preset
    experiments = [e for e in preset["experiments"] if not args.only or e["name"] in args.only]
    if args.only and len(experiments) != len(set(args.only)):
        raise ValueError(
            f"--only {args.only}: unknown name(s); the preset has {[e['name'] for e in preset['experiments']]}."
        )
    if args.dry_run:
        for exp in experiments:
            script = "kfold.py" if exp.get("kind") == "kfold" else "train.py fit"
            print(f"# {exp['name']}\npython scripts/{script} " + " ".join(command(exp, preset.get("max_time"))))
        return {}
    device = hardware()
    rows: dict[str, dict[str, Any]] = {}
    for exp in experiments:
        print(f"[results] {exp['name']} ...", flush=True)
        start = time.perf_counter()
        try:
            row = run_experiment(exp, preset.get("max_time"))
            print(f"[results] {exp['name']}: {exp['metric']} = {row['value']:.4f}", flush=True)
        except Exception as error:  # one failed experiment is a row of the table, the others still run
            row = failed_row(error, time.perf_counter() - start)
            print(f"[results] {exp['name']} failed: {row['error']}", flush=True)
        rows[exp["name"]] = row
    markdown = table(preset, rows, device)
    out = Path(args.output or Path("runs") / "results" / Path(args.preset).stem)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown + "\n")
    (out / "results.json").write_text(json.dumps({"hardware": device, "rows": rows}, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "metric", "value", "baseline", "reference", "epochs", "wall_s", "hardware",
                         "error"])  # fmt: skip
        for exp in experiments:
            row, base = rows[exp["name"]], rows.get(exp.get("baseline") or "")
            writer.writerow([exp["name"], exp["metric"], row["value"], base["value"] if base else "",
                             exp.get("reference", ""), row["epochs"], f"{row['wall_s']:.1f}", device,
                             row.get("error", "")])  # fmt: skip
    if args.readme:
        replace_block(args.readme, markdown)
    print(markdown)
    return rows


if __name__ == "__main__":
    from cli_errors import run_command  # errors as one paragraph (TEMPLATE_TRACEBACK=1: the traceback)

    sys.exit(run_command(main))
