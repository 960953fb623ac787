"""Train/validation splits of a training set: a seeded hold-out (``val_size``) or one fold of a seeded k-fold.

Every datamodule with a train/val split (MNIST, CIFAR-10, image folders, digits, IMDB, diabetes) takes the same
cross-validation options:

- ``fold``: ``None`` (default) holds out ``val_size`` samples with a seeded shuffle; ``k`` in ``0 .. num_folds - 1``
  makes the k-th of ``num_folds`` folds the validation part and the other folds the training part (``val_size``
  is then unused);
- ``num_folds``: the number of folds K (at least 2).

The folds come from a shuffle seeded with the datamodule's ``seed``, stratified by class where the samples have
class labels (scikit-learn's ``StratifiedKFold``; ``KFold`` for regression targets or ``stratify_folds=False``).
So the K runs ``fold=0 .. K-1`` of one seed validate on disjoint parts that together cover the training split,
and each can be its own job (``--data.init_args.fold 2 --data.init_args.num_folds 5``). The test split is never
touched, and the normalisation statistics (the vocabulary for text) come from the fold's training part only.

Where samples come in groups that must not straddle the split (IMDB's reviews of one film: ``val_by_film``), both
the hold-out and the folds take whole groups (scikit-learn's ``GroupShuffleSplit`` and ``StratifiedGroupKFold`` /
``GroupKFold``); the hold-out then holds about ``val_size`` samples.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, KFold, StratifiedGroupKFold, StratifiedKFold
from torch import Tensor


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded shuffled split of ``range(n)`` into (train, val); ``val_size`` is a count or a fraction."""
    n_val = round(val_size * n) if isinstance(val_size, float) else int(val_size)
    if not 0 <= n_val < n:
        raise ValueError(
            f"val_size={val_size} asks for {n_val} validation samples out of {n} training samples; "
            "pass a count below the training-set size or a fraction in [0, 1)."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def part_size(value: int | float, total: int, what: str) -> int:
    """How many of ``total`` items a split part takes: a count, or a fraction of ``total`` (rounded, at least 1 when
    the fraction is positive), below ``total``."""
    n = max(1, round(value * total)) if isinstance(value, float) and value > 0 else int(value)
    if not 0 <= n < total:
        raise ValueError(f"{what}={value} asks for {n} of {total}; pass a smaller count or a fraction in [0, 1).")
    return n


def check_fold(fold: int | None, num_folds: int) -> None:
    """Raise a ``ValueError`` naming the fix when ``fold`` / ``num_folds`` cannot describe one fold of a k-fold."""
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(
            f"num_folds={num_folds!r}: k-fold cross-validation needs a whole number of at least 2 folds; set "
            "--data.init_args.num_folds to 2 or more."
        )
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds):
        raise ValueError(
            f"fold={fold!r} with num_folds={num_folds}: folds are numbered 0 to {num_folds - 1}; set "
            f"--data.init_args.fold to one of them (or raise --data.init_args.num_folds), or leave fold unset "
            "for the val_size hold-out."
        )


def fold_indices(
    targets: Tensor | np.ndarray,
    fold: int,
    num_folds: int,
    seed: int,
    stratify: bool = True,
    groups: Tensor | np.ndarray | None = None,
) -> tuple[Tensor, Tensor]:
    """(train, val) indices into ``targets`` for fold ``fold`` of a seeded ``num_folds``-fold split.

    The val indices of folds ``0 .. num_folds - 1`` are disjoint and cover ``range(len(targets))``; with
    ``stratify`` each fold keeps the class proportions of ``targets`` (class labels), as far as whole ``groups``
    allow when they are given. Both are sorted.
    """
    check_fold(fold, num_folds)
    targets = targets.numpy() if isinstance(targets, Tensor) else np.asarray(targets)
    if num_folds > len(targets):
        raise ValueError(
            f"num_folds={num_folds}: more folds than the {len(targets)} training samples; lower "
            "--data.init_args.num_folds."
        )
    if groups is None:
        splitter = (StratifiedKFold if stratify else KFold)(n_splits=num_folds, shuffle=True, random_state=seed)
    else:
        groups = np.asarray(groups)
        n_groups = len(np.unique(groups))
        if num_folds > n_groups:
            raise ValueError(
                f"num_folds={num_folds}: more folds than the {n_groups} groups of the training samples; lower "
                "--data.init_args.num_folds."
            )
        kind = StratifiedGroupKFold if stratify else GroupKFold
        splitter = kind(n_splits=num_folds, shuffle=True, random_state=seed)
    train, val = next(itertools.islice(splitter.split(np.zeros(len(targets)), targets, groups), fold, None))
    return torch.from_numpy(train).long(), torch.from_numpy(val).long()


def train_val_indices(
    targets: Tensor | np.ndarray,
    val_size: int | float,
    seed: int,
    fold: int | None = None,
    num_folds: int = 5,
    stratify: bool = True,
    groups: Tensor | np.ndarray | None = None,
) -> tuple[Tensor, Tensor]:
    """The datamodules' train/val split of a training set with these ``targets``: the ``val_size`` hold-out when
    ``fold`` is ``None``, else the fold; with ``groups`` (a group id per sample) no group straddles the two parts
    (see the module docstring)."""
    if fold is not None:
        return fold_indices(targets, fold, num_folds, seed, stratify, groups)
    if groups is None:
        return split_indices(len(targets), val_size, seed)
    return group_split_indices(groups, val_size, seed)


def group_split_indices(groups: Tensor | np.ndarray, val_size: int | float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded (train, val) split of whole ``groups``, with about ``val_size`` samples (a count or a fraction)
    in val; both sorted."""
    groups = np.asarray(groups)
    n_val = part_size(val_size, len(groups), "val_size")
    if n_val == 0:
        return torch.arange(len(groups)), torch.zeros(0, dtype=torch.long)
    splitter = GroupShuffleSplit(n_splits=1, test_size=n_val / len(groups), random_state=seed)
    train, val = next(splitter.split(np.zeros(len(groups)), groups=groups))
    return torch.from_numpy(np.sort(train)).long(), torch.from_numpy(np.sort(val)).long()
