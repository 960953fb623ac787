"""Callbacks of the template: learning-rate control, smoothed curves, activation maps, image logging.

Every callback is safe under DDP: files and images are written by global rank zero only.
"""

from callbacks.activations import ActivationMaps
from callbacks.ema import SmoothedCurves
from callbacks.images import run_dir, save_and_log_figure
from callbacks.lr import EpochLRSchedule, ReduceLROnPlateau

__all__ = [
    "ActivationMaps",
    "EpochLRSchedule",
    "ReduceLROnPlateau",
    "SmoothedCurves",
    "run_dir",
    "save_and_log_figure",
]
