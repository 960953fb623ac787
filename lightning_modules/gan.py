"""Generative adversarial networks (notes: *GAN*): DCGAN and the conditional GAN, with manual optimisation.

Per training step, as the book's ``train()``: the discriminator is updated once on a batch of real images
(label 1) concatenated with as many generated ones (label 0); then the generator is updated once on fresh
noise labelled 1 ("real") with the discriminator frozen, so that it learns to fool it. Two optimisers with
their own learning rates and optionally Keras-style ``decay`` (``lr / (1 + decay * updates)``) are stepped by
hand. The defaults are PyTorch's (RMSprop's alpha and eps, no decay, BatchNorm, initialisation, fakes for D made
in train mode); ``configs/mnist/dcgan.yaml`` states the book's Keras choices.

Book recipe (``docs/reference_models.md``, MNIST): z ~ U(-1, 1) of size 100. Generator Dense 7*7*128 -> 4 x [BN ->
ReLU -> ConvT k5 'same'] with 128 s2, 64 s2, 32, 1 filters -> sigmoid. Discriminator 4 x [LeakyReLU 0.2 ->
Conv k5 'same'] with 32 s2, 64 s2, 128 s2, 256 -> Flatten -> Dense 1 (sigmoid in the BCE), no BN. D RMSprop
2e-4 (decay 6e-8), G RMSprop 1e-4 (decay 3e-8), BCE, batch 64, 40,000 steps. The conditional GAN feeds a
one-hot label to both: concatenated to z in G, projected by Dense H*W to a second image channel in D.

Under the notes' convergence signature the discriminator loss settles near 0.5 and the generator loss near 1.
Note that ``trainer.global_step`` counts optimiser steps, i.e. two per training step here: ``max_steps: 80000``
is the book's 40,000 iterations. Under DDP each update leaves one player's parameters unused, which DDP accepts only
with ``find_unused_parameters=True``: run it with ``--trainer.strategy ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from lightning_modules.autoencoder import ConvTranspose2dSame, check_image_datamodule
from lightning_modules.layers import (
    BatchNormName,
    Conv2dSame,
    InitName,
    batch_norm2d,
    batch_norm_of_old_checkpoint,
    keras_init_,
)
from lightning_modules.optim import SharedFactory


class Generator(nn.Module):
    """``z`` (+ one-hot label) -> Dense -> reshape -> [BN -> ReLU -> ConvT k 'same'] per filter -> sigmoid.

    The Dense layer maps to ``filters[0]`` maps of size ``image / prod(strides)``; each block multiplies the
    size by its stride; the last filter count is the number of image channels.
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        filters: Sequence[int] = (128, 64, 32, 1),
        strides: Sequence[int] = (2, 2, 1, 1),
        kernel_size: int = 5,
        num_classes: int = 0,
        batch_norm: BatchNormName = "torch",
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        up = math.prod(strides)
        if len(filters) != len(strides) or filters[-1] != c or h % up or w % up:
            raise ValueError(
                f"Generator: filters={list(filters)} and strides={list(strides)} must have the same length, end in "
                f"the image's {c} channel(s), and the strides' product ({up}) must divide the image size {h}x{w}."
            )
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.start_shape = (filters[0], h // up, w // up)
        layers: list[nn.Module] = [nn.Linear(latent_dim + num_classes, math.prod(self.start_shape))]
        layers.append(nn.Unflatten(1, self.start_shape))
        channels = filters[0]
        for f, s in zip(filters, strides, strict=True):
            layers += [batch_norm2d(channels, batch_norm), nn.ReLU(), ConvTranspose2dSame(channels, f, kernel_size, s)]
            channels = f
        layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.num_classes:
            z = torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], dim=1)
        return self.net(z)


class Discriminator(nn.Module):
    """Image (+ label as a Dense-projected second channel) -> [LeakyReLU -> Conv k 'same'] per filter ->
    Flatten -> Dense 1: the logit of "real". No BN (the book's choice for D)."""

    def __init__(
        self,
        image_shape: Sequence[int],
        filters: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 1),
        kernel_size: int = 5,
        negative_slope: float = 0.2,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if len(filters) != len(strides):
            raise ValueError(f"Discriminator: filters={list(filters)} and strides={list(strides)} differ in length.")
        c, h, w = image_shape
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        self.label_map = nn.Linear(num_classes, h * w) if num_classes else None
        layers: list[nn.Module] = []
        channels = c + (1 if num_classes else 0)
        for f, s in zip(filters, strides, strict=True):
            layers += [nn.LeakyReLU(negative_slope), Conv2dSame(channels, f, kernel_size, s)]
            channels = f
            h, w = math.ceil(h / s), math.ceil(w / s)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * h * w, 1)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.label_map is not None:
            one_hot = F.one_hot(labels, self.num_classes).to(images.dtype)
            label_plane = self.label_map(one_hot).view(-1, 1, *self.image_shape[1:])
            images = torch.cat([images, label_plane], dim=1)
        return self.head(self.features(images)).squeeze(1)


