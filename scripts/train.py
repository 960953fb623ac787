"""The one command-line entry point: LightningCLI over every topic module and datamodule.

    python scripts/train.py fit -c configs/mnist/cnn.yaml
    python scripts/train.py fit -c configs/mnist/cnn.yaml --model.init_args.dropout 0.3 --trainer.max_epochs 3
    python scripts/train.py test -c configs/mnist/cnn.yaml --ckpt_path best
    python scripts/train.py fit -c configs/mnist/cnn.yaml --print_config

Besides LightningCLI's own behaviour this CLI:
- reads ``configs/defaults.yaml`` under every command (loggers, and the shared callbacks under their own keys:
  ``checkpoint``, ``early_stopping``, ``curves``, ``last_checkpoint``); ``experiment`` names the run directory;
- gives each run one directory (``<save_dir>/<name>/version_N``) shared by its loggers, holds it with a lock, and
  deletes it again if the command fails before writing a checkpoint (``lifecycle/runs.py``);
- resolves ``--ckpt_path best|last`` to the best or last checkpoint of the newest earlier run of the experiment,
  checks a checkpoint against the config before anything is written, and makes ``fit --ckpt_path last`` (and a
  requeued SLURM job) continue the interrupted run's directory, metrics.csv and W&B run;
- keeps ``last.ckpt`` fresh, writes checkpoints atomically with the RNG state an exact resume needs, and stops a
  run whose loss turns NaN (``lifecycle/checkpoint_io.py``, ``callbacks/checkpointing.py``, ``callbacks/guards.py``);
- on a CPU, swaps in a faster dropout kernel for the run unless ``--cpu_speedups false`` (``lifecycle/speedups.py``);
- ``--test_after_fit true`` evaluates the best checkpoint on the test split right after ``fit``; ``predict``
  prints its scores and writes them to the run directory (``callbacks/predictions.py``);
- prints a short summary (run directory, best checkpoint, test metrics) at the end, and any error as one
  paragraph without a traceback (``TEMPLATE_TRACEBACK=1`` shows it; ``scripts/cli_errors.py``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Literal

import torch
import yaml
from cli_errors import TemplateParser, run_command
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities import rank_zero_info

from callbacks.batch_scaling import batch_size_summary
from callbacks.checkpointing import LastCheckpoint
from callbacks.curves import SmoothedCurves
from callbacks.guards import FiniteLossGuard
from callbacks.predictions import PredictionWriter
from lifecycle.checkpoint_io import install_fault_tolerance
from lifecycle.model_check import check_model
from lifecycle.run_record import RunRecord
from lifecycle.runs import Run, find_checkpoint, name_loggers, open_run
from lifecycle.speedups import CPUSpeedups, NullProfiler
from lightning_modules.checkpoints import read_checkpoint

# The in-memory datamodules batch by tensor slicing: worker processes would only add overhead. The modules
# log epoch aggregates, so Lightning's advice about the per-step logging interval does not apply either.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# A resumed fit writes into its run's existing checkpoints/ folder, as intended.
warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
# The CLI creates each run directory (and writes config.yaml) before the CSV logger starts; metrics.csv is the
# only file that logger deletes, and lifecycle.runs.ContinueMetrics carries a continued run's over.
warnings.filterwarnings("ignore", "Experiment logs directory .* exists and is not empty")


# What every experiment shares (loggers, checkpointing, early stopping, curves); an experiment's -c files go on top.
DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "defaults.yaml"

# Top-level config keys of the callbacks every experiment shares (null: off), added after trainer.callbacks.
NAMED_CALLBACKS: dict[str, type[Callback]] = {
    "checkpoint": ModelCheckpoint,
    "early_stopping": EarlyStopping,
    "curves": SmoothedCurves,
    "last_checkpoint": LastCheckpoint,
}


class TemplateCLI(LightningCLI):
    """LightningCLI with one owner for each run's directory, checked checkpoints and the end-of-run summary."""

    def __init__(self, *args, extra_callbacks: list[Callback] | None = None, **kwargs) -> None:
        self.run = Run()  # the run directory this command holds (lifecycle/runs.py)
        self._extra_callbacks = list(extra_callbacks or [])  # main(callbacks=...)
        self._ckpt_path: str | None = None
        self._checkpoint: tuple[Path, dict] | None = None  # the path and the callback states of the checkpoint
        self._undo: list = []
        self._compiled = False
        try:
            super().__init__(*args, parser_class=TemplateParser, **kwargs)
        except BaseException as error:
            self.run.close(error)
            raise
        self.run.close(None)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--experiment",
            type=str | None,
            default=None,
            help="The experiment's name: its runs go to <save_dir>/<experiment>/version_N (fills every logger "
            "whose `name` is not set).",
        )
        # The callbacks every experiment shares, each under its own key (configs/defaults.yaml sets them), so that
        # a config or a command line changes or removes one by name (`--early_stopping null`) instead of by its
        # position in trainer.callbacks, which holds what an experiment adds.
        for key, callback_class in NAMED_CALLBACKS.items():
            parser.add_subclass_arguments(callback_class, key, required=False, instantiate=True)
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, evaluate the best checkpoint (or the final weights) on the test split.",
        )
        # Speed switches (docs/speed.md): safe defaults on a CPU, right ones on a GPU cluster.
        parser.add_argument(
            "--compile",
            type=bool,
            default=False,
            help="torch.compile the model before running (GPU speed-up; the first steps pay the compilation).",
        )
        parser.add_argument(
            "--compile_backend",
            type=str,
            default="inductor",
            help="torch.compile backend: inductor (fast kernels) or eager/aot_eager (debugging).",
        )
        parser.add_argument(
            "--float32_matmul_precision",
            type=Literal["highest", "high", "medium"],
            default="high",
            help="torch.set_float32_matmul_precision: 'high' lets float32 matmuls/convs use TF32 on Ampere+ GPUs.",
        )
        parser.add_argument(
            "--cpu_speedups",
            type=bool,
            default=True,
            help="On a CPU run, swap in a faster dropout kernel and torch's cached CUDA check for the run "
            "(lifecycle/speedups.py); false: PyTorch exactly as the module builds it.",
        )
        # cuDNN picks the fastest conv algorithms for the (fixed) input shapes; no effect on a CPU.
        parser.set_defaults({"trainer.benchmark": True})

    def parse_arguments(self, parser, args) -> None:
        """Parse, then find and check the checkpoint the command starts from, before anything is written."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        trainer = config.get("trainer")
        name_loggers(trainer.get("logger"), config.get("experiment"))
        if not subcommand:
            return
        path = find_checkpoint(
            subcommand,
            config.get("ckpt_path"),
            trainer.get("logger"),
            trainer.get("default_root_dir"),
            SLURMEnvironment.detect(),
        )
        if path is not None:
            # weights_only: a damaged or unsafe file is one clear error; mmap: the weights are not read here.
            checkpoint = read_checkpoint(path, mmap=True)
            with warnings.catch_warnings():  # jsonargparse 4.49+ deprecates skip_none, as LightningCLI still uses it
                warnings.simplefilter("ignore", DeprecationWarning)
                dumped = yaml.safe_load(parser.dump(self.config, skip_none=False, skip_link_targets=False))
            model = check_model(path, checkpoint, dumped[subcommand].get("model") or {}, subcommand)
            if model is not None:  # validate/test/predict build the model the checkpoint holds
                self.config = parser.parse_object({subcommand: {"model": model}}, self.config)
            self._checkpoint = (path, {"callbacks": checkpoint.get("callbacks", {})})
        # Done here, so LightningCLI's own reading of the checkpoint's hyperparameters has nothing left to do;
        # the path is put back before the classes are instantiated.
        self._ckpt_path = str(path) if path is not None else None
        self.config[subcommand]["ckpt_path"] = None

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        config["ckpt_path"] = self._ckpt_path
        if self.subcommand != "fit":  # evaluating in a new run directory: ModelCheckpoint's note on it is noise
            warnings.filterwarnings("ignore", ".*The dirpath has changed from.*")
        if not config.get("trainer").get("fast_dev_run"):  # fast_dev_run logs and checkpoints nothing
            path, checkpoint = self._checkpoint or (None, None)
            self.run, self._undo = open_run(self.subcommand, config, path, checkpoint)

    def after_instantiate_classes(self) -> None:
        # The loggers were built pointing at this run; the saved config.yaml stays a recipe for a new run.
        for container, key, had, old in reversed(self._undo):
            if had:
                container[key] = old
            else:
                del container[key]

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config.get("trainer", {}).get("profiler") is None:
            kwargs.setdefault("profiler", NullProfiler())  # Lightning's default no-op profiler, minus its overhead
        named = [config.get(key) for key in NAMED_CALLBACKS]
        given = config.get("trainer", {}).get("callbacks") or []
        kwargs["callbacks"] = [*given, *(c for c in named if c is not None)]
        trainer = super().instantiate_trainer(**kwargs)
        # CPUSpeedups: the CPU dropout kernel and torch's cached CUDA check, undone when the run ends (speedups.py).
        speedups = [CPUSpeedups()] if config.get("cpu_speedups", True) else []
        extra = [*speedups, *{"fit": [FiniteLossGuard()], "predict": [PredictionWriter()]}.get(self.subcommand, [])]
        trainer.callbacks.extend([c for c in extra if not any(type(o) is type(c) for o in trainer.callbacks)])
        trainer.callbacks.extend(self._extra_callbacks)  # main(callbacks=...): e.g. a sweep trial's reporter
        trainer.callbacks.extend(self.run.callbacks)  # a continued run's metrics.csv
        install_fault_tolerance(trainer)  # atomic writes, RNG states, and last.ckpt saved after everything else
        return trainer

    def _speed_switches(self) -> None:
        """Apply ``--float32_matmul_precision``, ``channels_last`` weights and ``--compile`` before running."""
        cfg = self.config_init[self.subcommand]
        torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision") or "highest")
        hparams = getattr(self.datamodule, "hparams", {})
        if hparams.get("channels_last"):  # weights in the layout the batches come in: no per-conv conversion
            self.model.to(memory_format=torch.channels_last)
        if cfg.get("compile") and not self._compiled:  # once per command (fit, then test_after_fit)
            # Lightning unwraps the compiled module for checkpoints: their keys stay those of the plain model.
            self.model = torch.compile(self.model, backend=cfg.get("compile_backend") or "inductor")
            self._compiled = True

    def before_fit(self) -> None:
        # Every process runs this; rank zero prints, e.g. "per-device batch 128 x devices 4 x nodes 2 = ...".
        rank_zero_info(batch_size_summary(self.trainer, self.datamodule))
        self._speed_switches()

    before_validate = before_test = before_predict = _speed_switches

    def after_fit(self) -> None:
        lines = []
        callback = self.trainer.checkpoint_callback
        has_best = isinstance(callback, ModelCheckpoint) and bool(callback.best_model_path)
        if has_best:
            score = callback.best_model_score
            score_text = f" ({callback.monitor} = {float(score):.4f})" if score is not None else ""
            lines.append(f"Best checkpoint: {callback.best_model_path}{score_text}")
        if self.config_init["fit"].get("test_after_fit"):
            # Without a monitored checkpoint, the final weights are tested.
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
            lines += self._test_lines()
        self._summary(lines)

    def after_test(self) -> None:
        self._summary([f"Evaluated checkpoint: {self.trainer.ckpt_path}", *self._test_lines()])

    def _test_lines(self) -> list[str]:
        metrics = self.trainer.callback_metrics
        return [f"{k} = {float(v):.4f}" for k, v in sorted(metrics.items()) if k.startswith("test/")]

    def _summary(self, lines: list[str]) -> None:
        rank_zero_info("\n".join([f"Run directory: {self.trainer.log_dir}", *lines]))


def default_configs(run: bool) -> dict:
    """configs/defaults.yaml under every subcommand (or the one parser of ``run=False``)."""
    defaults = {"default_config_files": [str(DEFAULTS)]}
    return {command: defaults for command in LightningCLI.subcommands()} if run else defaults


def main(
    args: list[str] | None = None,
    run: bool = True,
    callbacks: list[Callback] | None = None,
    run_info: dict | None = None,
) -> TemplateCLI:
    """The CLI on ``args``. ``callbacks`` are added to the trainer and ``run_info`` to the run's ``run_info.yaml``
    (objects a YAML cannot hold, e.g. ``scripts/sweep.py``'s trial reporter, and its trial number and parameters)."""
    try:
        return TemplateCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=RunRecord,  # config.yaml + run_info.yaml (+ the config to W&B)
            save_config_kwargs={"overwrite": True, "extra": run_info},
            extra_callbacks=callbacks,
            parser_kwargs=default_configs(run),
            args=args,
            run=run,
        )
    finally:
        # Lightning keeps the process group alive after fit/test. Left to the interpreter's exit, gloo's
        # threads can abort the process (SIGABRT, exit code 134) after a successful run: close it here.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        # Close the W&B run of this command (flushes offline runs), so a next run in the same process (a
        # notebook, a test, an in-process sweep) starts its own instead of writing into this one.
        wandb = sys.modules.get("wandb")
        if run and wandb is not None and wandb.run is not None:
            wandb.finish()


if __name__ == "__main__":
    sys.exit(run_command(main))
