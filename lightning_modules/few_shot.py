"""Few-shot learning (notes: *Meta Learning / Few-Shot Learning*): label queries by comparing them with a support set.

An episode gives N classes ("N-way") with K labelled examples each ("K-shot", the *support set*) and queries to
label. Nothing is learnt about those N classes: the model learns, over many training episodes of other classes,
an embedding in which "compare with the support set" works.

Prototypical networks (Snell, Swersky & Zemel, 2017): embed with 4 x [Conv 64 k3 'same' -> BatchNorm -> ReLU ->
MaxPool 2] (a 28x28 image becomes 64 numbers), average each class's support embeddings into a *prototype*, and
score a query by minus its squared Euclidean distance to every prototype; softmax + cross-entropy on the queries
is the training loss. Training episodes may have more classes than test ones (Snell et al.: 60-way training for
5- and 20-way tests, shot as at test time); the network has no layer whose width depends on N or K. Adam 1e-3,
halved every 2,000 episodes. Reported on Omniglot: 5-way 1-shot 98.8 %, 5-shot 99.7 %, 20-way 1-shot 96.0 %,
5-shot 98.9 %.

The floor every result is compared with: :class:`NearestNeighbourBaseline`, 1-nearest-neighbour on raw pixels or
on an untrained encoder. Test metrics are the mean accuracy over many episodes with its 95 % confidence interval
(``test/acc``, ``test/acc_ci95``), the way few-shot papers report them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_modules.base import check_input_shape
from lightning_modules.optim import SchedulerInterval, SharedFactory, optimizers_from_factories, run_total_steps
from lightning_modules.tta import SYMMETRY_COUNTS, shift_averaged, symmetry_concatenated

Episode = dict[str, Tensor]


# ---- network and distances ---------------------------------------------------------------------------------------


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv 3x3 'same' -> BatchNorm -> ReLU -> MaxPool 2 (Snell et al.'s block; PyTorch BatchNorm defaults)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ProtoNetEncoder(nn.Sequential):
    """``blocks`` conv blocks of ``filters`` channels, flattened: (B, 1, 28, 28) -> (B, 64) with the defaults
    (28 -> 14 -> 7 -> 3 -> 1 pixels). ``filters`` may list each block's channels (``blocks`` is then its length),
    e.g. ``[32, 64, 128, 256]``: a 256-number embedding for less compute than 4 x 64 (the wide blocks are the
    small ones)."""

    def __init__(self, in_channels: int = 1, filters: int | Sequence[int] = 64, blocks: int = 4) -> None:
        widths = [filters] * blocks if isinstance(filters, int) else list(filters)
        if not widths or min(widths) < 1:
            raise ValueError(f"blocks={blocks}, filters={filters}: the encoder needs at least one block and filter.")
        layers = [conv_block(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:-1]], widths, strict=True)]
        super().__init__(*layers, nn.Flatten())


def squared_euclidean(x: Tensor, y: Tensor) -> Tensor:
    """``(n, d)``, ``(m, d)`` -> ``(n, m)`` squared Euclidean distances (exact: differences, not the expanded
    ``|x|^2 - 2xy + |y|^2``, which loses precision for close points)."""
    return (x.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(-1)


def prototypes(support: Tensor, labels: Tensor, way: int) -> Tensor:
    """Mean embedding of each class: ``(way * shot, d)`` with labels in ``[0, way)`` -> ``(way, d)``."""
    sums = torch.zeros(way, support.shape[1], dtype=support.dtype, device=support.device)
    sums.index_add_(0, labels, support)
    counts = torch.bincount(labels, minlength=way).clamp_min(1).to(support.dtype)
    return sums / counts.unsqueeze(1)


def nearest_neighbour_logits(support: Tensor, labels: Tensor, query: Tensor, way: int) -> Tensor:
    """Minus each query's squared distance to the NEAREST support example of each class: ``(q, way)``."""
    distances = squared_euclidean(query, support)  # (q, way * shot)
    best = torch.full((len(query), way), math.inf, dtype=distances.dtype, device=distances.device)
    best = best.scatter_reduce(1, labels.expand(len(query), -1), distances, reduce="amin")
    return -best


