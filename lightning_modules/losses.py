"""Losses matched to the output layer, as the notes prescribe.

- ``multiclass``: N logits, softmax + cross-entropy. Integer targets give Keras' *sparse* categorical CE,
  float one-hot (or soft) rows give *categorical* CE: the same loss, two label formats.
- ``binary``: one logit, sigmoid + binary cross-entropy.
- ``regression``: one linear output, mean squared error.

Networks return logits; the softmax/sigmoid lives inside the loss (numerically safer, same maths).
``prob_clip`` reproduces Keras' clipping of probabilities to ``[eps, 1 - eps]`` (1e-7 in Keras); 0 disables it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

Task = Literal["multiclass", "binary", "regression"]


def _clip_log(log_p: Tensor, prob_clip: float) -> Tensor:
    return log_p.clamp(math.log(prob_clip), math.log1p(-prob_clip)) if prob_clip > 0 else log_p


def task_loss(logits: Tensor, target: Tensor, task: Task, prob_clip: float = 0.0) -> Tensor:
    """The loss that matches ``task``'s output layer; see the module docstring."""
    if task == "multiclass":
        log_p = _clip_log(F.log_softmax(logits.float(), dim=-1), prob_clip)
        if target.is_floating_point():
            if target.shape != logits.shape:
                raise ValueError(
                    f"one-hot targets of shape {tuple(target.shape)} do not match logits {tuple(logits.shape)}: "
                    "the data's class count and the model's num_classes differ."
                )
            return -(target * log_p).sum(dim=-1).mean()
        return F.nll_loss(log_p, target)
    if task == "binary":
        logits, target = logits.float().reshape(-1), target.float().reshape(-1)
        if prob_clip == 0:
            return F.binary_cross_entropy_with_logits(logits, target)
        log_p, log_q = _clip_log(F.logsigmoid(logits), prob_clip), _clip_log(F.logsigmoid(-logits), prob_clip)
        return -(target * log_p + (1 - target) * log_q).mean()
    if task == "regression":
        return F.mse_loss(logits.float().reshape(target.shape), target.float())
    raise ValueError(f"Unknown task {task!r}; choose 'multiclass', 'binary' or 'regression'.")
