"""Callbacks of the template: learning-rate control, smoothed curves, trend-based stopping, convnet visualisation
(activation maps, filter patterns, Grad-CAM), confusion matrices, generative-model pictures and scores, image
logging, checkpoint safety and resumable runs, and a profiler that costs nothing when none is asked for.

Every callback is safe under DDP: files and images are written by global rank zero only.
"""

from callbacks.activations import ActivationMaps
from callbacks.batch_scaling import GlobalBatchSize
from callbacks.checkpointing import AtomicCheckpointIO, ResumeState
from callbacks.confusion import ConfusionMatrix
from callbacks.ema import SmoothedCurves
from callbacks.filters import FilterPatterns, filter_patterns
from callbacks.generative import ConditionalAccuracy, GANSamples, LatentSpace, PredictionGrid, ReconstructionGrid
from callbacks.gradcam import GradCAM, grad_cam
from callbacks.images import run_dir, save_and_log_figure
from callbacks.lr import EpochLRSchedule, ReduceLROnPlateau
from callbacks.profiler import NullProfiler
from callbacks.slurm import SafeRequeue
from callbacks.trend_stopping import TrendDivergenceStopping

__all__ = [
    "ActivationMaps",
    "AtomicCheckpointIO",
    "ConditionalAccuracy",
    "ConfusionMatrix",
    "EpochLRSchedule",
    "FilterPatterns",
    "GANSamples",
    "GlobalBatchSize",
    "GradCAM",
    "LatentSpace",
    "NullProfiler",
    "PredictionGrid",
    "ReconstructionGrid",
    "ReduceLROnPlateau",
    "ResumeState",
    "SafeRequeue",
    "SmoothedCurves",
    "TrendDivergenceStopping",
    "filter_patterns",
    "grad_cam",
    "run_dir",
    "save_and_log_figure",
]
