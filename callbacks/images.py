"""One way for every picture-making callback to save a PNG and send it to the loggers that take images.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot, so no global figure registry
and no interactive backend) and rendered with Agg.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch import Tensor

__all__ = ["run_dir", "save_and_log_figure", "to_rgb_array"]


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's output folder: the first logger's folder, else ``trainer.default_root_dir``.

    The same rule as ``trainer.log_dir``, but without its ``strategy.broadcast``: ``trainer.log_dir`` is a
    collective that every process must call, so calling it on rank zero alone would hang a DDP run.
    """
    directory = None
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = logger.log_dir if isinstance(logger, TensorBoardLogger | CSVLogger) else logger.save_dir
    return Path(directory if directory is not None else trainer.default_root_dir)


def to_rgb_array(image: Figure | Tensor) -> np.ndarray:
    """A figure, or an image tensor ``(C, H, W)``/``(H, W)`` (float in [0, 1] or ``uint8``, C in 1, 3, 4),
    as an ``(H, W, 3)`` ``uint8`` array."""
    if isinstance(image, Figure):
        canvas = FigureCanvasAgg(image)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a matplotlib Figure or an image tensor, got {type(image).__name__}")
    image = image.detach().cpu()
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image tensor (C, H, W) with C in 1, 3, 4, got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    image = image[:3] if image.shape[0] >= 3 else image.expand(3, -1, -1)
    return image.permute(1, 2, 0).contiguous().numpy()


def _close(image: Figure | Tensor) -> None:
    # Only figures made with pyplot are registered in its global state; ours never import pyplot.
    pyplot = sys.modules.get("matplotlib.pyplot")
    if isinstance(image, Figure) and pyplot is not None:
        pyplot.close(image)


def save_and_log_figure(
    trainer: pl.Trainer,
    image: Figure | Tensor,
    name: str,
    step: int | None = None,
    tag: str | None = None,
) -> Path | None:
    """Save ``image`` as ``<run dir>/<name>.png`` and send it to every logger that takes images.

    Only global rank zero writes and logs; other processes just close the figure and return ``None``, so it
    is safe (and cheap) to call on every process. A figure is closed after use.

    Args:
        trainer: The running trainer; gives the run folder (see :func:`run_dir`) and the loggers.
        image: A :class:`matplotlib.figure.Figure`, or a ``(C, H, W)`` tensor in [0, 1] (e.g. from
            :func:`torchvision.utils.make_grid`) or ``uint8``.
        name: File name without ``.png``, relative to the run folder; may contain ``/`` (sub-folders are
            created).
        step: Step the loggers file the image under (default ``trainer.global_step``).
        tag: Key under which the loggers show the image (default ``name``). Give a fixed tag and a varying
            ``name`` to get one PNG per epoch but a single TensorBoard image with a step slider.

    Returns:
        The path of the written PNG on global rank zero, ``None`` elsewhere and under ``fast_dev_run``.

    TensorBoard gets ``add_image``, Weights & Biases ``log_image``; other loggers are skipped. Under
    ``fast_dev_run``, Lightning's smoke test that logs and checkpoints nothing, the picture is drawn (so its code
    is checked) but neither saved nor logged: it would land in the working directory, which is no run's folder.
    """
    try:
        if not trainer.is_global_zero:
            return None
        pixels = to_rgb_array(image)
    finally:
        _close(image)
    if trainer.fast_dev_run:
        return None
    path = run_dir(trainer) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)

    step = trainer.global_step if step is None else step
    key = name if tag is None else tag
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, pixels, global_step=step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[pixels], step=step)
    return path
