"""Muon for convolution filters and Nesterov SGD for the other parameters, as one optimiser.

Muon (Keller Jordan, 2024) steps a weight matrix along the orthogonalised momentum of its gradient: the
nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations. airbench94_muon trains the
airbench network's conv filters this way (and its biases and head with SGD) and reports reaching in 8 epochs the
accuracy airbench94's SGD reaches in 10 (docs/fast_recipes.md has our measurement).

``torch.optim.Muon`` does this for 2-D parameters only; conv filter banks ``(out, in, kh, kw)`` are matrices
``(out, in * kh * kw)`` to Muon, and Lightning's automatic optimisation steps a single optimiser. So
:class:`FilterMuon` is one ``torch.optim.Optimizer`` whose groups marked ``muon=True`` take the Muon step (any
number of dimensions, flattened after the first) and whose other groups take ``torch.optim.sgd.sgd``'s Nesterov
step. Its state (the momentum buffers) is ordinary optimiser state: checkpoints and resumes keep it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd

# torch.optim.Muon's default quintic coefficients (steepest slope at zero; see its docstring).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: Tensor, steps: int, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Newton-Schulz approximation of ``U V^T`` for ``matrix = U S V^T``, computed in ``dtype`` (torch.optim.Muon:
    bfloat16).

    The quintic does not converge to exactly 1 on every singular value: the result is ``U S' V^T`` with ``S'``
    scattered around 1, which Muon's authors found trains as well as the exact ``U V^T``.
    """
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):  # x <- a x + (b G + c G^2) x with G = x x^T, in torch.optim.Muon's operations
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if transposed else x


class FilterMuon(torch.optim.Optimizer):
    """Muon on the groups marked ``muon=True``, Nesterov SGD with weight decay on the others.

    A Muon step of a parameter ``w`` with gradient ``g``: ``buf = momentum * buf + g``; ``u = g + momentum * buf``
    (Nesterov); with ``normalize``, ``w`` is first rescaled to Frobenius norm ``sqrt(w.shape[0])`` (airbench's
    weight normalisation, which makes weight decay unnecessary); then ``w -= lr * orthogonalize(u)`` with ``u``
    seen as ``(w.shape[0], -1)``. Muon groups ignore ``weight_decay``.

    Args:
        params: Parameter groups; a group's ``muon`` (default False) picks its update.
        lr: Default learning rate.
        momentum: SGD momentum (Nesterov) of the non-Muon groups.
        weight_decay: SGD weight decay of the non-Muon groups (torch's: multiplied by the group's lr).
        muon_momentum: Momentum of the Muon groups.
        ns_steps: Newton-Schulz iterations per Muon step.
        normalize: Rescale each Muon parameter before its step, as above.
        ns_dtype: ``bfloat16`` (fast, as torch.optim.Muon and airbench) or ``float32``: the Newton-Schulz
            iterations' precision. bfloat16 rounds the update's entries to about 3 significant digits, so runs that
            differ only in float rounding (a DDP run and a single-process one) drift apart by about 1e-3.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.85,
        weight_decay: float = 0.0,
        muon_momentum: float = 0.6,
        ns_steps: int = 3,
        normalize: bool = True,
        ns_dtype: str = "bfloat16",
    ) -> None:
        if ns_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"FilterMuon(ns_dtype={ns_dtype!r}): choose 'bfloat16' or 'float32'.")
        if lr < 0 or not 0 <= momentum < 1 or not 0 <= muon_momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(
                f"FilterMuon(lr={lr}, momentum={momentum}, muon_momentum={muon_momentum}, weight_decay="
                f"{weight_decay}, ns_steps={ns_steps}): need lr >= 0, momenta in [0, 1), weight_decay >= 0 and "
                "ns_steps >= 1."
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            muon=False,
            muon_momentum=muon_momentum,
            ns_steps=ns_steps,
            normalize=normalize,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            flat = [tuple(p.shape) for p in group["params"] if group["muon"] and p.ndim < 2]
            if flat:
                raise ValueError(f"FilterMuon: a muon=True group holds parameters of shapes {flat}; Muon needs >= 2-D.")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(params, group)
                continue
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            sgd(
                params,
                [p.grad for p in params],
                buffers,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=0.0,
                nesterov=True,
                maximize=False,
            )
            for p, buffer in zip(params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buffer
        return loss

    def _muon_step(self, params: list[Tensor], group: dict[str, Any]) -> None:
        momentum = group["muon_momentum"]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buffer = state["momentum_buffer"]
            buffer.mul_(momentum).add_(p.grad)
            update = p.grad.add(buffer, alpha=momentum)
            if group["normalize"]:
                p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-12))
            dtype = getattr(torch, group["ns_dtype"])
            direction = orthogonalize(update.reshape(len(p), -1), group["ns_steps"], dtype=dtype)
            p.add_(direction.reshape(p.shape).to(p.dtype), alpha=-group["lr"])


__all__ = ["NS_COEFFICIENTS", "FilterMuon", "orthogonalize"]
