"""How well a conditional GAN obeys its condition, judged by a classifier trained with this template (notes: *GAN*).

- :class:`ConditionalAccuracy`: the share of conditional-GAN samples that a separately trained classifier assigns to
  the class they were generated for, logged during training: an offline measure of sample quality.
- :func:`load_classifier`: the judge and the pixel statistics its datamodule normalised with, from its checkpoint.

The pictures of the generative models (sample grids, reconstructions, latent plots) are in
:mod:`callbacks.generative`.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lightning_modules.checkpoints import read_checkpoint

__all__ = ["ConditionalAccuracy", "load_classifier"]


def load_classifier(path: str, fallback_class: str) -> tuple[pl.LightningModule, tuple[float, float]]:
    """A classifier checkpoint of this template (eval mode, CPU) and the ``(mean, std)`` (pixel units) its
    datamodule normalised with, read from the checkpoint (``(0, 255)`` = pixels / 255 when absent).

    The class is the one ``scripts/train.py`` records (``hyper_parameters['_class_path']``), else
    ``fallback_class``. The file is read without running pickled code (:func:`read_checkpoint`).
    """
    checkpoint = read_checkpoint(path)
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path") or fallback_class
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        model = cls.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:
        raise ValueError(
            f"ConditionalAccuracy: the classifier checkpoint {path} cannot be loaded as {class_path} "
            f"({type(err).__name__}: {err}). Pass a checkpoint of a classifier trained with this template, e.g. "
            "`python scripts/train.py fit -c configs/mnist/cnn.yaml` -> runs/mnist_cnn/version_N/checkpoints/"
            "<best>.ckpt, and set classifier_class if it was not written by scripts/train.py."
        ) from None
    mean, std = 0.0, 255.0
    for key, state in checkpoint.items():  # Lightning saves a datamodule's state_dict under its class name
        stats = state if key[:1].isupper() and isinstance(state, dict) else {}
        if isinstance(stats.get("mean"), Tensor) and stats["mean"].numel() == 1 and stats["std"].numel() == 1:
            mean, std = float(stats["mean"]), float(stats["std"])
    return model.eval(), (mean, std)


class ConditionalAccuracy(Callback):
    """Conditional accuracy of a conditional GAN: the share of samples that a separately trained classifier
    (the "judge") assigns to the class they were generated for. An offline, cheap stand-in for sample quality
    and for whether the condition is obeyed: random images score about 1 / num_classes, a collapsed or
    label-ignoring generator stays near it, and well-trained CGAN samples approach the judge's own accuracy.

    The judge is a classifier checkpoint produced by this template, e.g. the book CNN
    (``python scripts/train.py fit -c configs/mnist/cnn.yaml``), loaded by path at the start of fit; samples
    (in [0, 1]) are normalised as the judge's datamodule normalised its training data (statistics read from the
    checkpoint). After every ``every_n_epochs`` training epochs, ``num_samples`` fixed-noise samples with
    labels cycling through the classes are judged and the accuracy is logged as ``log_key`` (synced: under DDP
    each process judges its share of the samples). ``classifier_ckpt: null`` disables the callback with a
    warning, so configs can carry it ready to be pointed at a checkpoint.

    Args:
        classifier_ckpt: Path of the judge's ``.ckpt`` file, or ``None``.
        every_n_epochs: Score after every n-th training epoch.
        num_samples: Samples judged per score (all processes together).
        seed: Seed of the fixed noise.
        log_key: Metric name.
        classifier_class: Import path of the judge's class when the checkpoint does not record one.
    """

    def __init__(
        self,
        classifier_ckpt: str | None = None,
        every_n_epochs: int = 1,
        num_samples: int = 1000,
        seed: int = 0,
        log_key: str = "gen/cond_acc",
        classifier_class: str = "lightning_modules.cnn.CNNClassifier",
    ) -> None:
        super().__init__()
        if every_n_epochs < 1 or num_samples < 1:
            raise ValueError("every_n_epochs and num_samples must be at least 1.")
        self.classifier_ckpt = classifier_ckpt
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.seed = seed
        self.log_key = log_key
        self.classifier_class = classifier_class
        self.judge: pl.LightningModule | None = None
        self.stats = (0.0, 255.0)
        self.history: list[tuple[int, float]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.judge is not None:
            return
        if self.classifier_ckpt is None:
            rank_zero_warn(
                "ConditionalAccuracy: no classifier_ckpt given, so no conditional accuracy is computed. Train a "
                "judge with `python scripts/train.py fit -c configs/mnist/cnn.yaml` and pass its checkpoint, e.g. "
                "--trainer.callbacks.init_args.classifier_ckpt runs/mnist_cnn/version_0/checkpoints/last.ckpt "
                "(the ConditionalAccuracy callback must be the last one in the list for that flag)."
            )
            return
        if not getattr(pl_module, "conditional", False):
            raise ValueError(
                f"ConditionalAccuracy judges a conditional GAN, but {type(pl_module).__name__} is not conditional. "
                "Use it with the CGAN config (model.init_args.conditional: true) or remove the callback."
            )
        self.judge, self.stats = load_classifier(self.classifier_ckpt, self.classifier_class)
        self.judge.requires_grad_(False)

    @torch.no_grad()
    def score(self, images: Tensor, labels: Tensor) -> Tensor:
        """Share of ``images`` (in [0, 1]) that the judge classifies as ``labels``."""
        judge = self.judge.to(images.device)
        mean, std = self.stats
        logits = judge(((images * 255.0) - mean) / std)
        return (logits.argmax(dim=-1) == labels).float().mean()

    def fixed_inputs(self, pl_module: pl.LightningModule, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
        """This process's share ``rank::world_size`` of the fixed ``(z, labels)`` (padded to equal shares)."""
        total = math.ceil(self.num_samples / world_size) * world_size
        z = pl_module.sample_noise(total, torch.Generator().manual_seed(self.seed))
        labels = torch.arange(total, device=pl_module.device) % pl_module.num_classes
        return z[rank::world_size], labels[rank::world_size]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.judge is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        z, labels = self.fixed_inputs(pl_module, trainer.global_rank, trainer.world_size)
        images = torch.cat([pl_module.generate(zs, ys) for zs, ys in zip(z.split(500), labels.split(500), strict=True)])
        accuracy = self.score(images, labels)
        self.history.append((trainer.current_epoch, float(accuracy)))
        pl_module.log(self.log_key, accuracy, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
