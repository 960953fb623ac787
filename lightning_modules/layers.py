"""Building blocks shared by the topic modules: activations by name, Keras initialisers and layers, locked dropout.

Everything here is plain PyTorch; the CPU speed tricks the CLI applies live in ``lifecycle/speedups.py``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

ActivationName = Literal["relu", "elu", "selu", "softplus", "tanh", "sigmoid", "leaky_relu", "gelu"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module from its name (``relu``, ``elu``, ``selu``, ``softplus``, ``tanh``, ...)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}.") from None


InitName = Literal["torch", "keras"]
BatchNormName = Literal["torch", "keras"]

CONV_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)  # fmt: skip
"""Every convolution of ``torch.nn`` (their lazy variants are subclasses)."""

KERNEL_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_LAYERS)
"""The layers whose ``weight`` is what Keras calls a kernel: Dense and convolutions."""

OWN_INIT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm, nn.Embedding, nn.EmbeddingBag,
)  # fmt: skip
"""Layers an initialiser here leaves to themselves on purpose: normalisation layers start at scale 1 and shift 0 in
PyTorch and Keras alike; an embedding's initialisation is the caller's (Keras: ``U(-0.05, 0.05)``)."""


def _rnn_parameter_covered(name: str) -> bool:
    return name.startswith(("weight_ih", "weight_hh", "bias"))


def uncovered_parameters(module: nn.Module, covered: tuple[type[nn.Module], ...]) -> list[str]:
    """Names of ``module``'s parameters that an initialiser of the ``covered`` layers (plus recurrent layers when
    ``nn.RNNBase`` is among them) leaves at their own initialisation, :data:`OWN_INIT_LAYERS` excepted: e.g. a
    ``MultiheadAttention``'s ``in_proj_weight``, a transformer's ``cls_token`` or ``pos_embed``."""
    names = []
    for prefix, m in module.named_modules():
        if isinstance(m, OWN_INIT_LAYERS) or (isinstance(m, covered) and not isinstance(m, nn.RNNBase)):
            continue
        for name, _ in m.named_parameters(recurse=False):
            if isinstance(m, nn.RNNBase) and nn.RNNBase in covered and _rnn_parameter_covered(name):
                continue
            names.append(f"{prefix}.{name}" if prefix else name)
    return names


def warn_uncovered(module: nn.Module, covered: tuple[type[nn.Module], ...], initialiser: str) -> list[str]:
    """Warn (once per message, rank zero) naming the parameters :func:`uncovered_parameters` finds; returns them."""
    names = uncovered_parameters(module, covered)
    if names:
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        rank_zero_warn(
            f"{initialiser} initialises {', '.join(c.__name__ for c in covered)} layers only; these parameters keep "
            f"PyTorch's initialisation: {shown}. Initialise them yourself after it where the recipe needs it."
        )
    return names


@torch.no_grad()
def keras_init_(module: nn.Module) -> nn.Module:
    """Re-initialise ``module`` in place with Keras defaults.

    Dense/Conv kernels: glorot_uniform, biases zero. Recurrent layers (``nn.RNN``/``LSTM``/``GRU``): glorot_uniform
    input kernels, orthogonal recurrent kernels, zero biases and, for LSTMs, forget-gate bias 1
    (``unit_forget_bias``). Normalisation and embedding layers keep their own initialisation. Any other parameter
    (e.g. ``MultiheadAttention.in_proj_weight``, a ``cls_token``) is left as it is, with a warning naming it.
    """
    for m in module.modules():
        if isinstance(m, KERNEL_LAYERS):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.RNNBase):
            for name, param in m.named_parameters():
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(param)
                elif name.startswith("weight_hh"):
                    for gate in param.chunk(param.shape[0] // m.hidden_size):  # one orthogonal block per gate
                        nn.init.orthogonal_(gate)
                elif name.startswith("bias"):
                    nn.init.zeros_(param)
                    if isinstance(m, nn.LSTM) and name.startswith("bias_ih"):
                        param[m.hidden_size : 2 * m.hidden_size] = 1.0  # gate order i, f, g, o
    warn_uncovered(module, (*KERNEL_LAYERS, nn.RNNBase), "keras_init_")
    return module


class LockedDropout(nn.Module):
    """Dropout with ONE mask per sequence, shared by all time steps (Keras' recurrent ``dropout``).

    The notes: a mask that changes at every step disrupts the error signal through time; the same mask
    at every step regularises without that harm. Input is batch-first ``(B, T, F)``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1.0 - self.p)
        return x * keep.div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ---- Keras' he_normal, BatchNorm and 'same' convolution (the book's CIFAR networks) -----------------------------

