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
   Done by :class:`TransferFinetuning`, a Lightning ``BaseFinetuning`` callback the module adds itself.

Frozen parts of the base always run in eval mode, so their BatchNorm layers neither update nor use batch statistics.
Under DDP, blocks unfrozen after DDP wrapped the model are ignored by its gradient reducer; the module averages their
gradients across processes itself before every optimiser step (``on_before_optimizer_step``), so the replicas stay
identical. ``finetune`` supports single-device and DDP training (Lightning's fine-tuning callbacks refuse DeepSpeed).

**Backbones**: any classification model of torchvision's registry whose forward chains its children: VGG,
ResNet/ResNeXt/Wide-ResNet, MobileNet v2/v3, EfficientNet (v1, v2), DenseNet, ConvNeXt, RegNet, MNASNet,
ShuffleNet v2, SqueezeNet, AlexNet. The classifier children (``avgpool``, ``classifier``, ``fc``, ...) are cut off.
The base is split into **blocks**, the units that ``truncate_after`` and ``unfreeze_blocks`` count: a base made of
plain layers only (VGG, AlexNet) is split after every pooling layer, named like Keras' ``block1`` ... ``block5``;
otherwise every stage module is a block named by its path (``layer1`` ... ``layer4`` for ResNets, ``features.0`` ...
for MobileNet/EfficientNet/ConvNeXt, ``features.denseblock1`` ...), the plain layers before the first one form
``stem`` and plain layers after one join it. ``TransferClassifier(...).block_names`` lists them.

**Weights** (``weights``): a torchvision weight name of the backbone (``IMAGENET1K_V1``, ``DEFAULT``, ...), a local
``.pth``/``.pt`` state_dict file of the torchvision model (whole model or conv base only, e.g. the cached file copied
from another machine), or ``"random"``. There is no default. Constructing the module never reads or downloads
weights: ``prepare_data`` downloads a torchvision weight into the torch cache (``torch.hub.get_dir()/checkpoints``,
once per node, by local rank 0 under DDP) and ``setup`` loads it into the base on every process. Loading happens once:
a run resumed from a checkpoint, or a module whose state came from one (``load_from_checkpoint``, ``load_state_dict``),
keeps its trained weights (the buffer ``base_weights_ready`` travels with the state).

**Inputs**: torchvision's pretrained weights expect RGB in ``[0, 1]`` normalised with the ImageNet mean/std. With
``imagenet_normalize: true`` (default) the module applies that normalisation itself, so the datamodule must hand it
``[0, 1]`` pixels: ``normalize: scale``. Grey inputs (1 channel) are repeated to 3. ``resize`` upsamples inside the
module before the base: CIFAR-10's 32x32 leaves VGG16 (five 2x2 max-pools) a 1x1 map; 128 gives 4x4, like the book's
150x150 cats-vs-dogs inputs.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.data import DataLoader
from torchvision.models import WeightsEnum

from lightning_modules.base import SupervisedModule, warn_if_narrow
from lightning_modules.layers import Dropout, keras_init_

Mode = Literal["feature_extraction", "frozen", "finetune"]
Pool = Literal["avg", "flatten"]

RANDOM = "random"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

HEAD_CHILDREN = frozenset({"avgpool", "classifier", "fc", "head", "heads", "dropout", "flatten"})
"""Top-level children of torchvision classifiers that form the dense classifier, not the conv base."""
STAGE_CONTAINERS = frozenset({"features", "layers", "trunk_output"})
"""Top-level ``nn.Sequential`` children whose own children are the network's stages."""
UNSUPPORTED = {
    "vit_": "a vision transformer: its forward turns patches into tokens between its children",
    "swin_": "a Swin transformer: its feature maps are channels-last",
    "maxvit": "a transformer that only takes 224x224 inputs",
    "googlenet": "its forward adds an input transform and auxiliary classifiers to its children",
    "inception": "its forward adds an input transform and auxiliary classifiers to its children",
}
POOLING = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights cannot be had (no network, no cached file) or a weight file does not fit the backbone."""


# ---- backbones ------------------------------------------------------------------------------------------------------


def classification_backbones() -> list[str]:
    """Names of torchvision's classification models that can serve as a base."""
    return [n for n in torchvision.models.list_models(module=torchvision.models) if not _unsupported_reason(n)]


def _unsupported_reason(name: str) -> str | None:
    return next((why for prefix, why in UNSUPPORTED.items() if name.startswith(prefix)), None)


def build_base(name: str) -> tuple[nn.Sequential, frozenset[str]]:
    """torchvision's ``name`` (random weights) without its classifier, and the state_dict keys of the whole model.

    The base is an ``nn.Sequential`` of the model's own top-level children under their own names, so its state_dict
    keys are torchvision's (``features.0.weight``, ``layer1.0.conv1.weight``): torchvision's weight files load as is.
    """
    why = _unsupported_reason(name)
    if why:
        raise ValueError(f"backbone={name!r} is not supported: {why}. Choose a convnet, e.g. vgg16, resnet50.")
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"backbone={name!r} is not a torchvision classification model. Choose one of: "
            f"{', '.join(classification_backbones())}."
        )
    vgg = name.startswith("vgg")
    # VGG's dense classifier holds ~90 % of its weights (123 M, 0.5 GB, ~1 s to initialise): build the model on the
    # meta device and materialise only the conv base, initialised as torchvision's VGG does.
    with torch.device("meta") if vgg else contextlib.nullcontext():
        model = torchvision.models.get_model(name, weights=None)
    children = OrderedDict((n, m) for n, m in model.named_children() if n not in HEAD_CHILDREN)
    if isinstance(model, torchvision.models.DenseNet):
        children["final_relu"] = nn.ReLU()  # DenseNet.forward applies a ReLU after `features`
    base = nn.Sequential(children)
    if vgg:
        base.to_empty(device="cpu")
        vgg_init_(base)
    return base, frozenset(model.state_dict())


