"""Autoencoders (notes: *Autoencoder*): encoder -> latent vector -> decoder, trained to rebuild their target.

One module covers the notes' four uses, chosen by ``task`` and the classifier head:

- ``reconstruct``: input = target = the image (the 2-D latent plot of the notes with ``latent_dim: 2``);
- ``denoise``: input ``clip(x + N(noise_mean, noise_std), 0, 1)``, drawn afresh for every batch, target the
  clean ``x`` (the noise touches the input only);
- ``colorize``: input the gray image ``0.299 R + 0.587 G + 0.114 B``, target the RGB image (CIFAR-10);
- any of them plus ``classifier_hidden``: a classifier head on the latent vector, trained jointly with the
  decoder on ``CE + MSE`` (the notes' classifier autoencoder), logging accuracy.

Book recipes (``docs/reference_models.md``): MNIST AE Conv 32 k3 s2 ReLU -> Conv 64 k3 s2 ReLU -> Flatten -> Dense 16;
decoder Dense 3136 -> 7x7x64 -> ConvT 64 k3 s2 ReLU -> ConvT 32 k3 s2 ReLU -> ConvT 1 k3 sigmoid; MSE, Adam,
batch 32. CIFAR-10 colorization: Conv 64/128/256 k3 s2 -> Dense 256, mirrored decoder, ConvT 3 sigmoid.
The decoder ends in a sigmoid, so the data must be scaled to [0, 1] (``normalize: scale``); ``setup`` checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.base import check_input_shape
from lightning_modules.layers import (
    BatchNormName,
    Conv2dSame,
    InitName,
    batch_norm2d,
    batch_norm_of_old_checkpoint,
    keras_init_,
)
from lightning_modules.optim import SchedulerInterval, SharedFactory, optimizers_from_factories

AETask = Literal["reconstruct", "denoise", "colorize"]
BlockStyle = Literal["strided", "bn_pool"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of R, G, B: the book's ``rgb2gray``."""