TRUNCATED_NORMAL_STD = 0.87962566103423978
"""Standard deviation of a unit normal truncated to [-2, 2]; tf.keras divides the target std by it."""


@torch.no_grad()
def he_normal_(tensor: Tensor) -> Tensor:
    """tf.keras ``he_normal`` in place: a normal truncated at 2 std whose std AFTER truncation is sqrt(2 / fan_in).

    (``VarianceScaling(2.0, 'fan_in', 'truncated_normal')``: the untruncated std is sqrt(2 / fan_in) / 0.8796...)
    fan_in is ``in_features`` for a Linear weight and ``in_channels * kh * kw`` for a Conv weight.
    """
    if tensor.dim() < 2:
        raise ValueError(f"he_normal_ needs a weight with at least 2 dims, got shape {tuple(tensor.shape)}")
    fan_in = tensor.shape[1] * math.prod(tensor.shape[2:])
    std = math.sqrt(2.0 / fan_in) / TRUNCATED_NORMAL_STD
    return nn.init.trunc_normal_(tensor, 0.0, std, -2.0 * std, 2.0 * std)


@torch.no_grad()
def he_normal_init_(module: nn.Module) -> nn.Module:
    """The book's CIFAR initialisation: he_normal Conv2d/Linear kernels, zero biases; normalisation layers keep
    theirs (gamma 1, beta 0). Any other parameter is left as it is, with a warning naming it."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            he_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    warn_uncovered(module, (nn.Conv2d, nn.Linear), "he_normal_init_")
    return module


BATCH_NORM_SETTINGS: dict[str, dict[str, float]] = {
    "torch": {"eps": 1e-5, "momentum": 0.1},
    "keras": {"eps": 1e-3, "momentum": 0.01},
}
"""``nn.BatchNorm`` arguments per style. Keras' ``BatchNormalization()`` keeps 0.99 of the running statistics per
step (PyTorch's momentum 0.01) and adds eps 1e-3; PyTorch's defaults keep 0.9 and add 1e-5."""


def batch_norm_settings(style: BatchNormName) -> dict[str, float]:
    """``eps`` and ``momentum`` of a BatchNorm ``style``; a ``ValueError`` names the choices."""
    if style not in BATCH_NORM_SETTINGS:
        raise ValueError(f"batch_norm={style!r}: choose 'torch' (PyTorch's defaults) or 'keras'.")
    return BATCH_NORM_SETTINGS[style]


def batch_norm2d(channels: int, style: BatchNormName = "torch") -> nn.BatchNorm2d:
    """``nn.BatchNorm2d`` with PyTorch's defaults, or with ``style="keras"`` Keras' (momentum 0.99, eps 1e-3)."""
    return nn.BatchNorm2d(channels, **batch_norm_settings(style))


def set_batch_norm_style_(module: nn.Module, style: BatchNormName) -> nn.Module:
    """Give every BatchNorm layer of ``module`` the eps and momentum of ``style``, in place."""
    settings = batch_norm_settings(style)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm):
            m.eps, m.momentum = settings["eps"], settings["momentum"]
    return module


def batch_norm_of_old_checkpoint(module: nn.Module, checkpoint: dict) -> None:
    """For ``on_load_checkpoint``: a checkpoint saved before the ``batch_norm`` argument existed was trained with
    Keras' BatchNorm (then the only one); rebuild its layers so, and record it in ``module.hparams``."""
    hparams = checkpoint.get("hyper_parameters")
    if hparams is not None and "batch_norm" not in hparams:
        set_batch_norm_style_(module, "keras")
        module.hparams["batch_norm"] = "keras"


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding of one spatial dim: ``(before, after)``, the odd extra pixel after (bottom/right)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``Conv2D(padding='same')`` as Keras does it: output size ceil(in / stride), padding bottom/right first.

    With stride 1 and an odd kernel the padding is symmetric and static (plain ``padding=k // 2``). Otherwise it is
    computed per input size: a 3x3 stride-2 conv on a 32x32 map pads (top 0, bottom 1, left 0, right 1), where
    PyTorch's ``padding=1`` would pad one pixel on every side and shift the sampling grid by one pixel; a 1x1
    stride-2 conv on an even map pads nothing.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True
    ) -> None:
        static = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2 if static else 0, bias=bias
        )
        self.dynamic_padding = not static

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_padding:
            top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
            left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)