def vgg_init_(module: nn.Module) -> None:
    """torchvision's VGG initialisation of conv and BatchNorm layers (``VGG.__init__``), plus fresh BN statistics."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def base_units(base: nn.Sequential) -> list[str]:
    """Paths of the modules the base runs in order: its children, with stage containers opened one level."""
    units = []
    for name, child in base.named_children():
        if name in STAGE_CONTAINERS and isinstance(child, nn.Sequential):
            units += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            units.append(name)
    return units


def group_blocks(base: nn.Sequential) -> OrderedDict[str, list[str]]:
    """Blocks of the base (see the module docstring): block name -> unit paths, in forward order."""
    units = base_units(base)
    modules = [base.get_submodule(u) for u in units]
    has_stages = any(not _is_leaf(m) for m in modules)
    blocks: OrderedDict[str, list[str]] = OrderedDict()
    pending: list[str] = []
    for unit, module in zip(units, modules, strict=True):
        if _is_leaf(module):
            pending.append(unit)
            if not has_stages and isinstance(module, POOLING):  # VGG-style: a pooling layer ends a block
                blocks[f"block{len(blocks) + 1}"], pending = pending, []
            continue
        if pending:  # plain layers before the first stage are the stem; after a stage they belong to it
            if blocks:
                next(reversed(blocks.values())).extend(pending)
            else:
                blocks["stem"] = pending
            pending = []
        blocks[unit] = [unit]
    if pending:
        if blocks and has_stages:
            next(reversed(blocks.values())).extend(pending)
        else:
            blocks[f"block{len(blocks) + 1}"] = pending
    return blocks


def truncate_base(base: nn.Sequential, last: str) -> nn.Sequential:
    """The base up to and including block or unit ``last``; the rest is dropped. Keys keep torchvision's names."""
    blocks, units = group_blocks(base), base_units(base)
    if last in blocks:
        last = blocks[last][-1]
    if last not in units:
        raise ValueError(
            f"truncate_after={last!r} names no block or layer of this base. Blocks: {', '.join(blocks)}; layers: "
            f"{', '.join(units)}."
        )
    keep = set(units[: units.index(last) + 1])
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for name, child in base.named_children():
        if name in STAGE_CONTAINERS and isinstance(child, nn.Sequential):
            kept = OrderedDict((sub, m) for sub, m in child.named_children() if f"{name}.{sub}" in keep)
            if kept:
                children[name] = nn.Sequential(kept)
        elif name in keep:
            children[name] = child
    return nn.Sequential(children)


# ---- weights --------------------------------------------------------------------------------------------------------


def _weight_names(backbone: str) -> list[str]:
    return list(torchvision.models.get_model_weights(backbone).__members__)


def missing_weights_message(backbone: str) -> str:
    return (
        f"TransferClassifier(backbone={backbone!r}) needs `weights`; there is no silent default. Pass a torchvision "
        f"weight name (for {backbone}: {', '.join(_weight_names(backbone))}), which is downloaded once into the "
        f"torch cache ({Path(torch.hub.get_dir()) / 'checkpoints'}, moved with $TORCH_HOME) and needs network access "
        f"the first time; or the path of a local .pth/.pt state_dict file of torchvision's {backbone} (e.g. that "
        "cached file copied from another machine); or 'random' to train the same architecture from random weights "
        "(no transfer). E.g. --model.init_args.weights IMAGENET1K_V1."
    )


