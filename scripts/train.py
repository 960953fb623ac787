"""The one command-line entry point: LightningCLI over every topic module and datamodule.

    python scripts/train.py fit -c configs/mnist/cnn.yaml
    python scripts/train.py fit -c configs/mnist/cnn.yaml --model.init_args.dropout 0.3 --trainer.max_epochs 3
    python scripts/train.py test -c configs/mnist/cnn.yaml --ckpt_path best
    python scripts/train.py fit -c configs/mnist/cnn.yaml --print_config

Besides LightningCLI's own behaviour this CLI:
- gives every logger of a run one shared run directory (``<save_dir>/<name>/version_N``), so metrics.csv,
  TensorBoard events, ``config.yaml``, checkpoints and pictures sit together;
- ``--test_after_fit true`` evaluates the best checkpoint on the test split right after ``fit``;
- in a fresh ``validate``/``test``/``predict`` process, ``--ckpt_path best|last`` resolves to the best or last
  checkpoint of the newest earlier run of the same experiment;
- ``fit --ckpt_path last`` resumes the newest earlier run (or starts afresh if there is none) and keeps writing
  into that run's directory; checkpoints are written atomically and carry the RNG and data-order state for an
  exact resume, and a damaged or unsafe checkpoint is one clear error (``callbacks/checkpointing.py``);
- prints a short summary (run directory, best checkpoint, test metrics) at the end.
"""

from __future__ import annotations

import pickle
import sys
import warnings
from pathlib import Path
from typing import Literal

import torch
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from callbacks.batch_scaling import batch_size_summary
from callbacks.checkpointing import CheckpointError, continue_run_dir, install_fault_tolerance, read_checkpoint
from callbacks.profiler import NullProfiler
from callbacks.run_record import RunRecord, continue_wandb_run

# The in-memory datamodules batch by tensor slicing: worker processes would only add overhead. The modules
# log epoch aggregates, so Lightning's advice about the per-step logging interval does not apply either.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def share_run_dir(trainer: Trainer) -> None:
    """Give loggers that share ``save_dir`` and ``name`` with the first one its version, hence its directory."""
    if len(trainer.loggers) < 2:
        return
    first = trainer.loggers[0]
    for logger in trainer.loggers[1:]:
        same_root = logger.save_dir == first.save_dir and logger.name == first.name
        if same_root and getattr(logger, "_version", "unset") is None:
            logger._version = first.version


def previous_run_dirs(trainer: Trainer) -> list[Path]:
    """Earlier run directories of this experiment (same logger save_dir/name), newest first."""
    if not trainer.loggers or trainer.loggers[0].save_dir is None:
        return []
    root = Path(trainer.loggers[0].save_dir) / (trainer.loggers[0].name or "")
    runs = [p for p in root.glob("*") if (p / "checkpoints").is_dir()]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_checkpoint(trainer: Trainer, which: str) -> str:
    """``best``/``last`` -> a checkpoint path of the newest earlier run, or a clear error."""
    runs = previous_run_dirs(trainer)
    for run in runs:
        last = run / "checkpoints" / "last.ckpt"
        if which == "last" and last.is_file():
            return str(last)
        if which == "best" and last.is_file():
            state = read_checkpoint(last)
            for key, value in state.get("callbacks", {}).items():
                best = value.get("best_model_path") if key.startswith("ModelCheckpoint") else None
                # The recorded path may be relative to the directory fit ran in: look in this run too.
                for candidate in (Path(best), run / "checkpoints" / Path(best).name) if best else ():
                    if candidate.is_file():
                        return str(candidate)
    raise FileNotFoundError(
        f"--ckpt_path {which}: no earlier run of this experiment with a checkpoints/last.ckpt was found under "
        f"{Path(trainer.loggers[0].save_dir) / trainer.loggers[0].name if trainer.loggers else '(no logger)'}."
        " Run `fit` first with the same config (its ModelCheckpoint needs save_last: true), or pass the path "
        "of a .ckpt file."
    )


