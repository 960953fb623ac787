"""Pictures of the generative topics (notes: *Autoencoder*, *GAN*).

- :class:`LatentSpace`: the notes' latent plots: test/val latents coloured by class and, for a 2-D latent, the
  decoded images over the latent plane; a PCA projection for larger latents.
- :class:`ReconstructionGrid`: input / output / target rows for fixed samples (noisy / denoised / clean,
  gray / predicted / true), every N epochs.
- :class:`GANSamples`: a grid generated from fixed noise every N training steps (a row per class for the
  conditional GAN), so that grids of different steps are directly comparable.
- :class:`PredictionGrid`: the images returned by ``predict`` as one PNG grid.

:class:`ConditionalAccuracy` (a score, not a picture: how often a classifier trained by this template recognises the
requested digit in conditional-GAN samples) lives in :mod:`callbacks.conditional_accuracy`; it is importable from
here too, as the configs name it ``callbacks.generative.ConditionalAccuracy``.

Pictures go through :func:`callbacks.images.save_and_log_figure` (PNG in the run folder + loggers, global rank
zero only). Drawing runs on rank zero alone, on the unwrapped module, so it adds no collective to a DDP run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.seed import isolate_rng
from torch import Tensor
from torchvision.utils import make_grid

from callbacks.activations import ActivationMaps, sample_input
from callbacks.conditional_accuracy import ConditionalAccuracy
from callbacks.images import save_and_log_figure

__all__ = ["ConditionalAccuracy", "GANSamples", "LatentSpace", "PredictionGrid", "ReconstructionGrid"]


@contextmanager
def _eval_no_grad(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode without gradients; the train/eval mode of every submodule is restored after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def _image_grid(images: Tensor, nrow: int) -> Tensor:
    """``(N, C, H, W)`` in [0, 1] -> one ``(3, H', W')`` grid image (1-channel images drawn gray)."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def _due(epoch: int, every: int) -> bool:
    return (epoch + 1) % every == 0


