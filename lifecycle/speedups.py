"""Optional speed-ups that the CLI (``scripts/train.py``) applies to every run; the modules stay plain PyTorch.

A researcher's ``LightningModule`` uses ``nn.Dropout`` and inherits nothing from this file. The CLI adds
:class:`CPUSpeedups` to the trainer's callbacks and passes :class:`NullProfiler` when no profiler was asked for.
Each trick below was measured on the MNIST MLP (``docs/speed.md``, ``scripts/benchmark.py``) and is undone when
the run ends, so the module object a script holds after ``fit`` is exactly the one it built.

- :class:`NullProfiler`: Lightning wraps every hook call (about 15 per training step plus 11 per callback) in
  ``with trainer.profiler.profile(name):``. Its default, ``PassThroughProfiler``, profiles nothing, but its
  ``profile`` is a generator-based context manager that still runs about eight Python calls each time.
- :class:`ThresholdDropout` (:func:`use_threshold_dropout`): on the CPU, a dropout mask drawn as
  ``rand >= p`` is 2.5-3.5x faster than ``bernoulli_`` (what ``nn.Dropout`` draws with): 0.19 ms against
  0.47 ms forward + backward for a 128 x 256 activation, where the MNIST MLP's two dropouts were a fifth of its
  epoch. Same distribution and scaling; a different random stream than ``nn.Dropout``, so a run with and a run
  without it differ in their masks (not in what they learn on average). GPUs keep PyTorch's fused kernel.
- The CUDA check (:func:`use_runtime_cuda_check_without_gpu`): importing Lightning sets
  ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that asking whether CUDA is available does not initialise CUDA (which
  would break CUDA in processes forked later). Until CUDA is initialised, which a CPU run never does, every call
  then loads the NVML library anew, and torch's optimisers (Adam, AdamW, RMSprop, ...) ask on every ``step()``:
  about 0.3 ms a step on a CUDA build of torch, 7 % of the MNIST MLP's epoch on a 2-core CPU. Where NVML sees no
  GPU there is no CUDA to protect, and torch's default check answers once and caches the answer.

Left out on purpose, by measurement: Lightning assigns the current hook's name to the module about 45 times per
training step of the MNIST MLP (``module._current_fx_name``, through ``nn.Module.__setattr__``: 0.95 us against
0.2 us for a direct write). Skipping that check saves about 33 us of a 3 ms step, 1 %, less than the benchmark
resolves, at the price of swapping the class of the researcher's module and depending on a private attribute.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.profilers import PassThroughProfiler
from torch import Tensor, nn

__all__ = [
    "NVML_CUDA_CHECK",
    "CPUSpeedups",
    "NullProfiler",
    "ThresholdDropout",
    "threshold_dropout_mask",
    "use_runtime_cuda_check_without_gpu",
    "use_threshold_dropout",
]

# ---- profiler ----------------------------------------------------------------------------------------------------

_NOTHING = contextlib.nullcontext()  # reusable and reentrant: enters and exits without doing anything


class NullProfiler(PassThroughProfiler):
    """``PassThroughProfiler`` whose ``profile(name)`` is one shared no-op context manager. ``scripts/train.py``
    passes it when ``--trainer.profiler`` is not set; set that to ``simple``, ``advanced`` or ``pytorch`` to
    profile a run."""

    def profile(self, action_name: str) -> Any:
        return _NOTHING


# ---- CUDA availability check -------------------------------------------------------------------------------------

NVML_CUDA_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def use_runtime_cuda_check_without_gpu() -> bool:
    """On a machine without a visible GPU, switch ``torch.cuda.is_available()`` back from Lightning's NVML-based
    check to torch's default one (see the module docstring); returns whether it switched. Machines with a GPU keep
    Lightning's setting."""
    if os.environ.get(NVML_CUDA_CHECK) != "1" or torch.cuda.device_count() > 0:
        return False
    os.environ[NVML_CUDA_CHECK] = "0"
    return True


# ---- dropout -----------------------------------------------------------------------------------------------------


def threshold_dropout_mask(like: Tensor, shape: tuple[int, ...], p: float) -> Tensor:
    """A dropout mask of ``shape`` with ``like``'s device and dtype: 0 with probability ``p``, else ``1 / (1 - p)``,
    drawn by thresholding uniform numbers (``rand >= p``)."""
    keep = torch.rand(shape, dtype=like.dtype, device=like.device).ge_(p)
    return keep.mul_(1.0 / (1.0 - p))


class ThresholdDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is :func:`threshold_dropout_mask`; on other devices, in place or at p 0 or 1 it
    runs ``nn.Dropout`` unchanged. Same arguments, no state, ``isinstance(m, nn.Dropout)`` holds."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or not self.training or self.inplace or self.p in (0.0, 1.0):
            return super().forward(x)
        return x * threshold_dropout_mask(x, x.shape, self.p)


def use_threshold_dropout(module: nn.Module) -> Callable[[], None]:
    """Make every plain ``nn.Dropout`` inside ``module`` a :class:`ThresholdDropout` (the same object, so hooks and
    references stay valid; subclasses of ``nn.Dropout`` are left alone). Returns the function that undoes it."""
    swapped = [m for m in module.modules() if type(m) is nn.Dropout]
    for m in swapped:
        m.__class__ = ThresholdDropout

    def undo() -> None:
        for m in swapped:
            if type(m) is ThresholdDropout:
                m.__class__ = nn.Dropout

    return undo


# ---- the callback ------------------------------------------------------------------------------------------------


class CPUSpeedups(pl.Callback):
    """Applies the speed-ups of this file for the duration of a ``fit``/``validate``/``test``/``predict`` and undoes
    them when it ends (also after an error).

    Args:
        threshold_dropout: :func:`use_threshold_dropout` on the LightningModule when the run is on the CPU.
        cuda_check: :func:`use_runtime_cuda_check_without_gpu` while fitting, where no GPU is visible.
    """

    def __init__(self, threshold_dropout: bool = True, cuda_check: bool = True) -> None:
        self.threshold_dropout = threshold_dropout
        self.cuda_check = cuda_check
        self._undo: list[Callable[[], None]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.threshold_dropout and trainer.strategy.root_device.type == "cpu":
            self._undo.append(use_threshold_dropout(pl_module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cuda_check and use_runtime_cuda_check_without_gpu():
            self._undo.append(lambda: os.environ.__setitem__(NVML_CUDA_CHECK, "1"))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._undo_all()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._undo_all()  # Lightning calls this, not teardown, when the run fails

    def _undo_all(self) -> None:
        while self._undo:
            self._undo.pop()()
