"""The run-directory record: what was run, from which code, with which packages, where it was tracked.

:class:`RunRecord` replaces LightningCLI's ``SaveConfigCallback``: besides the resolved ``config.yaml`` it
appends one entry per launch (first start and every resume) to ``<run dir>/run_info.yaml`` (time, command
line, git commit and whether the tree was dirty, package versions, devices, the checkpoint resumed from) and
logs the resolved config once to Weights & Biases, whose run id it records so that a resumed run continues the
same W&B run (:func:`wandb_run_id`, read by :mod:`lifecycle.runs`).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from callbacks.images import run_dir as _run_dir

__all__ = ["RunRecord", "environment_info", "git_info", "wandb_run_id"]

RUN_INFO = "run_info.yaml"
PACKAGES = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "jsonargparse", "wandb", "numpy")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def git_info(repo: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Commit, branch and dirty flag of the code's repository; ``{"commit": None}`` outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def environment_info() -> dict[str, Any]:
    """Python, package versions and the accelerator, for reproducing a run."""

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: installed(name) for name in PACKAGES},
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id recorded in ``run_dir``'s ``run_info.yaml``, if the run was tracked with W&B."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return None
    record = yaml.safe_load(path.read_text()) or {}
    return (record.get("wandb") or {}).get("id")


class RunRecord(SaveConfigCallback):
    """LightningCLI's config saving, plus ``run_info.yaml`` and the config sent to W&B (global rank zero only).

    ``extra``: top-level entries written into ``run_info.yaml`` as given, e.g. ``{"sweep": {"trial": 3, ...}}``
    from ``scripts/sweep.py`` (``main(..., run_info=...)`` in ``scripts/train.py``).
    """

    def __init__(self, *args: Any, extra: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra = dict(extra or {})

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        run_dir = _run_dir(trainer)  # not trainer.log_dir: a collective, it hangs DDP when called on rank 0 only
        path = run_dir / RUN_INFO
        record = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {"launches": []}
        record["launches"].append(
            {
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
                "stage": getattr(stage, "value", stage),
                "ckpt_path": str(self.config.get("ckpt_path")) if self.config.get("ckpt_path") else None,
                "world_size": trainer.world_size,
                "git": git_info(),
                **environment_info(),
            }
        )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                run.config.update(config, allow_val_change=True)  # the resolved config, once per launch
                record["wandb"] = {"id": run.id, "project": run.project, "url": getattr(run, "url", None)}
        record.update(self.extra)
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(record, sort_keys=False))
