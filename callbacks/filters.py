"""The input patterns conv filters respond to most, found by gradient ascent in input space (notes:
*visualising what convnets learn*: convnet filters, Deep Learning with Python 5.4.2).

Starting from a gray image with a little noise, the input is moved step by step along the gradient of the
mean activation of one filter (the gradient divided by its RMS, so every step has the same size); the result,
standardised and squeezed into [0, 1] for display, shows the edges, colours and textures the filter detects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torchvision.utils import make_grid

from callbacks.activations import ActivationMaps
from callbacks.gradcam import activated, frozen_eval, resolve_module
from callbacks.images import save_and_log_figure

__all__ = ["FilterPatterns", "deprocess", "filter_patterns", "pattern_grid"]


class _Reached(Exception):
    """Raised by the forward hook once the layer has run: the rest of the network is not needed."""


def deprocess(x: Tensor) -> Tensor:
    """The book's ``deprocess_image`` per image: standardise, scale the std to 0.1, centre on 0.5, clip to [0, 1]."""
    flat = x.flatten(1)
    mean = flat.mean(dim=1).view(-1, *[1] * (x.ndim - 1))
    std = flat.std(dim=1).view(-1, *[1] * (x.ndim - 1))
    return ((x - mean) / (std + 1e-5) * 0.1 + 0.5).clamp(0, 1)


def filter_patterns(
    model: nn.Module,
    layer: str | nn.Module,
    channels: Sequence[int],
    input_shape: Sequence[int],
    steps: int = 40,
    lr: float = 0.05,
    seed: int = 0,
    gray: float = 0.5,
    noise: float = 0.1,
) -> Tensor:
    """Inputs that maximise the mean activation of each of ``channels`` of ``layer``, by gradient ascent.

    All channels are optimised together as one batch (one image per channel; rows are independent in eval
    mode). Each step adds ``lr * g / rms(g)`` to every image, ``g`` being the gradient of its channel's mean
    activation with respect to that image. The forward stops as soon as ``layer`` has run (the layers after it
    do not matter), in eval mode with every parameter frozen: parameters, their ``.grad`` and ``requires_grad``
    flags and every module's train/eval mode are as before afterwards, and the hook is always removed. Works
    under ``no_grad``/inference mode.

    Args:
        model: Takes ``(N, *input_shape)`` inputs.
        layer: Name in ``named_modules()`` (e.g. ``net.0.0``) or the module; its output must be ``(N, K, h, w)``.
        channels: Filter indices of ``layer`` (output channels), e.g. ``range(16)``.
        input_shape: ``(C, H, W)`` of one input.
        steps: Gradient-ascent steps (the book: 40).
        lr: Step size in input units; with RMS-normalised gradients, each step changes pixels by about ``lr``.
        seed: Seed of the starting noise (a local generator: the global random state is untouched).
        gray: Starting gray level, in the model's input units (0.5 suits inputs scaled to [0, 1]; use 0 for
            standardised inputs).
        noise: Width of the uniform noise added to the starting gray.

    Returns:
        ``(len(channels), C, H, W)`` patterns in [0, 1] after :func:`deprocess`, on the model's device.
    """
    channels = [int(c) for c in channels]
    if not channels:
        raise ValueError("channels is empty: give at least one filter index.")
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps={steps} must be >= 0 and lr={lr} > 0.")
    name, module = resolve_module(model, layer)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, list | tuple):
            output = next((o for o in output if isinstance(o, Tensor)), None)
        captured.append(output)
        raise _Reached

    def objective(x: Tensor) -> Tensor:
        """Per-image mean activation of its channel: ``(len(channels),)``."""
        captured.clear()
        with suppress(_Reached):
            model(x)
        if not captured:
            raise RuntimeError(f"layer {name!r} did not run in the forward pass of {type(model).__name__}.")
        out = captured[0]
        if not isinstance(out, Tensor) or out.ndim != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"layer {name!r} gives {shape}; filter patterns need (N, K, h, w) outputs.")
        if max(channels) >= out.shape[1] or min(channels) < -out.shape[1]:
            raise ValueError(f"channels {channels} out of range: layer {name!r} has {out.shape[1]} filters.")
        picked = out[list(range(len(channels))), channels]  # image i, its channel
        return picked.float().mean(dim=(1, 2))

    handle = module.register_forward_hook(hook)
    try:
        with torch.inference_mode(False), torch.enable_grad(), frozen_eval(model):
            # Made here, outside inference mode: ``x`` must be a normal tensor to require gradients.
            start = gray + noise * torch.rand(len(channels), *input_shape, generator=generator)
            x = start.to(device=device, dtype=dtype)
            for _ in range(steps):
                x.requires_grad_(True)
                (grad,) = torch.autograd.grad(objective(x).sum(), x)
                rms = grad.float().pow(2).flatten(1).mean(dim=1).sqrt().view(-1, 1, 1, 1)
                x = (x.detach() + lr * grad / (rms + 1e-5)).detach()
            if steps == 0:
                with torch.no_grad():
                    objective(x)  # still check the layer and the channels
            return deprocess(x.detach().float())  # a normal tensor, also when called under inference mode
    finally:
        handle.remove()


