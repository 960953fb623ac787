"""Feature maps of chosen layers for a fixed input, saved as image grids during training (notes:
*visualising what convnets learn*: intermediate activations)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.seed import isolate_rng
from torch import Tensor, nn
from torchvision.utils import make_grid

from callbacks.images import save_and_log_figure

__all__ = ["ActivationMaps"]


def _first_loader(loaders: Any) -> Iterable | None:
    """The first dataloader of what ``trainer.val_dataloaders`` / ``train_dataloader`` return."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence):
        return _first_loader(loaders[0]) if loaders else None
    return loaders


def _input_of(batch: Any) -> Tensor:
    """The model input of a batch: the batch itself or its first element."""
    if isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(
            f"ActivationMaps feeds the first element of a batch to the model, a tensor; got {type(batch).__name__}"
        )
    return batch


def _store(outputs: dict[str, Tensor], name: str, module: nn.Module, args: Any, output: Any) -> None:
    if isinstance(output, list | tuple):
        output = next((o for o in output if isinstance(o, Tensor)), None)
    if isinstance(output, Tensor):
        outputs[name] = output.detach()


def sample_input(trainer: pl.Trainer, pl_module: pl.LightningModule, num_images: int, owner: str) -> Tensor | None:
    """A fixed model input for picture-making callbacks: the first ``num_images`` samples of a validation batch
    (the training loader's when there is no validation), prepared as Lightning prepares batches (the
    datamodule's or module's batch-transfer hooks, e.g. ``uint8`` -> normalised float) and on the module's device.

    The global RNG is left untouched (a shuffled loader draws its order from it). Returns a normal tensor, never
    an inference-mode one, or ``None`` with a warning naming ``owner`` when there is no dataloader.
    """
    loader = _first_loader(trainer.val_dataloaders)
    if loader is None:
        loader = _first_loader(trainer.train_dataloader)
    if loader is None:
        rank_zero_warn(f"{owner}: no dataloader to take a sample batch from; nothing will be drawn.")
        return None
    with isolate_rng():
        batch = next(iter(loader))
    batch = ActivationMaps._prepare(batch, trainer, pl_module)
    with torch.inference_mode(False):
        return _input_of(batch)[:num_images].detach().clone()


