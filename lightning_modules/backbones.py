"""Conv bases cut from torchvision classifiers, and their blocks (used by :mod:`lightning_modules.transfer`).

**Backbones**: any classification model of torchvision's registry whose forward chains its children: VGG,
ResNet/ResNeXt/Wide-ResNet, MobileNet v2/v3, EfficientNet (v1, v2), DenseNet, ConvNeXt, RegNet, MNASNet,
ShuffleNet v2, SqueezeNet, AlexNet. The classifier children (``avgpool``, ``classifier``, ``fc``, ...) are cut off
(:func:`build_base`).

The base is split into **blocks**, the units that ``truncate_after`` and ``unfreeze_blocks`` count
(:func:`group_blocks`): a base made of plain layers only (VGG, AlexNet) is split after every pooling layer, named like
Keras' ``block1`` ... ``block5``; otherwise every stage module is a block named by its path (``layer1`` ... ``layer4``
for ResNets, ``features.0`` ... for MobileNet/EfficientNet/ConvNeXt, ``features.denseblock1`` ...), the plain layers
before the first one form ``stem`` and plain layers after one join it. :func:`truncate_base` keeps the base up to a
block or layer.

The base keeps torchvision's state_dict keys, so torchvision's weight files load into it as they are
(:mod:`lightning_modules.pretrained`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import torchvision
from torch import nn

__all__ = [
    "BATCH_NORM",
    "POOLING",
    "base_units",
    "build_base",
    "classification_backbones",
    "group_blocks",
    "truncate_base",
    "vgg_init_",
]

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
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
"""The pooling layers that end a VGG-style block (torch's max, average and adaptive pooling layers)."""
BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
"""torch's BatchNorm layers (their lazy variants subclass these)."""


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