def rgb_to_gray(images: Tensor) -> Tensor:
    """``(N, 3, H, W)`` RGB in [0, 1] -> ``(N, 1, H, W)`` gray, ``0.299 R + 0.587 G + 0.114 B``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rgb_to_gray needs (N, 3, H, W) RGB images, got shape {tuple(images.shape)}")
    weights = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


class ConvTranspose2dSame(nn.ConvTranspose2d):
    """Keras ``Conv2DTranspose(padding='same')``: output size ``input * stride``, cropped as TensorFlow crops.

    TensorFlow computes the full transposed convolution (size ``(n - 1) * s + k``) and drops
    ``(k - s) // 2`` pixels at the top/left and the rest at the bottom/right. PyTorch's ``padding`` /
    ``output_padding`` crop symmetrically and pad the far end, which samples a grid shifted by one pixel for
    e.g. k3 s2; cropping the full output reproduces Keras exactly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        if kernel_size < stride:
            raise ValueError(f"ConvTranspose2dSame needs kernel_size >= stride, got {kernel_size} < {stride}")
        super().__init__(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        h, w = x.shape[-2] * self.stride[0], x.shape[-1] * self.stride[1]
        top = (self.kernel_size[0] - self.stride[0]) // 2
        left = (self.kernel_size[1] - self.stride[1]) // 2
        return y[..., top : top + h, left : left + w]


class Encoder(nn.Sequential):
    """Conv blocks -> Flatten -> Dense ``latent_dim`` (linear: the latent vector).

    ``strided``: ``Conv k 'same' stride 2 -> ReLU`` per filter count (the book's AE and colorization nets).
    ``bn_pool``: ``BN -> ReLU -> Conv k 'same' -> MaxPool 2`` (the classifier AE's pre-activation blocks).
    Either halves the spatial size per block.
    """

    def __init__(
        self,
        in_channels: int,
        filters: Sequence[int],
        kernel_size: int,
        latent_dim: int,
        image_size: tuple[int, int],
        style: BlockStyle = "strided",
        batch_norm: BatchNormName = "torch",
    ) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for f in filters:
            if style == "strided":
                layers += [Conv2dSame(channels, f, kernel_size, stride=2), nn.ReLU()]
            else:
                bn = batch_norm2d(channels, batch_norm)
                layers += [bn, nn.ReLU(), Conv2dSame(channels, f, kernel_size), nn.MaxPool2d(2)]
            channels = f
        scale = 2 ** len(filters)
        self.feature_shape = (channels, image_size[0] // scale, image_size[1] // scale)
        super().__init__(*layers, nn.Flatten(), nn.Linear(math.prod(self.feature_shape), latent_dim))


class Decoder(nn.Sequential):
    """Dense -> reshape to the encoder's last feature map -> ConvTranspose blocks (stride 2, filters reversed)
    -> ConvTranspose ``out_channels`` k 'same' -> sigmoid. ``bn_pool`` uses ``BN -> ReLU -> ConvT`` blocks."""

    def __init__(
        self,
        latent_dim: int,
        filters: Sequence[int],
        kernel_size: int,
        out_channels: int,
        feature_shape: tuple[int, int, int],
        style: BlockStyle = "strided",
        batch_norm: BatchNormName = "torch",
    ) -> None:
        layers: list[nn.Module] = [nn.Linear(latent_dim, math.prod(feature_shape)), nn.Unflatten(1, feature_shape)]
        channels = feature_shape[0]
        for f in reversed(filters):
            if style == "strided":
                layers += [ConvTranspose2dSame(channels, f, kernel_size, stride=2), nn.ReLU()]
            else:
                bn = batch_norm2d(channels, batch_norm)
                layers += [bn, nn.ReLU(), ConvTranspose2dSame(channels, f, kernel_size, 2)]
            channels = f
        layers += [ConvTranspose2dSame(channels, out_channels, kernel_size), nn.Sigmoid()]
        super().__init__(*layers)


def classifier_head(latent_dim: int, hidden: Sequence[int], dropout: float, num_classes: int) -> nn.Sequential:
    """``[Dense h -> ReLU -> Dropout]`` per hidden width, then Dense ``num_classes`` (logits)."""
    layers: list[nn.Module] = []
    width = latent_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class AutoEncoder(pl.LightningModule):
    """Convolutional autoencoder with reconstruction, denoising and colorization tasks and an optional classifier.

    Args:
        task: ``reconstruct``, ``denoise`` or ``colorize`` (see the module docstring).
        input_shape: ``(C, H, W)`` of the dataset's images (the target); the encoder sees 1 channel for
            ``colorize``. H and W must be divisible by ``2 ** len(filters)``.
        num_classes: Classes of the dataset: the classifier head's outputs and the colours of the latent plot.
        latent_dim: Size of the latent vector (2 for the notes' latent-plane plot).
        filters: Output channels of the encoder blocks; the decoder mirrors them.
        kernel_size: Kernel of every conv and transposed conv.
        block: ``strided`` (book AE, colorization) or ``bn_pool`` (classifier AE); see :class:`Encoder`.
        noise_mean: Mean of the Gaussian noise added to the input by ``denoise`` (book: 0.5).
        noise_std: Its standard deviation (book: 0.5). The noisy input is clipped to [0, 1].
        classifier_hidden: Hidden widths of a classifier head on the latent vector; empty for none
            (classifier AE: ``[512, 256]``).
        classifier_dropout: Dropout after each hidden layer of the head (book: 0.4).
        reconstruction_weight: Weight of the MSE in the loss.
        classification_weight: Weight of the cross-entropy in the loss (Keras sums both outputs' losses: 1, 1).
        optimizer: Optimiser factory (book: Adam, Keras defaults lr 1e-3, eps 1e-7).
        lr_scheduler: Optional scheduler factory; ``ReduceLROnPlateau`` monitors ``val/loss``.
        scheduler_interval: When the scheduler steps: ``step``, ``epoch`` or ``auto`` (OneCycleLR, CyclicLR and
            LinearLR warm-ups per step, the others per epoch).
        init: ``torch`` (PyTorch's initialisation) or ``keras`` (glorot_uniform kernels, zero biases).
        batch_norm: BatchNorm of the ``bn_pool`` blocks: ``torch`` (momentum 0.1, eps 1e-5) or ``keras`` (the
            book's: momentum 0.99 in Keras' terms, eps 1e-3); see :func:`~lightning_modules.layers.batch_norm2d`.

    Logged: ``{stage}/loss`` (the optimised sum), ``{stage}/mse`` (reconstruction), and with a classifier
    ``{stage}/ce`` and ``{stage}/acc``; epoch aggregates synced across processes.
    """

    def __init__(
        self,
        task: AETask = "reconstruct",
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        latent_dim: int = 16,
        filters: Sequence[int] = (32, 64),
        kernel_size: int = 3,
        block: BlockStyle = "strided",
        noise_mean: float = 0.5,
        noise_std: float = 0.5,
        classifier_hidden: Sequence[int] = (),
        classifier_dropout: float = 0.4,
        reconstruction_weight: float = 1.0,
        classification_weight: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: SchedulerInterval = "auto",
        init: InitName = "torch",
        batch_norm: BatchNormName = "torch",
    ) -> None:
        super().__init__()
        if task not in ("reconstruct", "denoise", "colorize"):
            raise ValueError(f"task={task!r}: choose 'reconstruct', 'denoise' or 'colorize'.")
        if block not in ("strided", "bn_pool"):
            raise ValueError(f"block={block!r}: choose 'strided' (book AE) or 'bn_pool' (classifier AE).")
        input_shape = tuple(input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"input_shape={list(input_shape)}: give (channels, height, width), e.g. [1, 28, 28].")
        if task == "colorize" and input_shape[0] != 3:
            raise ValueError(
                f"task='colorize' turns RGB images into gray inputs, but input_shape={list(input_shape)} has "
                f"{input_shape[0]} channel(s). Use an RGB dataset (CIFAR-10, input_shape [3, 32, 32])."
            )
        scale = 2 ** len(filters)
        if not filters or input_shape[1] % scale or input_shape[2] % scale:
            raise ValueError(
                f"input_shape={list(input_shape)} with {len(filters)} down-sampling block(s) (filters="
                f"{list(filters)}): height and width must be divisible by {scale} so that the decoder rebuilds the "
                "input size. Use fewer filters entries or another input size."
            )
        if latent_dim < 1 or noise_std < 0:
            raise ValueError(f"latent_dim={latent_dim} must be >= 1 and noise_std={noise_std} >= 0.")
        self.save_hyperparameters()
        self.task = task
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.optimizer_factory = SharedFactory.wrap(optimizer)
        self.scheduler_factory = SharedFactory.wrap(lr_scheduler)
        in_channels = 1 if task == "colorize" else input_shape[0]
        self.encoder = Encoder(in_channels, filters, kernel_size, latent_dim, input_shape[1:], block, batch_norm)
        self.decoder = Decoder(
            latent_dim, filters, kernel_size, input_shape[0], self.encoder.feature_shape, block, batch_norm
        )
        self.classifier = (
            classifier_head(latent_dim, classifier_hidden, classifier_dropout, num_classes)
            if classifier_hidden
            else None
        )
        if self.classifier is not None:
            self.accuracy = nn.ModuleDict(
                {f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro") for stage in ("train", "val", "test")}
            )
        if init == "keras":
            keras_init_(self)
        self.example_input_array = torch.zeros(2, in_channels, *input_shape[1:])

    # ---- the three tasks -----------------------------------------------------------------------------
    @property
    def panel_names(self) -> tuple[str, str, str]:
        """Names of (input, output, target) in pictures: e.g. noisy / denoised / clean."""
        return {
            "reconstruct": ("input", "reconstruction", "target"),
            "denoise": ("noisy", "denoised", "clean"),
            "colorize": ("gray", "predicted", "true"),
        }[self.task]

    def model_input(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(input, target)`` for a batch of images in [0, 1]: the task decides what the encoder sees.

        ``generator`` (a CPU ``torch.Generator``) fixes the denoising noise, e.g. for comparable pictures;
        without one the noise comes from the global RNG on the images' device.
        """
        if self.task == "colorize":
            return rgb_to_gray(images), images
        if self.task == "denoise":
            if generator is None:
                noise = torch.randn_like(images)
            else:
                noise = torch.randn(images.shape, generator=generator).to(images)
            noisy = images + self.hparams.noise_mean + self.hparams.noise_std * noise
            return noisy.clamp(0.0, 1.0), images
        return images, images

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        """Encoder input (e.g. a noisy or gray image) -> decoded image in [0, 1]."""
        return self.decoder(self.encoder(x))

    # ---- steps ---------------------------------------------------------------------------------------
    @staticmethod
    def _labels(targets: Tensor) -> Tensor:
        return targets.argmax(dim=-1) if targets.is_floating_point() else targets

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, targets = batch
        x, target = self.model_input(images)
        z = self.encoder(x)
        mse = F.mse_loss(self.decoder(z), target)
        loss = self.hparams.reconstruction_weight * mse
        n = len(images)
        log = dict(on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log(f"{stage}/mse", mse, **log)
        if self.classifier is not None:
            logits = self.classifier(z)
            labels = self._labels(targets)
            ce = F.cross_entropy(logits, labels)
            loss = loss + self.hparams.classification_weight * ce
            self.log(f"{stage}/ce", ce, **log)
            accuracy = self.accuracy[f"{stage}_acc"]
            accuracy.update(logits.detach(), labels)
            self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=n)
        self.log(f"{stage}/loss", loss, prog_bar=True, **log)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """The decoded images for the task's inputs (reconstructed, denoised or colorized)."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self(self.model_input(images)[0])

    def configure_optimizers(self):
        return optimizers_from_factories(
            self.optimizer_factory,
            self.scheduler_factory,
            self.parameters(),
            self.hparams.get("scheduler_interval", "auto"),
        )

    # ---- input checks and checkpoints ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        check_image_datamodule(self, self.input_shape, self.num_classes if self.classifier is not None else None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        batch_norm_of_old_checkpoint(self, checkpoint)


def check_image_datamodule(module: pl.LightningModule, input_shape: tuple, num_classes: int | None) -> None:
    """The generative models end in a sigmoid: the datamodule must give ``input_shape`` images scaled to [0, 1]
    (``normalize: scale``) and, where labels matter, ``num_classes`` classes. Raises one clear ``ValueError``.
    Call it from ``setup``, where the trainer is attached."""
    datamodule = module.trainer.datamodule
    if datamodule is None:
        return
    name, model = type(datamodule).__name__, type(module).__name__
    check_input_shape(datamodule, input_shape)
    normalize = getattr(datamodule, "hparams", {}).get("normalize")
    if normalize not in (None, "scale"):
        raise ValueError(
            f"{model} outputs images in [0, 1] through a sigmoid, but {name} is set to normalize={normalize!r}, "
            "which gives values outside [0, 1] that the model can never match. Set "
            "--data.init_args.normalize scale (pixels / 255)."
        )
    data_classes = getattr(datamodule, "num_classes", None)
    if num_classes is not None and data_classes is not None and data_classes != num_classes:
        raise ValueError(
            f"{name} has {data_classes} classes but {model} was built with num_classes={num_classes}. Set "
            f"--model.init_args.num_classes {data_classes}."
        )