class ActivationMaps(Callback):
    """Save grids of the feature maps of chosen layers for a fixed sample, every ``every_n_epochs`` epochs.

    At the start of training a batch is taken once from the validation dataloader (the training one when
    there is no validation) without disturbing the random state, prepared exactly as Lightning prepares
    batches (the ``on_before_batch_transfer`` / ``transfer_batch_to_device`` / ``on_after_batch_transfer``
    hooks of the datamodule or module, e.g. the ``uint8`` -> normalised float step of the image datamodules)
    and its first ``num_images`` samples kept. After every ``every_n_epochs``-th training epoch, forward
    hooks are put on the layers, the sample goes through the model in eval mode without gradients, and the
    hooks are removed again (also when the forward fails). Each module's train/eval mode is restored.

    For every layer, the first ``max_channels`` channels are drawn as a grid (each map min-max scaled on
    its own; a row per sample when ``num_images > 1``) and saved as
    ``<run dir>/<filename_prefix>/<layer>_epoch<NNN>.png`` (epoch from 0), and sent to the loggers that take
    images under the tag ``<filename_prefix>/<layer>``. The forward runs on every process, so strategies
    that shard the model keep working; only global rank zero draws and writes.

    Args:
        layers: Names of modules as in ``named_modules()`` (e.g. ``net.0.0``); default every ``nn.Conv2d``.
            Layers must output ``(N, C, H, W)`` tensors; others are skipped with a warning.
        every_n_epochs: Draw after every n-th training epoch.
        num_images: Number of samples of the fixed batch whose maps are drawn.
        max_channels: Most channels drawn per layer.
        filename_prefix: Folder (under the run folder) and logger tag prefix.
        min_map_size: Small maps are enlarged (nearest neighbour, integer factor) to at least this many
            pixels on their shorter side so the PNG stays readable; 0 disables.
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        every_n_epochs: int = 1,
        num_images: int = 1,
        max_channels: int = 16,
        filename_prefix: str = "activations",
        min_map_size: int = 48,
    ) -> None:
        super().__init__()
        for arg, value in (
            ("every_n_epochs", every_n_epochs),
            ("num_images", num_images),
            ("max_channels", max_channels),
        ):
            if value < 1:
                raise ValueError(f"{arg}={value} must be at least 1.")
        self.layers = list(layers) if layers is not None else None
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.max_channels = max_channels
        self.filename_prefix = filename_prefix
        self.min_map_size = min_map_size
        self._names: list[str] = []
        self._sample: Tensor | None = None
        self._warned: set[str] = set()

    # ---- setup ---------------------------------------------------------------------------------------
    def resolve_layers(self, pl_module: nn.Module) -> list[str]:
        """The layer names to hook in ``pl_module``; raises ``ValueError`` for unknown names."""
        modules = dict(pl_module.named_modules())
        if self.layers is None:
            return [name for name, module in modules.items() if isinstance(module, nn.Conv2d)]
        unknown = [name for name in self.layers if name not in modules]
        if unknown:
            convs = [name for name, module in modules.items() if isinstance(module, nn.Conv2d)]
            examples = (convs or [name for name in modules if name])[:8]
            raise ValueError(
                f"ActivationMaps: {type(pl_module).__name__} has no module(s) named {unknown}. Use names from "
                f"named_modules(), e.g. {examples}."
            )
        return list(self.layers)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._names = self.resolve_layers(pl_module)
        if not self._names:
            rank_zero_warn(
                f"ActivationMaps: {type(pl_module).__name__} has no nn.Conv2d layer and no `layers` were given; "
                "no activation maps will be drawn."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._names:
            return
        self._sample = sample_input(trainer, pl_module, self.num_images, owner="ActivationMaps")
        if self._sample is None:
            self._names = []

    @staticmethod
    def _prepare(batch: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Apply the batch-transfer hooks as Lightning does: the datamodule's where it overrides one."""
        datamodule = trainer.datamodule

        def owner(hook: str) -> Any:
            if datamodule is not None and is_overridden(hook, datamodule, pl.LightningDataModule):
                return datamodule
            return pl_module

        batch = owner("on_before_batch_transfer").on_before_batch_transfer(batch, 0)
        batch = owner("transfer_batch_to_device").transfer_batch_to_device(batch, pl_module.device, 0)
        return owner("on_after_batch_transfer").on_after_batch_transfer(batch, 0)

    # ---- capture -------------------------------------------------------------------------------------
    def feature_maps(self, model: nn.Module, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        """Outputs of ``layers`` for input ``x``: one eval-mode, no-grad forward; hooks always removed."""
        modules = dict(model.named_modules())
        modes = {module: module.training for module in model.modules()}
        outputs: dict[str, Tensor] = {}
        handles = []
        try:
            for name in layers:
                handles.append(modules[name].register_forward_hook(partial(_store, outputs, name)))
            model.eval()
            with torch.no_grad():
                model(x)
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes.items():
                module.training = training
        return outputs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sample is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        precision = trainer.precision_plugin
        with precision.forward_context():
            outputs = self.feature_maps(pl_module, precision.convert_input(self._sample), self._names)
        if not trainer.is_global_zero:
            return
        for name in self._names:
            output = outputs.get(name)
            if output is None or output.ndim != 4:
                if name not in self._warned:
                    self._warned.add(name)
                    shape = None if output is None else tuple(output.shape)
                    rank_zero_warn(f"ActivationMaps: layer {name!r} gave no (N, C, H, W) tensor ({shape}); skipped.")
                continue
            label = name or "model"
            save_and_log_figure(
                trainer,
                self.grid(output),
                f"{self.filename_prefix}/{label}_epoch{trainer.current_epoch:03d}",
                tag=f"{self.filename_prefix}/{label}",
            )

    def grid(self, output: Tensor) -> Tensor:
        """``(N, C, H, W)`` activations -> ``(3, H', W')`` image grid in [0, 1] of the first maps."""
        maps = output[: self.num_images, : self.max_channels].float().cpu()
        n, c, h, w = maps.shape
        flat = maps.reshape(n, c, -1)
        low = flat.amin(-1)[..., None, None]
        high = flat.amax(-1)[..., None, None]
        maps = (maps - low) / (high - low).clamp_min(1e-8)
        scale = math.ceil(self.min_map_size / min(h, w)) if self.min_map_size else 1
        tiles = maps.reshape(n * c, 1, h, w)
        if scale > 1:
            tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
        nrow = c if n > 1 else math.ceil(math.sqrt(c))
        return make_grid(tiles, nrow=nrow, padding=2, pad_value=1.0)
