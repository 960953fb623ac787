"""Moved to :mod:`callbacks.speedups`; this name stays until ``scripts/train.py`` imports it from there."""

from callbacks.speedups import NullProfiler

__all__ = ["NullProfiler"]