class TemplateCLI(LightningCLI):
    """LightningCLI with the run-directory, test-after-fit and checkpoint-resolution conveniences."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, evaluate the best checkpoint (or the final weights) on the test split.",
        )
        # Speed switches (docs: README "Speed"): safe defaults on a CPU, right ones on a GPU cluster.
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
        # cuDNN picks the fastest conv algorithms for the (fixed) input shapes; no effect on a CPU.
        parser.set_defaults({"trainer.benchmark": True})

    def instantiate_trainer(self, **kwargs) -> Trainer:
        if self._get(self.config_init, "trainer", default={}).get("profiler") is None:
            kwargs.setdefault("profiler", NullProfiler())  # Lightning's default no-op profiler, minus its overhead
        trainer = super().instantiate_trainer(**kwargs)
        share_run_dir(trainer)
        install_fault_tolerance(trainer)  # atomic checkpoint writes, RNG states in checkpoints
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the model's hyperparameters from a --ckpt_path file while parsing: check the file
        # first, so that a damaged or unsafe one gets a clear error instead of a traceback from torch.load.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            read_checkpoint(path)
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError:  # only a file loaded with the unsafe opt-in gets here
            rank_zero_warn(f"{path} needs full pickle: its hyperparameters are not read, the config's are used.")

    def _resolve_ckpt_alias(self) -> dict | None:
        """Resolve ``best``/``last`` and check the checkpoint (clear errors); returns the loaded checkpoint."""
        if self.subcommand != "fit":
            # Evaluating a checkpoint in a new run directory: the checkpoint callback's note that it will not
            # track the old directory's top-k is noise here.
            warnings.filterwarnings("ignore", ".*The dirpath has changed from.*")
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") in ("best", "last"):
            cfg["ckpt_path"] = resolve_checkpoint(self.trainer, cfg["ckpt_path"])
            self.config[self.subcommand]["ckpt_path"] = cfg["ckpt_path"]  # the saved config names the file
            rank_zero_info(f"Using checkpoint {cfg['ckpt_path']}")
        path = cfg.get("ckpt_path")
        return read_checkpoint(path) if path and Path(path).is_file() else None

    def _speed_switches(self) -> None:
        """Apply ``--float32_matmul_precision``, ``channels_last`` weights and ``--compile`` before running."""
        cfg = self.config_init[self.subcommand]
        torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision") or "highest")
        hparams = getattr(self.datamodule, "hparams", {})
        if hparams.get("channels_last"):  # weights in the layout the batches come in: no per-conv conversion
            self.model.to(memory_format=torch.channels_last)
        if cfg.get("compile") and not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            # Lightning unwraps the compiled module for checkpoints: their keys stay those of the plain model.
            self.model = torch.compile(self.model, backend=cfg.get("compile_backend") or "inductor")

    def _before_evaluation(self) -> dict | None:
        self._speed_switches()
        return self._resolve_ckpt_alias()

    before_validate = before_test = before_predict = _before_evaluation

    def before_fit(self) -> None:
        # Every process runs this; rank zero prints, e.g. "per-device batch 128 x devices 4 x nodes 2 = ...".
        rank_zero_info(batch_size_summary(self.trainer, self.datamodule))
        cfg = self.config_init["fit"]
        if cfg.get("ckpt_path") == "last" and not any(
            (run / "checkpoints" / "last.ckpt").is_file() for run in previous_run_dirs(self.trainer)
        ):
            # One command for the first launch and every requeue, as Lightning's own fit(ckpt_path="last").
            rank_zero_warn("--ckpt_path last: no earlier run of this experiment has a last.ckpt, starting afresh.")
            cfg["ckpt_path"] = self.config["fit"]["ckpt_path"] = None
        checkpoint = self._resolve_ckpt_alias()
        if checkpoint is not None:  # resume in the interrupted run's directory (metrics.csv, checkpoints/)
            continue_run_dir(self.trainer, cfg["ckpt_path"], checkpoint)
        continue_wandb_run(self.trainer, self.config_init["fit"].get("ckpt_path"))
        self._speed_switches()

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


def main(args: list[str] | None = None, run: bool = True) -> TemplateCLI:
    try:
        return TemplateCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=RunRecord,  # config.yaml + run_info.yaml (+ the config to W&B)
            save_config_kwargs={"overwrite": True},
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
    try:
        main()
    except CheckpointError as error:  # a damaged or unsafe checkpoint: the message says what to do
        raise SystemExit(f"error: {error}") from None
