"""Transfer learning from a pretrained torchvision convnet (notes: *Pretrained Convnet*).

The notes' workflow: reuse the *convolutional base* of a network trained on a large dataset (ImageNet), not its
densely-connected classifier (the base's feature maps are generic and still know where things are; the dense layers
are specific to the old classes), put a new dense head on top, and train in one of three ways (``mode``):

1. ``feature_extraction`` (the notes' method 1, "pretrained model + standalone dense classifier"): the whole base is
   frozen and runs in inference mode (BatchNorm uses and keeps its running statistics, dropout is off); only the head
   learns. Fitting it on images gives the same head as precomputing the base's features once and fitting the head on
   those, which is the cheap path (CPU-friendly, but no augmentation):
   :meth:`TransferClassifier.extract_features` computes them, and a 2-D batch ``(N, feature_dim)`` given to the
   module is taken as precomputed features and goes through the head only.
2. ``frozen`` (method 2, "extend the pretrained model"): the same frozen base, trained end to end on images so that
   the datamodule's augmentation reaches the base's input (costly: the base runs for every batch of every epoch).
3. ``finetune``: as 2 for the first ``unfreeze_at_epoch`` epochs; then the last ``unfreeze_blocks`` blocks of the
   base are unfrozen and join the optimiser as a new param group with ``finetune_lr_factor`` x the head's lr (the
   notes: train the head first, then unfreeze the more specialised deeper layers and train them jointly, gently).
   Done by :class:`~lightning_modules.fine_tuning.TransferFinetuning`, a Lightning ``BaseFinetuning`` callback the
   module adds itself.

Frozen parts of the base always run in eval mode, so their BatchNorm layers neither update nor use batch statistics.
Under DDP, blocks unfrozen after DDP wrapped the model are ignored by its gradient reducer; the module averages their
gradients across processes itself before every optimiser step (``on_before_optimizer_step``), so the replicas stay
identical. ``finetune`` supports single-device and DDP training (Lightning's fine-tuning callbacks refuse DeepSpeed).

**Backbones** (:mod:`lightning_modules.backbones`): torchvision convnets (VGG, ResNet, MobileNet, EfficientNet,
DenseNet, ConvNeXt, RegNet, ...) without their classifier, split into **blocks** that ``truncate_after`` and
``unfreeze_blocks`` count: ``block1`` ... ``block5`` for VGG (Keras' names), ``stem``, ``layer1`` ... ``layer4`` for
ResNets, ``features.0`` ... for MobileNet/EfficientNet/ConvNeXt. ``TransferClassifier(...).block_names`` lists them.

**Weights** (:mod:`lightning_modules.pretrained`): a torchvision weight name, a local state_dict file, or
``"random"``; there is no default. Constructing the module never reads or downloads weights: ``prepare_data``
downloads a torchvision weight into the torch cache (once per node, by local rank 0 under DDP) and ``setup`` loads it
into the base on every process. Loading happens once: a run resumed from a checkpoint, or a module whose state came
from one (``load_from_checkpoint``, ``load_state_dict``), keeps its trained weights (the buffer
``base_weights_ready`` travels with the state).

**Inputs** (:mod:`lightning_modules.transfer_net`): with ``imagenet_normalize: true`` (default) the module applies the
ImageNet normalisation that pretrained weights expect, so the datamodule must hand it ``[0, 1]`` pixels:
``normalize: scale``. Grey inputs are repeated to RGB; ``resize`` upsamples inside the module before the base.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from torchvision.models import WeightsEnum

from lightning_modules.backbones import BATCH_NORM, build_base, group_blocks, truncate_base
from lightning_modules.base import SupervisedModule, warn_if_narrow
from lightning_modules.fine_tuning import TransferFinetuning, add_param_group
from lightning_modules.layers import keras_init_
from lightning_modules.pretrained import download_weights, load_into_base, read_weights, resolve_weights
from lightning_modules.transfer_net import InputAdapter, TransferNet, dense_head, feature_map_shape

__all__ = ["TransferClassifier", "average_across_processes_"]

Mode = Literal["feature_extraction", "frozen", "finetune"]
Pool = Literal["avg", "flatten"]
KERNEL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
"""Layers whose ``weight`` is a kernel (L2-regularised when trainable)."""


def average_across_processes_(tensors: Sequence[Tensor], world_size: int) -> None:
    """All-reduce ``tensors`` in place to their mean over the ``world_size`` processes of the default group.

    One flat all-reduce per dtype and device (every process passes the same tensors in the same order)."""
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        flat.div_(world_size)
        for tensor, averaged in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            tensor.copy_(averaged.view_as(tensor))


class TransferClassifier(SupervisedModule):
    """A torchvision conv base (pretrained) with a new dense head; see the module docstring for the workflow.

    Args:
        backbone: torchvision classification model, e.g. ``vgg16``, ``resnet18``, ``resnet50``, ``mobilenet_v3_small``.
        weights: torchvision weight name (``IMAGENET1K_V1``, ``DEFAULT``, ...), path of a local state_dict file, or
            ``"random"``. Required: ``None`` is an error that explains the choices.
        mode: ``feature_extraction``, ``frozen`` or ``finetune`` (the notes' three ways to train).
        truncate_after: Keep the base only up to this block (``layer3``, ``block4``, ``features.8``) or layer path; the
            notes: take only earlier, more generic layers when the new data differ a lot from ImageNet.
        head_units: Widths of the hidden Dense layers of the head (ReLU, each followed by dropout); ``[]`` for a
            linear classifier. The output layer follows the task: N logits (multiclass) or 1 (binary).
        dropout: Dropout after each hidden Dense layer (the book: 0.5).
        pool: ``avg`` (global average pooling of the base's maps) or ``flatten`` (the book: Flatten).
        resize: Upsample (or shrink) inputs to ``resize x resize`` inside the module, before the base.
        imagenet_normalize: Map ``[0, 1]`` inputs to ImageNet statistics inside the module (pretrained torchvision
            weights expect them); then the datamodule must use ``normalize: scale``.
        unfreeze_at_epoch: ``finetune``: the epoch (from 0) at which the last blocks start training.
        unfreeze_blocks: ``finetune``: how many of the last blocks of the base to unfreeze (the book: 1, VGG16 block5).
        finetune_lr_factor: ``finetune``: lr of the unfrozen blocks = this x the head's lr at the unfreeze epoch.
        train_bn: ``finetune``: also train the BatchNorm layers of the unfrozen blocks (affine parameters and batch
            statistics). Off by default: they keep their pretrained statistics, in eval mode.
        input_shape: ``(C, H, W)`` of the data (C 3, or 1: repeated to RGB).
        **kwargs: See :class:`~lightning_modules.base.SupervisedModule` (``num_classes``, ``task``, ``optimizer``,
            ``init`` (applied to the head only), ...).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str | None = None,
        mode: Mode = "feature_extraction",
        truncate_after: str | None = None,
        head_units: Sequence[int] = (256,),
        dropout: float = 0.5,
        pool: Pool = "avg",
        resize: int | None = None,
        imagenet_normalize: bool = True,
        unfreeze_at_epoch: int = 5,
        unfreeze_blocks: int = 1,
        finetune_lr_factor: float = 0.1,
        train_bn: bool = False,
        input_shape: Sequence[int] = (3, 32, 32),
        **kwargs,
    ) -> None:
        super().__init__(input_shape=input_shape, **kwargs)
        if mode not in ("feature_extraction", "frozen", "finetune"):
            raise ValueError(f"mode={mode!r}: choose 'feature_extraction', 'frozen' or 'finetune'.")
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool={pool!r}: choose 'avg' (global average pooling) or 'flatten'.")
        if resize is not None and resize < 1:
            raise ValueError(f"resize={resize}: give a size in pixels, or null to keep the input size.")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout} must lie in [0, 1).")
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape={self.input_shape}: a convnet base needs (C, H, W).")
        base, self._model_keys = build_base(backbone)
        self._weights = resolve_weights(backbone, weights)  # validated now, read in prepare_data/setup
        if truncate_after is not None:
            base = truncate_base(base, truncate_after)
        self.blocks = group_blocks(base)
        if mode == "finetune":
            if not 1 <= unfreeze_blocks <= len(self.blocks):
                raise ValueError(
                    f"unfreeze_blocks={unfreeze_blocks}: the {backbone} base has {len(self.blocks)} blocks "
                    f"({', '.join(self.blocks)}); unfreeze between 1 and {len(self.blocks)}."
                )
            if unfreeze_at_epoch < 0 or finetune_lr_factor <= 0:
                raise ValueError("unfreeze_at_epoch must be >= 0 and finetune_lr_factor > 0.")
        c, h, w = self.input_shape
        inputs = InputAdapter(c, resize, imagenet_normalize)
        pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if pool == "avg" else nn.Flatten()
        self.feature_map_shape = feature_map_shape(base, inputs(torch.zeros(1, c, h, w)), backbone)
        self.feature_dim = self.feature_map_shape[0] if pool == "avg" else math.prod(self.feature_map_shape)
        if self.task == "multiclass":
            warn_if_narrow(head_units, self.num_classes, "TransferClassifier head")
        head = dense_head(self.feature_dim, head_units, dropout, self.out_features)
        self.net = TransferNet(inputs, base, pooling, head)
        self.init_weights()
        # True once the base holds its configured weights (at once for 'random'); saved with the state, so weights
        # restored from a checkpoint are never overwritten by the pretrained ones.
        self.register_buffer("base_weights_ready", torch.tensor(self._weights is None))
        self._frozen: set[str] = set()
        self._ddp_synced: set[int] | None = None
        self.freeze_base()

    # ---- structure ---------------------------------------------------------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        """The base's blocks, in forward order (what ``truncate_after`` and ``unfreeze_blocks`` count)."""
        return list(self.blocks)

    @property
    def finetune_block_names(self) -> list[str]:
        """The blocks that ``finetune`` mode unfreezes: the last ``unfreeze_blocks``."""
        return self.block_names[-self.hparams.unfreeze_blocks :] if self.hparams.mode == "finetune" else []

    @property
    def frozen_block_names(self) -> list[str]:
        return [b for b in self.blocks if b in self._frozen]

    def _block_modules(self, name: str) -> list[nn.Module]:
        return [self.net.base.get_submodule(unit) for unit in self.blocks[name]]

    def _unit_modules(self) -> list[nn.Module]:
        return [self.net.base.get_submodule(unit) for units in self.blocks.values() for unit in units]

    def _block_params(self, names: Iterable[str], include_bn: bool) -> list[nn.Parameter]:
        params, seen = [], set()
        for name in names:
            for module in self._block_modules(name):
                for m in module.modules():
                    if isinstance(m, BATCH_NORM) and not include_bn:
                        continue
                    for p in m.parameters(recurse=False):
                        if id(p) not in seen:
                            seen.add(id(p))
                            params.append(p)
        return params

    def init_weights(self) -> None:
        """Keras initialisation for the new head only; the base keeps its (pretrained or torchvision) weights."""
        if self.hparams.init == "keras":
            keras_init_(self.net.head)

    def regularized_weights(self):
        """Kernels of the trainable Dense/Conv layers (head, unfrozen blocks): frozen weights stay as loaded."""
        return (m.weight for m in self.net.modules() if isinstance(m, KERNEL_LAYERS) and m.weight.requires_grad)

    # ---- freezing ----------------------------------------------------------------------------------------------------
    def freeze_base(self) -> None:
        """Freeze every block of the base (no gradients, eval mode). Done at construction and before each run."""
        for p in self.net.base.parameters():
            p.requires_grad_(False)
        self._frozen = set(self.blocks)
        self._apply_block_modes()

    def start_finetuning(self, optimizer: Optimizer, schedulers: Sequence[object] = ()) -> list[nn.Parameter]:
        """Unfreeze the last ``unfreeze_blocks`` blocks and add their parameters that ``optimizer`` lacks as a new
        param group with ``finetune_lr_factor`` x the lr of its first group. ``schedulers`` of that optimizer are
        extended to the new group. Idempotent; returns the parameters added.

        Lightning's ``unfreeze_and_add_param_group`` is not used: it skips parameters whose *values* equal one already
        in the optimiser (``torch.equal``, e.g. a zero-initialised BatchNorm bias as wide as the head's zero bias), and
        it sets ``requires_grad`` on BatchNorm parameters it then leaves out of the optimiser."""
        names = self.finetune_block_names
        train_bn = self.hparams.train_bn
        params = self._block_params(names, include_bn=train_bn)
        if any(n in self._frozen for n in names):
            for p in params:
                p.requires_grad_(True)
            self._frozen -= set(names)
            self._apply_block_modes()
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [p for p in params if id(p) not in present]
        if new:
            lr = self.hparams.finetune_lr_factor * float(optimizer.param_groups[0]["lr"])
            add_param_group(optimizer, new, lr, schedulers)
            rank_zero_info(
                f"Fine-tuning from epoch {self.current_epoch}: unfroze {', '.join(names)} "
                f"({sum(p.numel() for p in new):,} parameters) with lr {lr:g}."
            )
        return new

    def _apply_block_modes(self) -> None:
        """Frozen blocks in eval mode; unfrozen ones follow the module, except their BatchNorm without ``train_bn``."""
        for name in self.blocks:
            frozen = name in self._frozen
            for module in self._block_modules(name):
                module.train(self.training and not frozen)
                if not frozen and not self.hparams.train_bn:
                    for m in module.modules():
                        if isinstance(m, BATCH_NORM):
                            m.eval()
        # Containers (`features`, the base itself) have no behaviour of their own: in train mode when a block is.
        units = {id(m) for m in self._unit_modules()}
        base = self.net.base
        for container in [*(c for c in base.children() if id(c) not in units), base]:
            container.training = any(m.training for m in container.children())

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if mode and hasattr(self, "_frozen"):
            self._apply_block_modes()
        return self

    def configure_callbacks(self) -> list[TransferFinetuning]:
        return [TransferFinetuning()] if self.hparams.mode == "finetune" else []

    # ---- weights -----------------------------------------------------------------------------------------------------
    def _attached_trainer(self) -> pl.Trainer | None:
        """The Trainer running this module, or ``None`` when a hook is called by hand, outside a Trainer."""
        try:
            return self.trainer
        except RuntimeError:  # LightningModule.trainer raises when no Trainer is attached
            return None

    def _must_load(self) -> bool:
        resuming = getattr(self._attached_trainer(), "ckpt_path", None) is not None
        return self._weights is not None and not bool(self.base_weights_ready) and not resuming

    def prepare_data(self) -> None:
        """Download a torchvision weight into the torch cache (local rank 0 of each node); setup() loads it."""
        if isinstance(self._weights, WeightsEnum) and self._must_load():
            download_weights(self._weights)

    def load_base_weights(self) -> None:
        """Put the configured weights into the base (setup() does it once; call it yourself outside a Trainer)."""
        source, backbone = self._weights, self.hparams.backbone
        if source is None:
            return
        state, description = read_weights(backbone, source)
        load_into_base(self.net.base, state, self._model_keys, description)
        self.base_weights_ready.fill_(True)
        rank_zero_info(f"Loaded {description} into the {backbone} base.")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Frozen blocks run in eval mode on purpose; Lightning's warning about eval-mode modules would only alarm.
        warnings.filterwarnings("ignore", r".*module\(s\) in eval mode at the start of training.*")
        self._check_normalization()
        if self._must_load():
            self.load_base_weights()
        if stage == "fit":
            self.freeze_base()  # a second fit starts from the frozen base again, as the first

    def _check_normalization(self) -> None:
        datamodule = getattr(self._attached_trainer(), "datamodule", None)
        normalize = getattr(datamodule, "hparams", {}).get("normalize")
        if self.hparams.imagenet_normalize and normalize == "standardize":
            rank_zero_warn(
                "TransferClassifier normalises its inputs with ImageNet statistics (imagenet_normalize) but the "
                "datamodule already standardises them: set --data.init_args.normalize scale (pixels / 255)."
            )
        elif not self.hparams.imagenet_normalize and self._weights is not None and normalize == "scale":
            rank_zero_warn(
                "Pretrained torchvision weights expect inputs normalised with the ImageNet mean/std, but the inputs "
                "are only scaled to [0, 1]: set --model.init_args.imagenet_normalize true."
            )

    # ---- DDP ---------------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # DDP wraps the model before this hook and all-reduces only the parameters that required grad then.
        self._ddp_synced = {id(p) for p in self.parameters() if p.requires_grad}

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Average the gradients of blocks unfrozen after DDP wrapped the model: its reducer ignores them."""
        trainer = self.trainer  # this hook only runs inside a Trainer
        if trainer.world_size < 2 or not isinstance(trainer.strategy, DDPStrategy):
            return
        synced = self._ddp_synced or set()
        grads = [p.grad for p in self.parameters() if p.grad is not None and p.requires_grad and id(p) not in synced]
        if grads:
            average_across_processes_(grads, trainer.world_size)

    # ---- forward and features ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Images ``(N, C, H, W)`` -> logits; a 2-D batch ``(N, feature_dim)`` is taken as precomputed features."""
        if x.ndim == 2:
            if x.shape[1] != self.feature_dim:
                raise ValueError(
                    f"A 2-D input is taken as precomputed features and must have {self.feature_dim} columns "
                    f"(extract_features), got {tuple(x.shape)}."
                )
            return self.net.head(x)
        return self.net(x)

    @torch.no_grad()
    def extract_features(
        self, dataloader: DataLoader | Iterable, transform: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Run the frozen base (eval mode) over ``dataloader`` once: ``(features (N, feature_dim), targets)`` on CPU.

        The notes' cheap path of method 1: fit the head on ``TensorDataset(features, targets)`` (this module takes
        2-D batches as features). ``transform`` prepares each input batch, e.g. ``datamodule.normalize_images`` for
        the ``uint8`` batches of the image datamodules.
        """
        was_training = self.training
        self.eval()
        features, targets = [], []
        try:
            for batch in dataloader:
                x, y = batch[0].to(self.device), batch[1]
                if transform is not None:
                    x = transform(x)
                if not x.is_floating_point():
                    raise TypeError(
                        f"extract_features got {x.dtype} images: pass transform=... to turn them into floats in [0, 1]"
                        " (e.g. datamodule.normalize_images)."
                    )
                features.append(self.net.features(x).cpu())
                targets.append(y.cpu())
        finally:
            self.train(was_training)
        return torch.cat(features), torch.cat(targets)