def resolve_weights(backbone: str, weights: str | None) -> WeightsEnum | Path | None:
    """``weights`` -> a torchvision weight, a file path, or ``None`` for ``"random"``; reads and downloads nothing."""
    if weights is None:
        raise ValueError(missing_weights_message(backbone))
    if weights == RANDOM:
        return None
    enum = torchvision.models.get_model_weights(backbone)
    name = weights.removeprefix(f"{enum.__name__}.")
    if name in enum.__members__:
        return enum[name]
    path = Path(weights).expanduser()
    if path.suffix in (".pth", ".pt") or os.sep in weights or "/" in weights or path.is_file():
        return path
    raise ValueError(
        f"weights={weights!r} is neither a torchvision weight of {backbone} ({', '.join(enum.__members__)}), nor a "
        "state_dict file (.pth/.pt), nor 'random'."
    )


def cached_weight_file(weights: WeightsEnum) -> Path:
    """Where ``torch.hub`` keeps (or will keep) the file of a torchvision weight."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def download_weights(weights: WeightsEnum) -> Path:
    """Download a torchvision weight file into the torch cache unless it is there; a clear error when offline."""
    path = cached_weight_file(weights)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    rank_zero_info(f"Downloading {weights} from {weights.url} into {path.parent} ...")
    try:
        torch.hub.download_url_to_file(weights.url, str(path), match.group(1) if match else None, progress=True)
    except Exception as err:  # URLError, OSError, RuntimeError (hash mismatch) depending on what failed
        raise PretrainedWeightsError(
            f"Downloading {weights} from {weights.url} failed ({type(err).__name__}: {err}). Without network access, "
            f"put the file into the torch cache by hand: copy {path.name} (downloaded on a machine with network, where "
            f"torchvision keeps it in <torch.hub.get_dir()>/checkpoints) to {path}, or set $TORCH_HOME to a cache "
            "that holds it; or pass the file itself: --model.init_args.weights /path/to/"
            f"{path.name}."
        ) from err
    return path


def read_state_dict(path: Path) -> Mapping[str, Tensor]:
    """A state_dict file (``torch.load(weights_only=True)``), with a DDP ``module.`` prefix removed."""
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(path)!r}: no such file (a state_dict .pth/.pt file is expected).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedWeightsError(f"{path} cannot be read as a state_dict ({type(err).__name__}: {err}).") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedWeightsError(
            f"{path} holds a {type(state).__name__}, not a state_dict (a mapping of names to tensors); save one with "
            "torch.save(model.state_dict(), path)."
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_into_base(base: nn.Module, state: Mapping[str, Tensor], model_keys: frozenset[str], source: str) -> None:
    """Copy ``state`` into ``base``: every base tensor must be there with its shape; keys of the rest of the torchvision
    model (its classifier, truncated blocks) are ignored, any other key is an error."""
    expected = base.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected and k not in model_keys]
    wrong = [
        f"{k} {tuple(state[k].shape)} (base: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:

        def listed(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})"

        raise PretrainedWeightsError(
            f"{source} does not fit this base: missing keys {listed(missing)}, unexpected keys {listed(unexpected)}, "
            f"shape mismatches {listed(wrong)}. The file must hold a state_dict of the same torchvision model (whole "
            "model or conv base), e.g. torch.save(torchvision.models.get_model(name).state_dict(), path)."
        )
    base.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)


# ---- network --------------------------------------------------------------------------------------------------------


class InputAdapter(nn.Module):
    """Grey -> RGB (channel repeat), ImageNet normalisation of ``[0, 1]`` inputs, and resizing, in that order."""

    def __init__(self, channels: int, resize: int | None, imagenet_normalize: bool) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"input_shape has {channels} channels: a torchvision backbone takes RGB (3) or grey (1).")
        self.repeat = channels == 1
        self.resize = resize
        self.imagenet_normalize = imagenet_normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.repeat:
            x = x.expand(-1, 3, -1, -1)
        if self.imagenet_normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            shrink = self.resize < min(x.shape[-2:])
            x = F.interpolate(
                x, size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=shrink
            )
        return x


class TransferNet(nn.Module):
    """``inputs`` (:class:`InputAdapter`) -> ``base`` (conv base) -> ``pool`` (to a vector) -> ``head`` (dense)."""

    def __init__(self, inputs: InputAdapter, base: nn.Sequential, pool: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.inputs, self.base, self.pool, self.head = inputs, base, pool, head

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.base(self.inputs(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def dense_head(in_features: int, units: Sequence[int], dropout: float, out_features: int) -> nn.Sequential:
    """[Dense -> ReLU -> Dropout] per hidden width -> Dense (the book: Dense 256 ReLU -> Dropout .5 -> Dense)."""
    layers: list[nn.Module] = []
    for width in units:
        layers += [nn.Linear(in_features, width), nn.ReLU(), Dropout(dropout)]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, out_features))


# ---- fine-tuning callback -------------------------------------------------------------------------------------------


class TransferFinetuning(BaseFinetuning):
    """Freeze the base before training; from epoch ``unfreeze_at_epoch`` on, train its last ``unfreeze_blocks``.

    :class:`TransferClassifier` adds it itself in ``finetune`` mode (``configure_callbacks``) and holds the settings.
    ``BaseFinetuning`` records the optimiser's param groups in checkpoints and rebuilds them when a fit resumes; this
    callback then unfreezes the blocks again (at the start of any epoch from the unfreeze epoch on, and at the start
    of a fit resumed in mid-epoch) without adding their parameters twice.
    """

    def freeze_before_training(self, pl_module: TransferClassifier) -> None:
        pl_module.freeze_base()

    def on_train_start(self, trainer: pl.Trainer, pl_module: TransferClassifier) -> None:
        # A fit resumed in mid-epoch does not run on_train_epoch_start for that epoch: unfreeze here too when due.
        for optimizer in trainer.optimizers:
            self.finetune_function(pl_module, trainer.current_epoch, optimizer)

    def finetune_function(self, pl_module: TransferClassifier, epoch: int, optimizer: Optimizer) -> None:
        if epoch >= pl_module.hparams.unfreeze_at_epoch:
            trainer = pl_module.trainer
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
            pl_module.start_finetuning(optimizer, schedulers)


# ---- module ---------------------------------------------------------------------------------------------------------


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
        self.feature_map_shape = self._probe(base, inputs(torch.zeros(1, c, h, w)), backbone)
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

    @staticmethod
    def _probe(base: nn.Module, x: Tensor, backbone: str) -> tuple[int, int, int]:
        """``(C, H, W)`` of the base's output for one input, computed in eval mode."""
        base.eval()
        try:
            with torch.no_grad():
                out = base(x)
        except RuntimeError as err:
            raise ValueError(
                f"A {tuple(x.shape[-2:])} input is too small for the {backbone} base ({err}). Upsample it inside the "
                "module with resize (e.g. --model.init_args.resize 64), or truncate the base earlier."
            ) from err
        finally:
            base.train()
        if out.ndim != 4 or 0 in out.shape:
            raise ValueError(
                f"The {backbone} base turns a {tuple(x.shape[-2:])} input into {tuple(out.shape[1:])}; a convnet base "
                "must output (C, H, W) feature maps. Upsample the inputs with resize."
            )
        return tuple(out.shape[1:])

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
                    if isinstance(m, _BatchNorm) and not include_bn:
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
        return (
            m.weight
            for m in self.net.modules()
            if isinstance(m, nn.Linear | nn.modules.conv._ConvNd) and m.weight.requires_grad
        )

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
            optimizer.add_param_group({"params": new, "lr": lr, "initial_lr": lr})
            _extend_schedulers(schedulers, len(optimizer.param_groups), lr)
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
                        if isinstance(m, _BatchNorm):
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
    def _must_load(self) -> bool:
        resuming = self._trainer is not None and self.trainer.ckpt_path is not None
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
        if isinstance(source, WeightsEnum):
            path = download_weights(source)  # a no-op when prepare_data ran
            description = f"torchvision's {source}"
            try:  # the builder knows each family's quirks (e.g. DenseNet's old key names)
                state = torchvision.models.get_model(backbone, weights=source).state_dict()
            except Exception as err:
                raise PretrainedWeightsError(
                    f"The cached weight file {path} cannot be loaded ({type(err).__name__}: {err}). It is probably "
                    "damaged (an interrupted copy): delete it to download it again, or copy an intact one there."
                ) from err
        else:
            description = str(source)
            state = read_state_dict(source)
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
        datamodule = getattr(self._trainer, "datamodule", None)
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
        trainer = self._trainer
        if trainer is None or trainer.world_size < 2 or not isinstance(trainer.strategy, DDPStrategy):
            return
        synced = self._ddp_synced or set()
        grads = [p.grad for p in self.parameters() if p.grad is not None and p.requires_grad and id(p) not in synced]
        if grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(trainer.world_size)
            for grad, synced_grad in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(synced_grad)

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


def _extend_schedulers(schedulers: Iterable[object], num_groups: int, lr: float) -> None:
    """Let schedulers created before a param group was added handle it (PyTorch's keep per-group lists)."""
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            while len(scheduler.min_lrs) < num_groups:
                scheduler.min_lrs.append(scheduler.min_lrs[-1])
        elif isinstance(scheduler, LRScheduler):
            while len(scheduler.base_lrs) < num_groups:
                scheduler.base_lrs.append(lr)
            lambdas = getattr(scheduler, "lr_lambdas", None)
            while lambdas is not None and len(lambdas) < num_groups:
                lambdas.append(lambdas[-1])
            last = getattr(scheduler, "_last_lr", None)
            while last is not None and len(last) < num_groups:
                last.append(lr)