def all_pairs_logits(embeddings: Tensor, way: int) -> tuple[Tensor, Tensor]:
    """The logits and labels of :meth:`ProtoNet.column_pair_logits` from the embeddings of the one-shot episode it
    checked (its ``way`` support drawings, then its queries class by class)."""
    queries = embeddings[way:].reshape(way, len(embeddings) // way - 1, -1)
    grid = torch.cat([embeddings[:way, None], queries], 1).transpose(0, 1)  # (columns, way, d)
    # (to, from, way, way) as |a|^2 + |b|^2 - 2ab: ~40x faster on a CPU than exact differences (a loss, not a report)
    squares = grid.pow(2).sum(-1)
    distances = squares[:, None, :, None] + squares[None, :, None, :] - 2 * torch.einsum("iad,jbd->ijab", grid, grid)
    pairs = ~torch.eye(len(grid), dtype=torch.bool, device=grid.device)
    return -distances[pairs].reshape(-1, way), torch.arange(way, device=grid.device).repeat(int(pairs.sum()))


def mean_and_ci95(values: Tensor) -> tuple[float, float]:
    """Mean of per-episode accuracies and the half-width of its 95 % confidence interval, ``1.96 * std / sqrt(n)``
    (the normal interval few-shot papers report); NaN half-width with fewer than 2 episodes."""
    values = values.double()
    if len(values) < 2:
        return (float(values.mean()) if len(values) else math.nan), math.nan
    return float(values.mean()), float(1.96 * values.std(unbiased=True) / math.sqrt(len(values)))


def unique_episodes(episodes: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Sorted episode numbers, each once, with their ``values``: DDP's sampler pads the last round with repeats
    of the first episodes, which must not count twice in a mean over episodes."""
    order = torch.argsort(episodes, stable=True)
    episodes = episodes[order]
    first = torch.ones_like(episodes, dtype=torch.bool)
    first[1:] = episodes[1:] != episodes[:-1]
    return (episodes[first], *(v[order][first] for v in values))


# ---- modules -----------------------------------------------------------------------------------------------------


class FewShotModule(pl.LightningModule):
    """Base of the episodic modules: a subclass implements :meth:`logits` (query scores per episode class).

    Batches are episodes (see :class:`datamodules.omniglot.EpisodeDataset`): ``support``, ``support_labels``,
    ``query``, ``query_labels``. Validation logs ``val/acc`` (mean over episodes, synced across processes) and
    test logs ``test/acc`` with ``test/acc_ci95`` over all test episodes of all processes (DDP's padding repeats
    are counted once).

    Args:
        num_classes: N of the training episodes (N-way). No layer depends on it (any N runs, and test episodes
            may have another N); it is checked against the datamodule's ``train_way`` so that the checkpoint
            records the task the model was trained on.
        input_shape: ``(C, H, W)`` of one image; checked against the datamodule's ``dims``.
    """

    has_loss = True  # whether the scores are logits worth a cross-entropy (val/loss, test/loss)

    def __init__(self, num_classes: int = 60, input_shape: Sequence[int] = (1, 28, 28)) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: an episode needs at least 2 classes (N-way, N >= 2).")
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self._test_episodes: list[Tensor] = []
        self._test_accuracies: list[Tensor] = []
        self._test_losses: list[Tensor] = []

    def logits(self, episode: Episode) -> Tensor:
        """``(way * query, way)`` scores of each query for each episode class (higher = more likely)."""
        raise NotImplementedError

    @staticmethod
    def way(episode: Episode) -> int:
        return int(episode["support_labels"].max()) + 1

    def _evaluate(self, episode: Episode, stage: str) -> tuple[Tensor, Tensor]:
        logits = self.logits(episode)
        labels = episode["query_labels"]
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        # batch_size=1: each episode counts once, whatever its size.
        if self.has_loss:
            self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=1)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=1)
        return loss, accuracy

    def validation_step(self, episode: Episode, batch_idx: int) -> None:
        self._evaluate(episode, "val")

    def on_test_epoch_start(self) -> None:
        self._test_episodes, self._test_accuracies, self._test_losses = [], [], []

    def test_step(self, episode: Episode, batch_idx: int) -> None:
        logits = self.logits(episode)
        labels = episode["query_labels"]
        self._test_episodes.append(episode["episode"].reshape(1))
        self._test_accuracies.append((logits.argmax(-1) == labels).float().mean().reshape(1))
        self._test_losses.append(F.cross_entropy(logits, labels).reshape(1))

    def on_test_epoch_end(self) -> None:
        if not self._test_episodes:
            return
        # Every process holds its share; gather all (same count per rank: the sampler pads), keep each episode once.
        gathered = [
            self.all_gather(torch.cat(values)).reshape(-1)
            for values in (self._test_episodes, self._test_accuracies, self._test_losses)
        ]
        _, accuracies, losses = unique_episodes(*gathered)
        mean, ci95 = mean_and_ci95(accuracies)
        # Every process now holds the same numbers; sync_dist only averages identical values.
        metrics = {"test/acc": mean, "test/acc_ci95": ci95, "test/episodes": float(len(accuracies))}
        if self.has_loss:
            metrics["test/loss"] = float(losses.double().mean())
        self.log_dict(metrics, sync_dist=True)

    def predict_step(self, episode: Episode, batch_idx: int = 0) -> dict[str, Tensor]:
        """Labels (``0..way-1``, the order of the support classes) and class probabilities of the queries."""
        logits = self.logits(episode)
        return {"labels": logits.argmax(-1), "probabilities": logits.softmax(-1)}

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        name = type(datamodule).__name__
        check_input_shape(datamodule, self.input_shape, " (or change the datamodule's image_size)")
        data_way = getattr(datamodule, "num_classes", None)
        if stage == "fit" and data_way is not None and data_way != self.num_classes:
            raise ValueError(
                f"{name} draws {data_way}-way training episodes but the model was configured with num_classes="
                f"{self.num_classes}. Set --model.init_args.num_classes {data_way} (the N of training episodes)."
            )


class ProtoNet(FewShotModule):
    """Prototypical network: class prototypes = mean support embeddings, scores = minus squared distances.

    Args:
        filters: Channels of every conv block (64), or a list of each block's channels.
        blocks: Conv blocks (4; the length of ``filters`` when it is a list); each halves the image, so 28x28
            inputs end at 1x1.
        optimizer: Optimiser factory (Snell et al.: Adam, lr 1e-3).
        lr_scheduler: Optional scheduler factory, stepped per epoch (Snell et al. halve the rate every 2,000
            episodes: ``StepLR(step_size=2000 / train_episodes, gamma=0.5)``); ``ReduceLROnPlateau`` monitors
            ``val/loss``.
        scheduler_interval: When the scheduler steps: ``step``, ``epoch`` or ``auto`` (OneCycleLR, CyclicLR and
            LinearLR warm-ups per step, the others per epoch).
        tta_shift: Test-time augmentation at validation, test and predict: every image (support and query) is
            embedded as the mean embedding of its copies shifted by up to this many pixels in x and y
            (``(2 * tta_shift + 1) ** 2`` views; 0, the default, embeds the image alone). Training is unchanged.
        tta_symmetries: Test-time views of the whole episode at validation, test and predict: 1 (the default) the
            episode as drawn; 4 its four quarter turns; 8 those and the same turns of its mirror image. Support and
            query are turned alike and the distances are averaged over the views
            (:func:`~lightning_modules.tta.symmetry_concatenated`): an ensemble for a model trained on turned (and
            mirrored) episodes, e.g. Omniglot's ``rotations`` and ``mirrors``. Each view costs one more pass.
        centre_sets: Transductive scoring at validation, test and predict (off by default): the support embeddings
            and the query embeddings of an episode are each centred on their own mean before prototypes and
            distances are taken. When each set shares a style of its own (in Lake et al.'s runs one person drew
            every support drawing and another every query) and both hold the episode's classes in about equal
            numbers, the difference of the two means is that style, which centring removes. A query's label then
            depends on the episode's other queries, so it needs at least one query per class. Training is unchanged.
        all_pairs: Training loss over every pair of drawing columns (off by default). A one-shot training episode
            is a grid of drawings, one row per class and ``1 + query`` columns (the support, then each class's
            queries in the same order; in within-alphabet episodes a column is one person's drawings). With
            ``all_pairs`` every column in turn is the support set of every other column's drawings:
            ``(1 + query) * query`` one-shot problems from one pass of the encoder, instead of the ``query`` whose
            support is the first column. Needs one-shot training episodes. Evaluation is unchanged.
        **kwargs: ``num_classes``, ``input_shape``: see :class:`FewShotModule`.

    Support and query images go through the encoder in one batch, so BatchNorm's training statistics are the
    episode's (as in Snell et al.'s code); evaluation uses the running statistics.
    """

    evaluation_hparams = ("tta_shift", "tta_symmetries", "centre_sets")  # a test may set them for any checkpoint

    def __init__(
        self,
        filters: int | list[int] = 64,
        blocks: int = 4,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: SchedulerInterval = "auto",
        tta_shift: int = 0,
        tta_symmetries: int = 1,
        centre_sets: bool = False,
        all_pairs: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if tta_shift < 0:
            raise ValueError(f"tta_shift={tta_shift}: a number of pixels, 0 (no test-time augmentation) or more.")
        if tta_symmetries not in SYMMETRY_COUNTS:
            raise ValueError(
                f"tta_symmetries={tta_symmetries}: choose 1 (the episode as drawn), 4 (its quarter turns) or 8 "
                "(the quarter turns of the episode and of its mirror image)."
            )
        if tta_symmetries > 1 and self.input_shape[-1] != self.input_shape[-2]:
            raise ValueError(
                f"tta_symmetries={tta_symmetries} turns images by quarter turns, which needs square images; "
                f"input_shape is {list(self.input_shape)}. Use tta_symmetries 1, or resize the images to a square."
            )
        self.save_hyperparameters()
        self.tta_shift, self.tta_symmetries, self.centre_sets = tta_shift, tta_symmetries, centre_sets
        self.all_pairs = all_pairs
        self.encoder = ProtoNetEncoder(self.input_shape[0], filters, blocks)
        self.optimizer_factory = SharedFactory.wrap(optimizer)
        self.scheduler_factory = SharedFactory.wrap(lr_scheduler)
        self.example_input_array = torch.zeros(2, *self.input_shape)

    def forward(self, images: Tensor) -> Tensor:
        """Embeddings ``(B, d)`` of images ``(B, C, H, W)``."""
        return self.encoder(images)

    def embed(self, images: Tensor) -> Tensor:
        """Embeddings of images; in eval mode averaged over shifted copies when ``tta_shift`` > 0, and those of the
        ``tta_symmetries`` views concatenated."""
        if self.training:
            return self(images)
        shifted = partial(shift_averaged, self, radius=self.tta_shift)
        return symmetry_concatenated(shifted, images, self.tta_symmetries)

    def logits(self, episode: Episode) -> Tensor:
        support, query = episode["support"], episode["query"]
        embeddings = self.embed(torch.cat([support, query]))
        support_emb, query_emb = embeddings[: len(support)], embeddings[len(support) :]
        way = self.way(episode)
        if self.centre_sets and not self.training:
            if len(query_emb) < way:
                raise ValueError(
                    f"centre_sets scores the queries of an episode as a set centred on its mean, which needs at least "
                    f"one query per class: this episode has {len(query_emb)} queries for {way} classes. Pass more "
                    "queries at once, or turn centre_sets off."
                )
            support_emb, query_emb = support_emb - support_emb.mean(0), query_emb - query_emb.mean(0)
        centres = prototypes(support_emb, episode["support_labels"], way)
        return -squared_euclidean(query_emb, centres)

    def column_pair_logits(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """``all_pairs`` scores of a one-shot episode: for every ordered pair ``(i, j)`` of distinct columns of its
        ``(way, 1 + query)`` grid of drawings, minus the squared distances of column ``i``'s drawings to column ``j``'s
        (the support); ``(pairs * way, way)`` logits and their labels, pairs in row-major order."""
        support, query, way = episode["support"], episode["query"], self.way(episode)
        labels = torch.arange(way, device=support.device)
        columns = len(query) // way
        if not (
            torch.equal(episode["support_labels"], labels)
            and len(query) == columns * way
            and torch.equal(episode["query_labels"], labels.repeat_interleave(columns))
        ):
            raise ValueError(
                f"all_pairs trains on one-shot episodes with the same number of queries per class (one support "
                f"drawing per class, then each class's queries in turn); this episode has {len(support)} support "
                f"and {len(query)} query drawings for {way} classes. Set --data.init_args.train_shot 1, or "
                "--model.init_args.all_pairs false."
            )
        return all_pairs_logits(self.embed(torch.cat([support, query])), way)

    def training_step(self, episode: Episode, batch_idx: int) -> Tensor:
        if self.all_pairs:
            logits, labels = self.column_pair_logits(episode)
        else:
            logits, labels = self.logits(episode), episode["query_labels"]
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=1)
        self.log("train/acc", accuracy, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        return loss

    def configure_optimizers(self):
        parameters = (p for p in self.parameters() if p.requires_grad)
        interval = self.hparams.get("scheduler_interval", "auto")
        return optimizers_from_factories(
            self.optimizer_factory, self.scheduler_factory, parameters, interval, lambda: run_total_steps(self.trainer)
        )


class NearestNeighbourBaseline(FewShotModule):
    """1-nearest-neighbour on raw pixels or on an untrained encoder: the floor a trained model must clear.

    A query takes the class of its nearest support example (squared Euclidean distance). Nothing is trained:
    run it with ``validate`` or ``test``. With one shot, nearest neighbour and nearest prototype coincide, so on
    ``features="random_encoder"`` it shows what the ProtoNet architecture gives before any training.

    Args:
        features: ``pixels`` (the flattened image) or ``random_encoder`` (a :class:`ProtoNetEncoder` with its
            initial weights, in eval mode, seeded by ``encoder_seed``).
        filters, blocks: Shape of the random encoder.
        encoder_seed: Seed of the random encoder's weights (independent of the run's seed).
        **kwargs: ``num_classes``, ``input_shape``: see :class:`FewShotModule`.
    """

    has_loss = False  # distances in pixel space are not calibrated logits

    def __init__(
        self,
        features: Literal["pixels", "random_encoder"] = "pixels",
        filters: int = 64,
        blocks: int = 4,
        encoder_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if features not in ("pixels", "random_encoder"):
            raise ValueError(f"features={features!r}: choose 'pixels' or 'random_encoder'.")
        self.save_hyperparameters()
        self.encoder: nn.Module = nn.Flatten()
        if features == "random_encoder":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(encoder_seed)
                self.encoder = ProtoNetEncoder(self.input_shape[0], filters, blocks)
            self.encoder.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def logits(self, episode: Episode) -> Tensor:
        support, query = episode["support"], episode["query"]
        return nearest_neighbour_logits(self(support), episode["support_labels"], self(query), self.way(episode))