def pattern_grid(patterns: Tensor, min_size: int = 48, nrow: int | None = None) -> Tensor:
    """``(N, C, H, W)`` patterns in [0, 1] -> one ``(3, H', W')`` image grid (C in 1, 3), small patterns
    enlarged (nearest neighbour, integer factor) to at least ``min_size`` pixels; 0 disables."""
    patterns = patterns.detach().float().cpu()
    scale = math.ceil(min_size / min(patterns.shape[-2:])) if min_size else 1
    if scale > 1:
        patterns = F.interpolate(patterns, scale_factor=scale, mode="nearest")
    nrow = nrow or math.ceil(math.sqrt(len(patterns)))
    return make_grid(patterns, nrow=nrow, padding=2, pad_value=1.0)


class FilterPatterns(Callback):
    """Save grids of the input patterns that maximally activate the filters of chosen conv layers.

    At the end of training (and, with ``every_n_epochs``, after every n-th training epoch as well),
    :func:`filter_patterns` runs for the first ``num_filters`` filters of each layer on every process, and
    global rank zero saves each layer's grid (:func:`pattern_grid`) as
    ``<run dir>/<filename_prefix>/<layer>_epoch<NNN>.png`` (the last finished epoch, from 0) and sends it to the
    loggers that take images under the tag ``<filename_prefix>/<layer>``. Parameters, gradients, train/eval
    modes and ``requires_grad`` flags are left as they were.

    Args:
        layers: Module names from ``named_modules()`` whose output channels are maximised; default the feature
            maps of every ``nn.Conv2d``: the output of the activation (and batch norm) right after each one
            (see :func:`~callbacks.gradcam.activated`), as the book maximises Keras ``Conv2D(activation=...)``
            outputs.
        num_filters: Most filters drawn per layer (the first ones).
        every_n_epochs: Also draw after every n-th training epoch; ``None`` draws at the end of training only.
        steps: Gradient-ascent steps per pattern.
        lr: Step size in input units (see :func:`filter_patterns`).
        seed: Seed of the starting noise.
        gray: Starting gray level in input units (0.5 for inputs scaled to [0, 1], 0 for standardised ones).
        filename_prefix: Folder (under the run folder) and logger tag prefix.
        min_size: Patterns are enlarged to at least this many pixels per side in the grid; 0 disables.
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        num_filters: int = 16,
        every_n_epochs: int | None = None,
        steps: int = 40,
        lr: float = 0.05,
        seed: int = 0,
        gray: float = 0.5,
        filename_prefix: str = "filters",
        min_size: int = 48,
    ) -> None:
        super().__init__()
        if num_filters < 1:
            raise ValueError(f"num_filters={num_filters} must be at least 1.")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be at least 1 (or None).")
        self.layers = list(layers) if layers is not None else None
        self.num_filters = num_filters
        self.every_n_epochs = every_n_epochs
        self.steps = steps
        self.lr = lr
        self.seed = seed
        self.gray = gray
        self.filename_prefix = filename_prefix
        self.min_size = min_size
        self._names: list[str] = []
        self._last_drawn: int | None = None
        self._last_finished: int | None = None
        self._warned: set[str] = set()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layers is not None:
            self._names = [resolve_module(pl_module, name)[0] for name in self.layers]
        else:
            convs = [name for name, module in pl_module.named_modules() if isinstance(module, nn.Conv2d)]
            self._names = [activated(pl_module, name) for name in convs]
            if not self._names:
                rank_zero_warn(
                    f"FilterPatterns: {type(pl_module).__name__} has no nn.Conv2d layer and no `layers` were "
                    "given; no filter patterns will be drawn."
                )
        self._last_drawn = self._last_finished = None

    def _input_shape(self, pl_module: pl.LightningModule) -> tuple[int, ...]:
        shape = getattr(pl_module, "input_shape", None)
        if shape is None and getattr(pl_module, "example_input_array", None) is not None:
            shape = tuple(pl_module.example_input_array.shape[1:])
        if shape is None:
            raise ValueError(
                f"FilterPatterns: {type(pl_module).__name__} has neither `input_shape` nor `example_input_array`; "
                "set one of them so the pattern size is known."
            )
        return tuple(shape)

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """Compute the patterns of every layer (all processes) and save their grids (global rank zero)."""
        shape = self._input_shape(pl_module)
        probe = torch.zeros(1, *shape, device=pl_module.device)
        outputs = ActivationMaps().feature_maps(pl_module, probe, self._names)  # one probe forward: layer widths
        for name in self._names:
            output = outputs.get(name)
            if output is None or output.ndim != 4:
                if name not in self._warned:
                    self._warned.add(name)
                    got = None if output is None else tuple(output.shape)
                    rank_zero_warn(f"FilterPatterns: layer {name!r} gave no (N, C, H, W) tensor ({got}); skipped.")
                continue
            patterns = filter_patterns(
                pl_module,
                name,
                range(min(self.num_filters, output.shape[1])),
                shape,
                steps=self.steps,
                lr=self.lr,
                seed=self.seed,
                gray=self.gray,
            )
            if trainer.is_global_zero:
                label = name or "model"
                save_and_log_figure(
                    trainer,
                    pattern_grid(patterns, self.min_size),
                    f"{self.filename_prefix}/{label}_epoch{epoch:03d}",
                    tag=f"{self.filename_prefix}/{label}",
                )
        self._last_drawn = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_finished = trainer.current_epoch
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.draw(trainer, pl_module, trainer.current_epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = self._last_finished if self._last_finished is not None else trainer.current_epoch
        if self._names and self._last_drawn != epoch:
            self.draw(trainer, pl_module, epoch)
