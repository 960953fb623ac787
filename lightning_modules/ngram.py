"""A fast, strong text baseline: logistic regression on bags of word n-grams, optionally Naive-Bayes weighted.

NB-weighted logistic regression (Wang & Manning 2012's NBSVM idea with a logistic loss): each n-gram feature
``f_j`` of a review is scaled by its Naive-Bayes log-count ratio

    r = log((p / ||p||_1) / (q / ||q||_1)),   p = alpha + sum of f over positive training reviews,
                                              q = alpha + sum of f over negative training reviews,

and a linear model is trained on the scaled features: ``logit = b + sum_j w_j r_j f_j``. The ratio tells the
model up front which n-grams carry sentiment, so a few epochs over uni+bigram bags beat the book's multi-hot MLP.
The bags come from ``IMDBDataModule(representation="ngrams")`` as zero-padded index rows; the weights are one
``nn.EmbeddingBag(padding_idx=0)`` of width 1, so a batch costs its n-grams, never a dense 25k x 1M matrix.

``r`` is a statistic of the training reviews only (the notes: train-only statistics, applied unchanged to
validation and test). It is computed when ``fit`` starts from the datamodule's whole training part, which every DDP
rank holds identically, so every rank computes the same ``r`` without communication; it is a buffer, so checkpoints
carry it and ``validate``/``test``/``predict`` from a checkpoint score exactly as training did.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from lightning_modules.base import SupervisedModule
from lightning_modules.losses import Task


def nb_log_count_ratio(flat: Tensor, offsets: Tensor, labels: Tensor, num_features: int, alpha: float = 1.0) -> Tensor:
    """``(num_features,)`` Naive-Bayes log-count ratios of bags ``flat[offsets[i]:offsets[i + 1]]`` with 0/1
    ``labels`` (a repeated index counts as often as it appears). Index 0 (padding) gets 0."""
    if alpha <= 0:
        raise ValueError(f"nb_alpha={alpha}: the smoothing count must be > 0 (1 is Laplace smoothing).")
    if len(labels) == 0 or labels.min() < 0 or labels.max() > 1:
        raise ValueError("The NB ratio needs binary labels (0 negative, 1 positive) and at least one document.")
    label_of_entry = torch.repeat_interleave(labels.long(), offsets.diff(), output_size=len(flat))
    flat = flat.long()
    p = alpha + torch.bincount(flat[label_of_entry == 1], minlength=num_features)[:num_features].double()
    q = alpha + torch.bincount(flat[label_of_entry == 0], minlength=num_features)[:num_features].double()
    ratio = (p / p.sum()).log() - (q / q.sum()).log()
    ratio[0] = 0.0
    return ratio.float()


class NGramClassifier(SupervisedModule):
    """Binary logistic regression on n-gram bags, with Naive-Bayes feature weighting (NB-LR) when ``nb_weighting``.

    Args:
        input_shape: ``(size of the n-gram index space,)``: the datamodule's ``max_ngrams``.
        nb_weighting: Scale every feature by the NB log-count ratio of the training reviews (off: plain
            bag-of-n-grams logistic regression).
        nb_alpha: Smoothing count added to every feature's per-class count.
        **kwargs: See :class:`~lightning_modules.base.SupervisedModule` (optimizer, ``l2`` on the n-gram weights,
            ...).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1_000_000,),
        nb_weighting: bool = True,
        nb_alpha: float = 1.0,
        task: Task = "binary",
        num_classes: int = 2,
        **kwargs,
    ) -> None:
        if task != "binary":
            raise ValueError(f"task={task!r}: NGramClassifier is a binary classifier (one logit, the NB ratio).")
        if len(input_shape) != 1 or input_shape[0] < 3:
            raise ValueError(f"input_shape={list(input_shape)}: give [size of the n-gram index space], e.g. [1000000].")
        if nb_alpha <= 0:
            raise ValueError(f"nb_alpha={nb_alpha}: the smoothing count must be > 0 (1 is Laplace smoothing).")
        super().__init__(task=task, num_classes=num_classes, input_shape=input_shape, **kwargs)
        num_features = self.input_shape[0]
        self.net = nn.EmbeddingBag(num_features, 1, mode="sum", padding_idx=0)
        nn.init.zeros_(self.net.weight)  # start at chance; the NB ratio gives the first steps their direction
        self.bias = nn.Parameter(torch.zeros(1))
        self.register_buffer("nb_ratio", torch.ones(num_features))
        self.example_input_array = torch.zeros(2, 1, dtype=torch.int64)  # two bags of padding only

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L)`` n-gram indices, 0-padded -> ``(B, 1)`` logits."""
        x = x.long()
        weights = self.nb_ratio[x] if self.hparams.nb_weighting else None
        return self.net(x, per_sample_weights=weights) + self.bias

    def regularized_weights(self) -> Iterator[Tensor]:
        """``l1``/``l2``/``max_norm`` act on the n-gram weights."""
        return iter([self.net.weight])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.nb_weighting:
            self.nb_ratio.copy_(self.training_nb_ratio())

    def training_nb_ratio(self) -> Tensor:
        """The NB ratio of the datamodule's training part (all of it: identical on every DDP rank)."""
        datamodule = self.trainer.datamodule
        train_dataset = getattr(datamodule, "train_dataset", None)
        if train_dataset is None:
            raise ValueError(
                "nb_weighting needs the training reviews' n-gram bags before training: use a datamodule with "
                "train_dataset() (IMDBDataModule with representation: ngrams), or set "
                "--model.init_args.nb_weighting false."
            )
        bags = train_dataset()
        if not hasattr(bags, "offsets"):
            raise ValueError(
                f"{type(datamodule).__name__}.train_dataset() holds no n-gram bags: set "
                "--data.init_args.representation ngrams."
            )
        return nb_log_count_ratio(bags.flat, bags.offsets, bags.targets, self.input_shape[0], self.hparams.nb_alpha)