# ---- autoencoders -------------------------------------------------------------------------------------------
class LatentSpace(Callback):
    """The notes' latent-space plots for an autoencoder (a module with ``encode``, ``decode``, ``model_input``).

    Every ``every_n_epochs`` training epochs (and at the end of fit), up to ``max_samples`` images of the
    ``split`` (``val`` or the official ``test`` split) are encoded. With a 2-D latent the figure shows the
    latents as a scatter coloured by class next to a ``grid_size`` x ``grid_size`` grid of images decoded
    from evenly spaced points of the plane (spanning the 1st-99th percentiles of the latents): each class
    should own a region of the plane, and the decoded grid should show the same digits in the same regions.
    With a larger latent the scatter shows the first two PCA components (scikit-learn) instead.

    Saved as ``<run dir>/<filename_prefix>/epoch<NNN>.png`` (``final.png`` at the end of fit); logger tag
    ``filename_prefix``. Only global rank zero encodes and draws.

    Args:
        every_n_epochs: Draw after every n-th training epoch.
        split: ``val`` (the validation split) or ``test`` (the official test split, as the book's plot).
        max_samples: Most images encoded.
        grid_size: Points per side of the decoded grid (2-D latents only).
        filename_prefix: Folder under the run folder and logger tag.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        split: Literal["val", "test"] = "test",
        max_samples: int = 5000,
        grid_size: int = 15,
        filename_prefix: str = "latent",
    ) -> None:
        super().__init__()
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r}: choose 'val' or 'test'.")
        if min(every_n_epochs, max_samples, grid_size) < 1:
            raise ValueError("every_n_epochs, max_samples and grid_size must be at least 1.")
        self.every_n_epochs = every_n_epochs
        self.split = split
        self.max_samples = max_samples
        self.grid_size = grid_size
        self.filename_prefix = filename_prefix
        self._last_drawn: int | None = None

    def _loader(self, trainer: pl.Trainer):
        datamodule = trainer.datamodule
        if datamodule is None:
            loaders = trainer.val_dataloaders
            return loaders[0] if isinstance(loaders, list | tuple) else loaders
        if self.split == "test":
            if getattr(datamodule, "test_set", True) is None:
                datamodule.setup("test")
            return datamodule.test_dataloader()
        return datamodule.val_dataloader()

    def latents(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[np.ndarray, np.ndarray]:
        """``(latents (N, d), labels (N,))`` of up to ``max_samples`` images of the split."""
        loader = self._loader(trainer)
        if loader is None or (isinstance(loader, list) and not loader):
            return np.zeros((0, pl_module.latent_dim)), np.zeros(0, dtype=int)
        zs, ys, count = [], [], 0
        with isolate_rng(), _eval_no_grad(pl_module):
            for batch in loader:
                images, targets = ActivationMaps._prepare(batch, trainer, pl_module)
                x, _ = pl_module.model_input(images)
                zs.append(pl_module.encode(x).float().cpu())
                ys.append((targets.argmax(-1) if targets.is_floating_point() else targets).cpu())
                count += len(images)
                if count >= self.max_samples:
                    break
        return torch.cat(zs)[: self.max_samples].numpy(), torch.cat(ys)[: self.max_samples].numpy()

    def figure(self, pl_module: pl.LightningModule, z: np.ndarray, labels: np.ndarray, title: str) -> Figure:
        two_d = z.shape[1] == 2
        fig = Figure(figsize=(11 if two_d else 5.5, 5), layout="constrained")
        axes = fig.subplots(1, 2 if two_d else 1, squeeze=False).ravel()
        if two_d:
            points, xlabel, ylabel = z, "z[0]", "z[1]"
        else:
            from sklearn.decomposition import PCA

            pca = PCA(n_components=2).fit(z)
            points = pca.transform(z)
            share = pca.explained_variance_ratio_
            xlabel, ylabel = f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%})"
        scatter = axes[0].scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
        fig.colorbar(scatter, ax=axes[0], ticks=range(10), label="class")
        axes[0].set(xlabel=xlabel, ylabel=ylabel, title=f"{z.shape[1]}-d latents, {title}")
        if two_d:
            lo, hi = np.percentile(z, 1, axis=0), np.percentile(z, 99, axis=0)
            xs = np.linspace(lo[0], hi[0], self.grid_size)
            ys = np.linspace(hi[1], lo[1], self.grid_size)  # top row = largest z[1], as in the scatter
            grid = torch.tensor([[x, y] for y in ys for x in xs], dtype=torch.float32, device=pl_module.device)
            with _eval_no_grad(pl_module):
                decoded = pl_module.decode(grid)
            image = _image_grid(decoded, self.grid_size).permute(1, 2, 0).numpy()
            axes[1].imshow(image, extent=(lo[0], hi[0], lo[1], hi[1]), aspect="auto")
            axes[1].set(xlabel="z[0]", ylabel="z[1]", title="decoded over the latent plane")
        return fig

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        if not trainer.is_global_zero:
            return
        z, labels = self.latents(trainer, pl_module)
        if len(z) < 2:
            rank_zero_warn(f"LatentSpace: the {self.split} split gave no images; no latent plot drawn.")
            return
        title = f"{self.split} split, epoch {trainer.current_epoch}"
        save_and_log_figure(trainer, self.figure(pl_module, z, labels, title), f"{self.filename_prefix}/{name}",
                            tag=self.filename_prefix)  # fmt: skip
        self._last_drawn = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _due(trainer.current_epoch, self.every_n_epochs):
            self.draw(trainer, pl_module, f"epoch{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer, pl_module, "final")


class ReconstructionGrid(Callback):
    """Rows of input / output / target images for fixed samples, every ``every_n_epochs`` training epochs.

    The samples are the first ``num_images`` of a validation batch (taken once at the start of training, as
    :class:`~callbacks.activations.ActivationMaps` does); the module's ``model_input`` turns them into the
    encoder input with a seeded generator, so the denoising noise is the same in every picture. Row titles come
    from the module's ``panel_names`` (noisy / denoised / clean, gray / predicted / true); for plain
    reconstruction, where input and target coincide, the target row is left out.

    Saved as ``<run dir>/<filename_prefix>/epoch<NNN>.png``; logger tag ``filename_prefix``.
    """

    def __init__(
        self, every_n_epochs: int = 1, num_images: int = 8, seed: int = 0, filename_prefix: str = "reconstructions"
    ) -> None:
        super().__init__()
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError("every_n_epochs and num_images must be at least 1.")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed
        self.filename_prefix = filename_prefix
        self._sample: Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._sample = sample_input(trainer, pl_module, self.num_images, owner="ReconstructionGrid")

    def panels(self, pl_module: pl.LightningModule, images: Tensor) -> list[tuple[str, Tensor]]:
        """``[(name, images)]`` rows: the encoder input, the output and (unless equal to the input) the target."""
        x, target = pl_module.model_input(images, generator=torch.Generator().manual_seed(self.seed))
        with _eval_no_grad(pl_module):
            output = pl_module(x)
        names = pl_module.panel_names
        rows = [(names[0], x), (names[1], output)]
        if not torch.equal(x, target):
            rows.append((names[2], target))
        return rows

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sample is None or not _due(trainer.current_epoch, self.every_n_epochs):
            return
        rows = self.panels(pl_module, self._sample)
        fig = Figure(figsize=(1.1 * self.num_images, 1.25 * len(rows)), layout="constrained")
        for ax, (name, images) in zip(fig.subplots(len(rows), 1, squeeze=False).ravel(), rows, strict=True):
            ax.imshow(_image_grid(images, self.num_images).permute(1, 2, 0).numpy())
            ax.set_axis_off()
            ax.set_title(name, fontsize=9)
        fig.suptitle(f"epoch {trainer.current_epoch}", fontsize=9)
        name = f"{self.filename_prefix}/epoch{trainer.current_epoch:03d}"
        save_and_log_figure(trainer, fig, name, tag=self.filename_prefix)


# ---- GANs ---------------------------------------------------------------------------------------------------
def _iteration(trainer: pl.Trainer) -> int:
    """Training steps completed (batches), not ``global_step``: with manual optimisation of D and G that counts
    two optimiser steps per batch."""
    return trainer.fit_loop.epoch_loop.total_batch_idx + 1


class GANSamples(Callback):
    """Images generated from the same fixed noise every ``every_n_steps`` training steps and at the end of fit.

    The noise (and, for a conditional GAN, the labels: ``num_images`` per class, a row per class) is drawn once
    from a seeded CPU generator, so every grid shows the same latent points and the pictures of successive
    steps show how the generator evolves. The generator runs in eval mode (BN running statistics), as the
    book's ``generator.predict``. Steps count batches (one D and one G update each).

    Saved as ``<run dir>/<filename_prefix>/step<NNNNNN>.png``; logger tag ``filename_prefix``.

    Args:
        every_n_steps: Draw after every n-th training step.
        num_images: Images in the grid (DCGAN), or per class (CGAN).
        nrow: Images per row of the DCGAN grid (default: a square grid).
        seed: Seed of the fixed noise.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_images: int = 16,
        nrow: int | None = None,
        seed: int = 0,
        filename_prefix: str = "samples",
    ) -> None:
        super().__init__()
        if every_n_steps < 1 or num_images < 1:
            raise ValueError("every_n_steps and num_images must be at least 1.")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.nrow = nrow
        self.seed = seed
        self.filename_prefix = filename_prefix

    def fixed_inputs(self, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor | None]:
        """``(z, labels)`` on the module's device, identical at every call."""
        generator = torch.Generator().manual_seed(self.seed)
        if pl_module.conditional:
            labels = torch.arange(pl_module.num_classes).repeat_interleave(self.num_images).to(pl_module.device)
            return pl_module.sample_noise(len(labels), generator), labels
        return pl_module.sample_noise(self.num_images, generator), None

    def samples(self, pl_module: pl.LightningModule) -> Tensor:
        """The grid image ``(3, H, W)`` in [0, 1] of the fixed inputs."""
        z, labels = self.fixed_inputs(pl_module)
        images = pl_module.generate(z, labels)
        nrow = self.num_images if pl_module.conditional else self.nrow or math.ceil(math.sqrt(self.num_images))
        return _image_grid(images, nrow)

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            step = _iteration(trainer)
            name = f"{self.filename_prefix}/step{step:06d}"
            save_and_log_figure(trainer, self.samples(pl_module), name, step=trainer.global_step,
                                tag=self.filename_prefix)  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if _iteration(trainer) % self.every_n_steps == 0:
            self.draw(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _iteration(trainer) % self.every_n_steps:
            self.draw(trainer, pl_module)


class PredictionGrid(Callback):
    """Collect the images that ``predict`` returns (``(N, C, H, W)`` in [0, 1] per batch) and save the first
    ``max_images`` as one grid, ``<run dir>/<filename>.png`` (rank zero's predictions), at the end of predict."""

    def __init__(self, max_images: int = 100, nrow: int = 10, filename: str = "predictions") -> None:
        super().__init__()
        if max_images < 1 or nrow < 1:
            raise ValueError("max_images and nrow must be at least 1.")
        self.max_images = max_images
        self.nrow = nrow
        self.filename = filename
        self._images: list[Tensor] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images = []

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args) -> None:
        have = sum(len(x) for x in self._images)
        if isinstance(outputs, Tensor) and outputs.ndim == 4 and have < self.max_images:
            self._images.append(outputs[: self.max_images - have].detach().cpu())

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._images:
            save_and_log_figure(trainer, _image_grid(torch.cat(self._images), self.nrow), self.filename)
