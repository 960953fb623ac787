"""Pretrained weights for the conv bases of :mod:`lightning_modules.backbones`: resolve, download, read, load.

``weights`` of :class:`~lightning_modules.transfer.TransferClassifier` is a torchvision weight name of the backbone
(``IMAGENET1K_V1``, ``DEFAULT``, ...), a local ``.pth``/``.pt`` state_dict file of the torchvision model (whole model
or conv base only, e.g. the cached file copied from another machine), or ``"random"``. There is no default.
:func:`resolve_weights` validates the choice without reading anything; :func:`download_weights` puts a torchvision
weight into the torch cache (``torch.hub.get_dir()/checkpoints``), with a clear error when offline;
:func:`read_weights` reads a state_dict and :func:`load_into_base` checks and copies it into a base.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torchvision.models import WeightsEnum

__all__ = [
    "RANDOM",
    "PretrainedWeightsError",
    "cached_weight_file",
    "download_weights",
    "load_into_base",
    "missing_weights_message",
    "read_state_dict",
    "read_weights",
    "resolve_weights",
]

RANDOM = "random"


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights cannot be had (no network, no cached file) or a weight file does not fit the backbone."""


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


def read_weights(backbone: str, source: WeightsEnum | Path) -> tuple[Mapping[str, Tensor], str]:
    """The state_dict of a resolved weight (downloaded first if need be) and how messages name it."""
    if not isinstance(source, WeightsEnum):
        return read_state_dict(source), str(source)
    path = download_weights(source)  # a no-op when it is cached
    try:  # the builder knows each family's quirks (e.g. DenseNet's old key names)
        state = torchvision.models.get_model(backbone, weights=source).state_dict()
    except Exception as err:
        raise PretrainedWeightsError(
            f"The cached weight file {path} cannot be loaded ({type(err).__name__}: {err}). It is probably "
            "damaged (an interrupted copy): delete it to download it again, or copy an intact one there."
        ) from err
    return state, f"torchvision's {source}"


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
