"""Small building blocks shared by the topic modules: activations by name, Keras initialisation, locked dropout."""

from __future__ import annotations

from typing import Literal

import torch
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


InitName = Literal["keras", "torch"]


@torch.no_grad()
def keras_init_(module: nn.Module) -> nn.Module:
    """Re-initialise ``module`` in place with Keras defaults.

    Dense/Conv kernels: glorot_uniform, biases zero. Recurrent layers: glorot_uniform input kernels,
    orthogonal recurrent kernels, zero biases and, for LSTMs, forget-gate bias 1 (``unit_forget_bias``).
    BatchNorm and Embedding layers keep their own initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.ConvTranspose2d):
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
        mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1.0 - self.p).div_(1.0 - self.p)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"
