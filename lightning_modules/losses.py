"""Losses matched to the output layer, as the notes prescribe, plus the two imbalance-aware variants.

- ``multiclass``: N logits, softmax + cross-entropy. Integer targets give Keras' *sparse* categorical CE,
  float one-hot (or soft) rows give *categorical* CE: the same loss, two label formats.
- ``binary``: one logit, sigmoid + binary cross-entropy.
- ``regression``: one linear output, mean squared error.

Networks return logits; the softmax/sigmoid lives inside the loss (numerically safer, same maths).
``prob_clip`` reproduces Keras' clipping of probabilities to ``[eps, 1 - eps]`` (1e-7 in Keras); 0 disables it.

The notes' three classification losses (``loss=`` of :func:`task_loss`):

- ``ce``: the plain cross-entropy above; every sample counts the same.
- ``balanced_ce``: each sample's CE is multiplied by the weight of its class. The weights default to the
  inverse class frequencies of the *training split* (:func:`balanced_class_weights`, scikit-learn's
  ``"balanced"`` rule ``n / (C * n_c)``, so a balanced set gets all-ones); the batch loss is the plain mean of the
  weighted terms (Keras ``class_weight``). It separates frequent from rare classes, not easy from hard samples.
- ``focal``: Lin et al. 2017, ``-alpha_t (1 - p_t)^gamma log p_t``: the factor ``(1 - p_t)^gamma`` down-weights
  well-classified (easy) samples so the rare, hard ones drive training. ``alpha=0.25, gamma=2`` are the
  values the notes (and the paper) found best. ``gamma=0, alpha=None`` is exactly CE. The binary form is
  :func:`torchvision.ops.sigmoid_focal_loss`; the multi-class form applies the same factor to the softmax
  probability of the true class (``alpha`` a scalar, or per-class weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

Task = Literal["multiclass", "binary", "regression"]
LossName = Literal["ce", "balanced_ce", "focal"]
LOSSES = ("ce", "balanced_ce", "focal")


def _clip_log(log_p: Tensor, prob_clip: float) -> Tensor:
    return log_p.clamp(math.log(prob_clip), math.log1p(-prob_clip)) if prob_clip > 0 else log_p


def balanced_class_weights(counts: Sequence[int] | Tensor) -> Tensor:
    """Per-class weights ``n / (C * n_c)`` from class counts (scikit-learn's ``class_weight="balanced"``).

    A class absent from the training split gets weight 0 (it cannot be weighted up from nothing) and a warning
    is the caller's business; all-equal counts give all-ones, so ``balanced_ce`` is ``ce`` on balanced data.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or len(counts) < 2 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"class counts {counts.tolist()}: need one non-negative count per class (at least 2).")
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def class_counts(targets: Tensor, num_classes: int) -> Tensor:
    """Counts per class of integer labels, or of one-hot / soft rows (summed)."""
    targets = torch.as_tensor(targets)
    if targets.is_floating_point() and targets.ndim == 2:
        return targets.sum(0).round().long()
    return torch.bincount(targets.reshape(-1).long(), minlength=num_classes)[:num_classes]


def training_class_counts(datamodule: Any, num_classes: int) -> Tensor:
    """Class counts of a datamodule's training split, for ``balanced_ce``.

    Asks ``datamodule.class_counts()`` when the datamodule defines it, else counts ``datamodule.train_set.targets``
    (what :class:`~datamodules.base.ImageDataModule` keeps after ``setup("fit")``). Only the training split is
    read: validation and test labels never influence training (the notes' rule for every statistic).
    """
    if datamodule is not None and callable(getattr(datamodule, "class_counts", None)):
        return torch.as_tensor(datamodule.class_counts()).long()
    targets = getattr(getattr(datamodule, "train_set", None), "targets", None)
    if targets is None:
        raise ValueError(
            f"loss='balanced_ce' needs the training split's class frequencies, but {type(datamodule).__name__} "
            "exposes neither class_counts() nor train_set.targets. Pass the weights explicitly with "
            "--model.init_args.class_weights '[w0, w1, ...]', or give the datamodule a class_counts() method."
        )
    return class_counts(targets, num_classes)


def focal_loss_multiclass(
    logits: Tensor,
    target: Tensor,
    alpha: float | Tensor | None = 0.25,
    gamma: float = 2.0,
    prob_clip: float = 0.0,
) -> Tensor:
    """Per-sample multi-class focal loss ``-sum_c y_c alpha_c (1 - p_c)^gamma log p_c`` (integer or soft targets).

    ``alpha`` is a scalar (the same for every class, as in the paper's multi-class use), a ``(C,)`` tensor of
    per-class weights, or ``None`` (no weighting). ``(1 - p)^gamma`` is computed as ``-expm1(log p)`` so it stays
    exact near ``p = 1`` and its gradient stays finite at ``p -> 0`` and ``p -> 1``.
    """
    log_p = _clip_log(F.log_softmax(logits.float(), dim=-1), prob_clip)
    one_hot = target.float() if target.is_floating_point() else F.one_hot(target, logits.shape[-1]).float()
    modulator = (-torch.expm1(log_p)).clamp_min(0).pow(gamma) if gamma else torch.ones_like(log_p)
    terms = -one_hot * modulator * log_p
    if alpha is not None:
        terms = terms * torch.as_tensor(alpha, dtype=terms.dtype, device=terms.device)
    return terms.sum(dim=-1)


def focal_loss_binary(logits: Tensor, target: Tensor, alpha: float | None = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-sample binary focal loss: torchvision's ``sigmoid_focal_loss`` (``alpha`` weighs positives by
    ``alpha`` and negatives by ``1 - alpha``; ``None`` disables it)."""
    return sigmoid_focal_loss(logits, target, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="none")


def smooth_labels(target: Tensor, num_classes: int, eps: float) -> Tensor:
    """Integer labels or soft rows -> rows with ``1 - eps`` of their mass kept and ``eps`` spread over all classes."""
    if not 0 <= eps < 1:
        raise ValueError(f"label_smoothing={eps} must lie in [0, 1).")
    rows = target.float() if target.is_floating_point() else F.one_hot(target, num_classes).float()
    return rows * (1 - eps) + eps / num_classes


def _check_one_hot(logits: Tensor, target: Tensor) -> None:
    if target.shape != logits.shape:
        raise ValueError(
            f"one-hot targets of shape {tuple(target.shape)} do not match logits {tuple(logits.shape)}: "
            "the data's class count and the model's num_classes differ."
        )


def task_loss(
    logits: Tensor,
    target: Tensor,
    task: Task,
    prob_clip: float = 0.0,
    loss: LossName = "ce",
    class_weights: Tensor | None = None,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The loss that matches ``task``'s output layer (mean over the batch); see the module docstring.

    Args:
        logits: ``(B, C)`` for multiclass, ``(B, 1)``/``(B,)`` for binary and regression.
        target: Integer labels, or one-hot/soft float rows (multiclass); 0/1 labels (binary); values (regression).
        task: ``multiclass``, ``binary`` or ``regression``.
        prob_clip: Keras' probability clipping in the cross-entropies (0 disables it).
        loss: ``ce``, ``balanced_ce`` or ``focal`` (classification only; regression always uses MSE).
        class_weights: ``(C,)`` weights for ``balanced_ce`` (binary: ``(2,)``, negatives then positives).
        alpha: Focal loss class balance (binary: weight of positives; multiclass: a scalar factor).
        gamma: Focal loss focusing parameter; 0 with ``alpha=None`` is plain CE.
        label_smoothing: Multiclass only: the target puts ``1 - eps`` on its class and spreads ``eps`` evenly over
            all classes (Szegedy et al. 2016; ``torch.nn.functional.cross_entropy``'s ``label_smoothing``), for
            integer and soft targets alike. 0 disables it.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: choose one of {', '.join(LOSSES)}.")
    if task == "regression":
        if loss != "ce":
            raise ValueError(f"loss={loss!r} is a classification loss; a regression task uses MSE (loss='ce').")
        return F.mse_loss(logits.float().reshape(target.shape), target.float())
    if loss == "balanced_ce" and class_weights is None:
        raise ValueError(
            "loss='balanced_ce' needs class_weights (the base module derives them from the training split)."
        )
    if label_smoothing and task != "multiclass":
        raise ValueError(f"label_smoothing={label_smoothing} applies to multiclass tasks only, not {task!r}.")
    if task == "multiclass":
        if target.is_floating_point():
            _check_one_hot(logits, target)
        if label_smoothing:
            if not target.is_floating_point() and loss == "ce" and not prob_clip:
                return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
            target = smooth_labels(target, logits.shape[-1], label_smoothing)
        if loss == "focal":
            return focal_loss_multiclass(logits, target, alpha, gamma, prob_clip).mean()
        log_p = _clip_log(F.log_softmax(logits.float(), dim=-1), prob_clip)
        if target.is_floating_point():
            terms = -target * log_p
            if loss == "balanced_ce":
                terms = terms * class_weights.to(terms)
            return terms.sum(dim=-1).mean()
        if loss == "balanced_ce":  # mean of w_y * CE (Keras class_weight), not nll_loss's sum(w)-normalised mean
            return (F.nll_loss(log_p, target, reduction="none") * class_weights.to(log_p)[target]).mean()
        return F.nll_loss(log_p, target)
    if task == "binary":
        logits, target = logits.float().reshape(-1), target.float().reshape(-1)
        if loss == "focal":
            return focal_loss_binary(logits, target, alpha, gamma).mean()
        if prob_clip == 0:
            terms = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            log_p, log_q = _clip_log(F.logsigmoid(logits), prob_clip), _clip_log(F.logsigmoid(-logits), prob_clip)
            terms = -(target * log_p + (1 - target) * log_q)
        if loss == "balanced_ce":
            weights = class_weights.to(terms)
            terms = terms * (weights[0] + (weights[1] - weights[0]) * target)
        return terms.mean()
    raise ValueError(f"Unknown task {task!r}; choose 'multiclass', 'binary' or 'regression'.")