def rmsprop(lr: float):
    """``torch.optim.RMSprop`` with learning rate ``lr`` and PyTorch's other defaults (the book's Keras RMSprop has
    ``alpha=0.9, eps=1e-7``: the configs say so)."""
    return lambda params: torch.optim.RMSprop(params, lr=lr)


def keras_decay(decay: float):
    """Keras' ``decay`` argument as a ``LambdaLR`` factor: ``1 / (1 + decay * updates)``."""
    return lambda updates: 1.0 / (1.0 + decay * updates)


class GAN(pl.LightningModule):
    """DCGAN, or the conditional GAN with ``conditional: true``, trained with Lightning manual optimisation.

    Args:
        conditional: Feed a one-hot class label to G and D (CGAN); G then draws the requested class.
        num_classes: Classes of the condition (and of the dataset).
        input_shape: ``(C, H, W)`` of the real images, scaled to [0, 1].
        latent_dim: Size of z ~ U(-1, 1).
        g_filters, g_strides: Generator ConvT blocks (see :class:`Generator`).
        d_filters, d_strides: Discriminator conv blocks (see :class:`Discriminator`).
        kernel_size: Kernel of every (transposed) conv (book: 5).
        negative_slope: LeakyReLU slope in D (book: 0.2).
        d_optimizer: Discriminator optimiser factory; ``None``: ``RMSprop(lr=2e-4)`` with PyTorch's alpha and eps
            (the book: Keras' rho 0.9, eps 1e-7).
        g_optimizer: Generator optimiser factory; ``None``: ``RMSprop(lr=1e-4)``, likewise.
        d_decay, g_decay: Keras ``decay`` of each optimiser's lr, per update; 0 (PyTorch: none) disables it (book:
            6e-8 and 3e-8).
        eval_generator_for_d: Make the discriminator's fakes with G in eval mode (BN running statistics), as
            the book's Keras ``generator.predict`` does; ``False`` (the default) uses batch statistics, as a plain
            PyTorch loop calling ``generator(z)`` does.
        init: ``torch`` (PyTorch's initialisation) or ``keras`` (glorot_uniform kernels, zero biases).
        batch_norm: G's BatchNorm: ``torch`` (momentum 0.1, eps 1e-5) or ``keras`` (the book's: momentum 0.99 in
            Keras' terms, eps 1e-3).

    Logged per step and per epoch (synced): ``train/d_loss``, ``train/g_loss``, ``train/d_acc``,
    ``train/d_acc_real``, ``train/d_acc_fake`` and ``train/loss`` (their sum ``d_loss + g_loss``, the one
    training loss that progress bars and generic tools look for; about 1.5 at the book's equilibrium).
    ``predict_step`` generates one image per item of the batch (for the CGAN of the batch's labels).
    """

    def __init__(
        self,
        conditional: bool = False,
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        latent_dim: int = 100,
        g_filters: Sequence[int] = (128, 64, 32, 1),
        g_strides: Sequence[int] = (2, 2, 1, 1),
        d_filters: Sequence[int] = (32, 64, 128, 256),
        d_strides: Sequence[int] = (2, 2, 2, 1),
        kernel_size: int = 5,
        negative_slope: float = 0.2,
        d_optimizer: OptimizerCallable | None = None,
        g_optimizer: OptimizerCallable | None = None,
        d_decay: float = 0.0,
        g_decay: float = 0.0,
        eval_generator_for_d: bool = False,
        init: InitName = "torch",
        batch_norm: BatchNormName = "torch",
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape={list(input_shape)}: give (channels, height, width), e.g. [1, 28, 28].")
        if conditional and num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a conditional GAN needs at least 2 classes.")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.conditional = conditional
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.d_optimizer_factory = SharedFactory.wrap(d_optimizer or rmsprop(2e-4))
        self.g_optimizer_factory = SharedFactory.wrap(g_optimizer or rmsprop(1e-4))
        cond = num_classes if conditional else 0
        self.generator = Generator(latent_dim, input_shape, g_filters, g_strides, kernel_size, cond, batch_norm)
        self.discriminator = Discriminator(input_shape, d_filters, d_strides, kernel_size, negative_slope, cond)
        if init == "keras":
            keras_init_(self)

    # ---- sampling ------------------------------------------------------------------------------------
    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """z ~ U(-1, 1) of shape ``(n, latent_dim)`` on the module's device (a CPU ``generator`` fixes it)."""
        if generator is None:
            return torch.rand(n, self.latent_dim, device=self.device) * 2 - 1
        return (torch.rand(n, self.latent_dim, generator=generator) * 2 - 1).to(self.device)

    def sample_labels(self, n: int) -> Tensor | None:
        """Uniform random class labels on the module's device for the CGAN, ``None`` for the DCGAN."""
        return torch.randint(0, self.num_classes, (n,), device=self.device) if self.conditional else None

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Generate images in [0, 1] from noise (and, for the CGAN, integer class labels)."""
        if self.conditional and labels is None:
            raise ValueError("The conditional GAN needs the class labels of the images to generate.")
        return self.generator(z, labels if self.conditional else None)

    @torch.no_grad()
    def generate(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Images from ``z`` with G in eval mode (BN running statistics, as Keras ``predict``); mode restored."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self(z, labels)
        finally:
            self.generator.train(was_training)

    def discriminate(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits of "real" for ``images`` (and their labels, for the CGAN)."""
        return self.discriminator(images, labels if self.conditional else None)

    # ---- training ------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        real, targets = batch
        labels = (targets.argmax(dim=-1) if targets.is_floating_point() else targets) if self.conditional else None
        n = len(real)
        opt_d, opt_g = self.optimizers()
        sched_d, sched_g = self.lr_schedulers()

        # Discriminator: real (label 1) and fake (label 0) in one batch, as the book's train_on_batch.
        fake_labels = self.sample_labels(n)
        z = self.sample_noise(n)
        if self.hparams.eval_generator_for_d:
            fake = self.generate(z, fake_labels)
        else:
            with torch.no_grad():
                fake = self(z, fake_labels)
        self.toggle_optimizer(opt_d)
        both_labels = torch.cat([labels, fake_labels]) if self.conditional else None
        logits = self.discriminate(torch.cat([real, fake]), both_labels)
        truth = torch.cat([torch.ones(n, device=self.device), torch.zeros(n, device=self.device)])
        d_loss = F.binary_cross_entropy_with_logits(logits, truth)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        sched_d.step()
        self.untoggle_optimizer(opt_d)

        # Generator: fresh noise labelled "real"; toggle_optimizer freezes D (requires_grad False).
        self.toggle_optimizer(opt_g)
        g_labels = self.sample_labels(n)
        g_logits = self.discriminate(self(self.sample_noise(n), g_labels), g_labels)
        g_loss = F.binary_cross_entropy_with_logits(g_logits, torch.ones(n, device=self.device))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        sched_g.step()
        self.untoggle_optimizer(opt_g)

        with torch.no_grad():
            correct = (logits.detach() > 0).float() == truth
            acc_real, acc_fake = correct[:n].float().mean(), correct[n:].float().mean()
        log = dict(on_step=True, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("train/d_loss", d_loss.detach(), prog_bar=True, **log)
        self.log("train/g_loss", g_loss.detach(), prog_bar=True, **log)
        self.log("train/d_acc", correct.float().mean(), **log)
        self.log("train/d_acc_real", acc_real, **log)
        self.log("train/d_acc_fake", acc_fake, **log)
        self.log("train/loss", (d_loss + g_loss).detach(), **log)

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """One generated image per batch item; the CGAN draws the batch's labels (e.g. the test set's digits)."""
        if isinstance(batch, list | tuple):
            images, targets = batch[0], batch[1] if len(batch) > 1 else None
        else:
            images, targets = batch, None
        labels = None
        if self.conditional:
            if targets is None:
                raise ValueError("CGAN predict needs (image, label) batches: the labels say which class to draw.")
            labels = targets.argmax(dim=-1) if targets.is_floating_point() else targets
        return self.generate(self.sample_noise(len(images)), labels)

    def configure_optimizers(self):
        hp = self.hparams
        opt_d = self.d_optimizer_factory(self.discriminator.parameters())
        opt_g = self.g_optimizer_factory(self.generator.parameters())
        # Stepped by hand in training_step, once per update of their optimiser (Keras' `iterations`).
        return [opt_d, opt_g], [LambdaLR(opt_d, keras_decay(hp.d_decay)), LambdaLR(opt_g, keras_decay(hp.g_decay))]

    # ---- checks, DDP and checkpoints ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        check_image_datamodule(self, self.input_shape, self.num_classes if self.conditional else None)

    def on_fit_start(self) -> None:
        # Each update uses only one network's parameters (G's are idle in the D update and D's frozen in the G
        # update), which DDP refuses unless told to look for unused parameters. The strategy has wrapped the model
        # by now, so its DDP wrapper says how it was built.
        wrapper = self.trainer.strategy.model
        if isinstance(wrapper, DistributedDataParallel) and not wrapper.find_unused_parameters:
            raise ValueError(
                "The GAN trains G and D in separate updates, so each update leaves one network's parameters unused, "
                "and DDP needs find_unused_parameters=True for that. Run it with --trainer.strategy "
                "ddp_find_unused_parameters_true (or ddp_spawn_find_unused_parameters_true), or pass "
                "DDPStrategy(find_unused_parameters=True)."
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        batch_norm_of_old_checkpoint(self, checkpoint)
