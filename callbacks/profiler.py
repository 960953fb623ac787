"""A profiler that costs nothing when no profiling was asked for.

Lightning wraps every hook call (about 15 per training step plus 11 per callback) in
``with trainer.profiler.profile(name):``. Its default, ``PassThroughProfiler``, does no profiling, but its
``profile`` is a generator-based context manager that still runs about eight Python calls each time: with the
callbacks of a real experiment that is over 500 calls per step, a few percent of a small model's step on a CPU.
:class:`NullProfiler` hands out one shared, stateless context manager instead. ``scripts/train.py`` uses it when
``--trainer.profiler`` is not set; set that to ``simple``, ``advanced`` or ``pytorch`` to profile a run.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pytorch_lightning.profilers import PassThroughProfiler

__all__ = ["NullProfiler"]

_NOTHING = contextlib.nullcontext()  # reusable and reentrant: enters and exits without doing anything


class NullProfiler(PassThroughProfiler):
    """``PassThroughProfiler`` whose ``profile(name)`` is a shared no-op context manager."""

    def profile(self, action_name: str) -> Any:
        return _NOTHING
