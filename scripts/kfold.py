"""K-fold cross-validation with the training configs, then one retrain on all training data at the best epoch.

    python scripts/kfold.py --folds 4 -c configs/tabular/diabetes_mlp.yaml
    python scripts/kfold.py --folds 5 --monitor val/acc -c configs/quickstart.yaml --trainer.max_epochs 20
    python scripts/kfold.py --folds 4 -c configs/tabular/diabetes_mlp.yaml -c configs/logger/wandb.yaml

The notes' workflow (*About K-fold Cross Validation*, *Epoch Plot*): split the training data into K folds
(stratified for classification, keeping every fold's class ratios; shuffled with ``--fold_seed``), train one model
per fold with the same config, average the per-epoch validation curves across folds, smooth the mean curve (EMA,
the book's ``factor=0.9``), pick the epoch where it is best, then train once more on *all* training data for that
many epochs and test once.

The folds are the datamodules' own options (:mod:`datamodules.splits`): fold ``i`` is the ordinary run
``scripts/train.py fit ... --data.init_args.fold i --data.init_args.num_folds K --data.init_args.seed <fold_seed>``
(validation on the i-th fold of the official training split, statistics from the other folds, test split
untouched), so a cluster can also run the folds as K parallel jobs. This script runs them one after another in
this process (one device), then summarises. Everything after the script's own options goes to
``scripts/train.py``'s CLI (``-c`` configs, overrides).

Each fold is its own run: ``<save_dir>/<name>_kfold/<stamp>/fold<i>`` for the CSV/TensorBoard loggers and a
W&B run in one group (``<name>_kfold_<stamp>``, job types ``fold`` and ``retrain``). The summary folder
``<save_dir>/<name>_kfold/<stamp>/`` gets ``folds.csv`` (per fold best epoch and value), ``mean_curve.csv``,
``summary.md`` (mean +- std, the chosen epoch, the retrain's test metrics), ``summary.json`` and
``kfold_curves.png`` (mean curve raw and smoothed, per-fold spread, the chosen epoch).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from pytorch_lightning import Callback, LightningDataModule, Trainer
from pytorch_lightning.callbacks import Checkpoint, EarlyStopping
from pytorch_lightning.trainer.states import TrainerFn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import main as train_main

from callbacks.images import save_and_log_figure, to_rgb_array
from callbacks.trend_stopping import TrendDivergenceStopping

_HIGHER_IS_BETTER = ("acc", "auc", "f1", "precision", "recall", "iou", "dice")


# ---- folds ------------------------------------------------------------------------------------------------
def fold_options(datamodule: LightningDataModule, folds: int, fold_seed: int, stratify: str) -> list[str]:
    """The datamodule options shared by every fold run (the fold number is added per run); checks support."""
    if folds < 2:
        raise ValueError(f"--folds {folds}: k-fold cross-validation needs at least 2 folds.")
    hparams = getattr(datamodule, "hparams", {})
    if "fold" not in hparams or "num_folds" not in hparams:
        raise TypeError(
            f"{type(datamodule).__name__} has no fold/num_folds options, so it cannot be cross-validated. Give it "
            "fold: int | None = None and num_folds: int = 5 and build its train/val split with "
            "datamodules.splits.train_val_indices, as the image, IMDB and tabular datamodules do."
        )
    options = ["--data.init_args.num_folds", str(folds), "--data.init_args.seed", str(fold_seed)]
    if stratify != "auto" and "stratify_folds" in hparams:
        options += ["--data.init_args.stratify_folds", str(stratify == "yes").lower()]
    elif stratify == "yes":
        raise ValueError(
            f"--stratify yes: {type(datamodule).__name__} has no class labels to stratify on (no stratify_folds "
            "option); use --stratify auto or no."
        )
    return options


def stratified(datamodule: LightningDataModule, stratify: str) -> bool:
    """Whether the folds keep the class ratios: with class labels (``stratify_folds``) unless ``--stratify no``."""
    return bool(getattr(datamodule, "hparams", {}).get("stratify_folds", False)) and stratify != "no"


# ---- per-epoch history ---------------------------------------------------------------------------------
class EpochHistory(Callback):
    """Records every scalar ``train/*`` and ``val/*`` epoch metric after each training epoch (val included)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._validated = False

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        row = {"epoch": trainer.current_epoch}
        for key, value in trainer.callback_metrics.items():
            wanted = key.startswith("train/") or (key.startswith("val/") and self._validated)
            if wanted and torch.as_tensor(value).numel() == 1:
                row[key] = float(value)
        self.rows.append(row)
        self._validated = False

    def curve(self, key: str) -> list[float]:
        return [row.get(key, math.nan) for row in self.rows]


def ema(values: np.ndarray, factor: float) -> np.ndarray:
    """``s_0 = x_0``, ``s_t = factor * s_{t-1} + (1 - factor) * x_t`` (the book's ``smooth_curve``)."""
    out = np.empty_like(values, dtype=float)
    for i, value in enumerate(values):
        out[i] = value if i == 0 else factor * out[i - 1] + (1 - factor) * value
    return out


@dataclass
class CurveSummary:
    """Per-fold curves of one metric and their average (NaN where a fold stopped earlier)."""

    key: str
    higher_is_better: bool
    smoothing: float
    per_fold: np.ndarray  # (folds, epochs)
    mean: np.ndarray = field(init=False)
    std: np.ndarray = field(init=False)
    smoothed: np.ndarray = field(init=False)
    common_epochs: int = field(init=False)
    best_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        self.mean = np.nanmean(self.per_fold, axis=0)
        self.std = np.nanstd(self.per_fold, axis=0)
        finite = np.isfinite(self.per_fold).all(axis=0)
        # Epochs every fold reached (early stopping can end folds at different epochs): the choice uses only these.
        self.common_epochs = int(np.argmin(finite)) if not finite.all() else len(finite)
        if self.common_epochs == 0:
            raise ValueError(f"{self.key} was not logged in the first epoch of every fold: nothing to average.")
        self.smoothed = ema(self.mean[: self.common_epochs], self.smoothing)
        pick = np.argmax if self.higher_is_better else np.argmin
        self.best_epoch = int(pick(self.smoothed))


def summarize(histories: list[EpochHistory], key: str, higher: bool, smoothing: float) -> CurveSummary:
    curves = [h.curve(key) for h in histories]
    length = max(len(c) for c in curves)
    matrix = np.full((len(curves), length), np.nan)
    for i, curve in enumerate(curves):
        matrix[i, : len(curve)] = curve
    return CurveSummary(key, higher, smoothing, matrix)


def curves_figure(val: CurveSummary, train: CurveSummary | None) -> Figure:
    """Mean validation curve (raw and EMA) with the per-fold spread and the chosen epoch; train mean if any."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    epochs = np.arange(val.per_fold.shape[1])
    for curve in val.per_fold:
        ax.plot(epochs, curve, color="C1", alpha=0.15, linewidth=0.8)
    ax.fill_between(epochs, val.mean - val.std, val.mean + val.std, color="C1", alpha=0.15, label="val: mean +- std")
    ax.plot(epochs, val.mean, color="C1", alpha=0.5, linewidth=1, label="val: mean over folds")
    common = np.arange(val.common_epochs)
    ax.plot(common, val.smoothed, color="C1", linewidth=2, label=f"val: EMA of the mean ({val.smoothing:g})")
    if train is not None:
        ax.plot(np.arange(len(train.mean)), train.mean, color="C0", linewidth=1.5, label="train: mean over folds")
    ax.axvline(val.best_epoch, color="k", linestyle="--", linewidth=1)
    ax.annotate(
        f"best epoch {val.best_epoch} ({val.smoothed[val.best_epoch]:.4g})",
        (val.best_epoch, val.smoothed[val.best_epoch]),
        textcoords="offset points",
        xytext=(4, 8),
        fontsize="small",
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel(val.key.partition("/")[2] or val.key)
    ax.set_title(f"{val.per_fold.shape[0]}-fold cross-validation: {val.key}", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


# ---- runs ------------------------------------------------------------------------------------------------
def _as_dict(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, list):
        return [_as_dict(v) for v in value]
    return value


def logger_override(config: Any, run: str, stamp: str) -> list[str]:
    """``--trainer.logger`` that files this run under ``<name>_kfold/<stamp>/<run>`` and one W&B group."""
    loggers = _as_dict(config["trainer"].get("logger"))
    if not loggers or loggers is True:
        return []
    loggers = loggers if isinstance(loggers, list) else [loggers]
    out = []
    for logger in loggers:
        logger = json.loads(json.dumps(logger, default=str))
        args = logger.setdefault("init_args", {})
        base = args.get("name") or "run"
        if logger["class_path"].endswith("WandbLogger"):
            args.update(group=f"{base}_kfold_{stamp}", name=run, job_type="retrain" if run == "retrain" else "fold")
            args.pop("id", None)
            args.pop("version", None)
        else:
            args.update(name=f"{base}_kfold", version=f"{stamp}/{run}")
        out.append(logger)
    return ["--trainer.logger", json.dumps(out)]


def _monitors_validation(callback: Callback) -> bool:
    monitor = getattr(callback, "monitor", None) or getattr(callback, "val_monitor", None)
    if isinstance(callback, EarlyStopping | TrendDivergenceStopping):
        return True
    return isinstance(callback, Checkpoint) and bool(monitor)


def _finish_wandb() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def fit_fold(cli_args: list[str], override: list[str], retrain: bool = False):
    """One ordinary run of the config (``cli_args`` hold its fold options); returns (cli, history)."""
    cli = train_main([*cli_args, *override], run=False)
    history = EpochHistory()
    callbacks = [c for c in cli.trainer.callbacks if not (retrain and _monitors_validation(c))]
    cli.trainer.callbacks = [*callbacks, history]
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if retrain:  # the notes: retrain on all training data, then test once (final weights, no selection)
            cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    finally:
        _finish_wandb()
    return cli, history


def run_kfold(
    cli_args: list[str],
    folds: int = 4,
    fold_seed: int = 42,
    monitor: str | None = None,
    mode: str | None = None,
    smoothing: float = 0.9,
    stratify: str = "auto",
    retrain: bool = True,
) -> dict[str, Any]:
    """Cross-validate the config given by ``cli_args`` (train.py's options), retrain, write the summary."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"--smoothing {smoothing}: the EMA factor must lie in [0, 1).")
    start = time.perf_counter()
    probe = train_main(list(cli_args), run=False)
    monitor = monitor or "val/loss"
    higher = any(w in monitor.partition("/")[2] for w in _HIGHER_IS_BETTER) if mode is None else mode == "max"
    options = fold_options(probe.datamodule, folds, fold_seed, stratify)
    is_stratified = stratified(probe.datamodule, stratify)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    loggers = probe.trainer.loggers
    save_dir = Path(loggers[0].save_dir or ".") if loggers else Path(probe.trainer.default_root_dir)
    name = (loggers[0].name if loggers else None) or "run"
    out_dir = save_dir / f"{name}_kfold" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    config = probe.config
    del probe

    histories = []
    for i in range(folds):
        print(f"[kfold] fold {i + 1}/{folds}: --data.init_args.fold {i} {' '.join(options)}", flush=True)
        args = [*cli_args, *options, "--data.init_args.fold", str(i)]
        _, history = fit_fold(args, logger_override(config, f"fold{i}", stamp))
        histories.append(history)
    val = summarize(histories, monitor, higher, smoothing)
    train_key = "train/" + monitor.partition("/")[2]
    train = (
        summarize(histories, train_key, higher, smoothing)
        if all(h.rows and train_key in h.rows[0] for h in histories)
        else None
    )

    result: dict[str, Any] = {
        "monitor": monitor,
        "mode": "max" if higher else "min",
        "folds": folds,
        "stratified": is_stratified,
        "smoothing": smoothing,
        "best_epoch": val.best_epoch,
        "epochs_to_retrain": val.best_epoch + 1,
        "mean_at_best": float(val.mean[val.best_epoch]),
        "std_at_best": float(val.std[val.best_epoch]),
        "per_fold": [],
        "output_dir": str(out_dir),
    }
    pick = np.nanargmax if higher else np.nanargmin
    for i, curve in enumerate(val.per_fold):
        best = int(pick(curve))
        result["per_fold"].append(
            {"fold": i, "best_epoch": best, "best": float(curve[best]), "at_chosen_epoch": float(curve[val.best_epoch])}
        )
    bests = np.array([f["best"] for f in result["per_fold"]])
    result["fold_best_mean"], result["fold_best_std"] = float(bests.mean()), float(bests.std())

    figure = curves_figure(val, train)
    pixels = to_rgb_array(figure)
    Image.fromarray(pixels).save(out_dir / "kfold_curves.png")
    if retrain:
        print(f"[kfold] retraining on all training data for {val.best_epoch + 1} epochs", flush=True)
        override = logger_override(config, "retrain", stamp)
        args = [*cli_args, "--trainer.max_epochs", str(val.best_epoch + 1), "--trainer.min_epochs", "0"]
        args += ["--data.init_args.val_size", "0", "--trainer.limit_val_batches", "0"]  # all of it, no validation
        cli, _ = fit_fold(args, override, retrain=True)
        result["retrain_epochs"] = cli.trainer.current_epoch
        result["test"] = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
        result["retrain_dir"] = str(cli.trainer.log_dir)
        if cli.trainer.loggers:
            save_and_log_figure(cli.trainer, pixels_to_tensor(pixels), "kfold_curves")
    result["wall_time_s"] = time.perf_counter() - start
    write_summary(out_dir, result, val)
    return result


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def write_summary(out_dir: Path, result: dict[str, Any], val: CurveSummary) -> None:
    with open(out_dir / "folds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["fold", "best_epoch", "best", "at_chosen_epoch"])
        writer.writeheader()
        writer.writerows(result["per_fold"])
    with open(out_dir / "mean_curve.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "mean", "std", "smoothed", "folds_reporting"])
        for epoch, (mean, std) in enumerate(zip(val.mean, val.std, strict=True)):
            smoothed = val.smoothed[epoch] if epoch < val.common_epochs else ""
            writer.writerow([epoch, mean, std, smoothed, int(np.isfinite(val.per_fold[:, epoch]).sum())])
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2))
    key = result["monitor"]
    lines = [
        f"# {result['folds']}-fold cross-validation ({key}, {'stratified' if result['stratified'] else 'shuffled'})",
        "",
        f"| fold | best epoch | best {key} | {key} at epoch {result['best_epoch']} |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {f['fold']} | {f['best_epoch']} | {f['best']:.4f} | {f['at_chosen_epoch']:.4f} |"
        for f in result["per_fold"]
    ]
    lines += [
        f"| mean +- std | | {result['fold_best_mean']:.4f} +- {result['fold_best_std']:.4f} | "
        f"{result['mean_at_best']:.4f} +- {result['std_at_best']:.4f} |",
        "",
        f"Chosen epoch (best of the EMA-smoothed mean curve, factor {result['smoothing']:g}): {result['best_epoch']}; "
        f"retrain for {result['epochs_to_retrain']} epochs on all training data.",
    ]
    if "test" in result:
        tests = ", ".join(f"{k} = {v:.4f}" for k, v in sorted(result["test"].items()))
        lines += ["", f"Retrained model on the test split: {tests}."]
    lines += ["", f"Wall time: {result['wall_time_s']:.1f} s."]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description="K-fold cross-validation with scripts/train.py's configs; other options go to that CLI.",
        allow_abbrev=False,
    )
    parser.add_argument("--folds", type=int, default=4, help="number of folds K (default 4, the book's choice)")
    parser.add_argument("--fold_seed", type=int, default=42, help="seed of the fold shuffle")
    parser.add_argument("--monitor", default=None, help="validation key to average and select on (default val/loss)")
    parser.add_argument("--mode", choices=["min", "max"], default=None, help="default: max for acc-like keys")
    parser.add_argument("--smoothing", type=float, default=0.9, help="EMA factor of the mean curve (0: raw)")
    parser.add_argument("--stratify", choices=["auto", "yes", "no"], default="auto", help="auto: for classification")
    parser.add_argument("--no_retrain", action="store_true", help="stop after the folds (no retrain, no test)")
    args, rest = parser.parse_known_args(argv)
    if rest and rest[0] in ("fit", "validate", "test", "predict"):
        rest = rest[1:]
    result = run_kfold(
        rest,
        folds=args.folds,
        fold_seed=args.fold_seed,
        monitor=args.monitor,
        mode=args.mode,
        smoothing=args.smoothing,
        stratify=args.stratify,
        retrain=not args.no_retrain,
    )
    print((Path(result["output_dir"]) / "summary.md").read_text())
    return result


if __name__ == "__main__":
    from cli_errors import run_command  # errors as one paragraph (TEMPLATE_TRACEBACK=1: the traceback)

    sys.exit(run_command(main))
