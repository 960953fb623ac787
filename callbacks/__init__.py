"""Callbacks of the template: learning-rate control, smoothed curves, trend-based stopping, convnet visualisation
(activation maps, filter patterns, Grad-CAM), confusion matrices, generative-model pictures and scores, image
logging, ``last.ckpt`` and exact resumes, SLURM requeues, a guard against NaN losses, and the predictions table.
A run's directory, lock, checkpoint writes and CPU speed-ups are the CLI's (``lifecycle/``).

Every callback is safe under DDP: files and images are written by global rank zero only.
"""

from callbacks.activations import ActivationMaps
from callbacks.batch_scaling import GlobalBatchSize
from callbacks.checkpointing import LastCheckpoint, ResumeState
from callbacks.conditional_accuracy import ConditionalAccuracy
from callbacks.confusion import ConfusionMatrix
from callbacks.curves import SmoothedCurves
from callbacks.filters import FilterPatterns, filter_patterns
from callbacks.generative import GANSamples, LatentSpace, PredictionGrid, ReconstructionGrid
from callbacks.gradcam import GradCAM, grad_cam
from callbacks.guards import FiniteLossGuard
from callbacks.images import run_dir, save_and_log_figure
from callbacks.lr import EpochLRSchedule, ReduceLROnPlateauCallback
from callbacks.predictions import PredictionWriter
from callbacks.slurm import SafeRequeue
from callbacks.trend_stopping import TrendDivergenceStopping

__all__ = [
    "ActivationMaps",
    "ConditionalAccuracy",
    "ConfusionMatrix",
    "EpochLRSchedule",
    "FilterPatterns",
    "FiniteLossGuard",
    "GANSamples",
    "GlobalBatchSize",
    "GradCAM",
    "LastCheckpoint",
    "LatentSpace",
    "PredictionGrid",
    "PredictionWriter",
    "ReconstructionGrid",
    "ReduceLROnPlateauCallback",
    "ResumeState",
    "SafeRequeue",
    "SmoothedCurves",
    "TrendDivergenceStopping",
    "filter_patterns",
    "grad_cam",
    "run_dir",
    "save_and_log_figure",
]
