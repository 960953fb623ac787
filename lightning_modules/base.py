"""The supervised base every classifier and regressor of the topics builds on: a plain ``pl.LightningModule``.

A subclass builds ``self.net`` (any ``nn.Module`` mapping a batch to ``self.out_features`` outputs) and
gets the rest: the loss matched to the output layer, torchmetrics accuracy and top-k error, logging under
the project's keys (``train/loss``, ``val/loss``, ``val/acc``, ``val/top5_err``, ``test/acc``, ...), the
optimiser and scheduler from the config, checks that the data fits the model, and ``save_hyperparameters``
so ``load_from_checkpoint`` works without the training script. Its defaults are PyTorch's (initialisation, loss,
optimiser); the book configs ask for Keras' choices explicitly (``init: keras``, ``prob_clip: 1.0e-07``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanAbsoluteError, Metric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from lightning_modules.layers import KERNEL_LAYERS, InitName, keras_init_
from lightning_modules.losses import LOSSES, LossName, Task, balanced_class_weights, task_loss, training_class_counts
from lightning_modules.optim import SchedulerInterval, SharedFactory, optimizers_from_factories, run_total_steps


def warn_if_narrow(widths: Sequence[int], num_classes: int, where: str) -> None:
    """The notes: hidden layers narrower than the class count lose information. Warn, do not forbid."""
    narrow = [w for w in widths if w < num_classes]
    if narrow:
        rank_zero_warn(
            f"{where}: hidden width(s) {narrow} are below the number of classes ({num_classes}); such a "
            "bottleneck loses information the output layer needs. Use at least num_classes units."
        )


def check_input_shape(datamodule: pl.LightningDataModule, input_shape: Sequence[int], hint: str = "") -> None:
    """One clear error when the datamodule's ``dims`` differ from the model's ``input_shape``."""
    dims = getattr(datamodule, "dims", None)
    if dims is not None and tuple(dims) != tuple(input_shape):
        raise ValueError(
            f"{type(datamodule).__name__} yields inputs of shape {tuple(dims)} but the model was built for "
            f"input_shape={tuple(input_shape)}. Set --model.init_args.input_shape '{list(dims)}'{hint}."
        )


class EpochMean(Metric):
    """Batch-size weighted mean of a per-batch scalar (a loss) over an epoch, summed across ranks in ``compute``.

    torchmetrics' ``MeanMetric`` inspects every update for NaN (``isnan(x).any()``: a host-device sync per step on
    a GPU) and drops the NaN values, so a diverging run would show a finite mean; here an update is two adds on the
    device and a NaN loss shows as NaN.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: int) -> None:
        # Out of place: a state reset under inference mode (validation) must stay updatable in training.
        self.total = self.total + value.detach() * weight
        self.weight = self.weight + weight

    def compute(self) -> Tensor:
        return self.total / self.weight


class SupervisedModule(pl.LightningModule):
    """Supervised base module. Subclasses set ``self.net`` after calling ``super().__init__``.

    Args:
        num_classes: Number of classes (``multiclass``); ignored by ``binary`` and ``regression``.
        task: ``multiclass`` (N logits, softmax/CE), ``binary`` (1 logit, sigmoid/BCE) or ``regression``
            (1 linear output, MSE), the output-layer rules of the notes.
        input_shape: ``(C, H, W)`` of one input; checked against the datamodule's ``dims``.
        optimizer: Optimiser factory, e.g. ``torch.optim.Adam`` with its init args in the YAML.
        lr_scheduler: Optional scheduler factory; ``ReduceLROnPlateau`` monitors ``val/loss``.
        scheduler_interval: When the scheduler steps: ``step`` (after every training step), ``epoch``, or
            ``auto`` (OneCycleLR, CyclicLR and LinearLR warm-ups per step, the others per epoch).
        init: ``torch`` keeps PyTorch's initialisation; ``keras`` re-initialises the network with Keras defaults
            (the book recipes; see :func:`~lightning_modules.layers.keras_init_`).
        prob_clip: Clip probabilities to ``[prob_clip, 1 - prob_clip]`` in the cross-entropy, as Keras does with
            1e-7; 0 (PyTorch's loss) disables it.
        top_k: k of the top-k error (``val/top5_err`` for k=5), logged when there are more than k classes.
        l1: Weight of the L1 penalty ``l1 * sum(|w|)`` on the kernels of :meth:`regularized_weights` (Keras
            ``kernel_regularizer=l1(...)``), added to the training loss.
        l2: Weight of the L2 penalty ``l2 * sum(w**2)`` on the same kernels (Keras ``l2(...)``: not halved).
        max_norm: Keras' ``max_norm`` constraint: after every optimiser step, each unit's incoming kernel
            weights are rescaled to an L2 norm of at most this value. ``None`` disables it.
        loss: ``ce`` (the task's plain loss: CE, BCE, or MSE for regression), ``balanced_ce`` (CE weighted by
            class, for imbalanced data) or ``focal`` (focal loss, down-weights easy samples); see
            :mod:`lightning_modules.losses`.
        class_weights: Per-class weights for ``balanced_ce`` (binary: ``[negative, positive]``). ``None``
            derives them from the training split's class frequencies when ``fit`` starts (``n / (C * n_c)``);
            they are saved in checkpoints, so validate/test of a checkpoint weigh exactly as training did.
        focal_alpha: Focal loss class balance (binary: weight of positives, ``1 - alpha`` for negatives;
            multiclass: a scalar factor). ``None`` disables it.
        focal_gamma: Focal loss focusing parameter; ``gamma=0`` with ``focal_alpha=None`` is plain CE.
        label_smoothing: Multiclass training loss only: the targets keep ``1 - eps`` on their class and spread
            ``eps`` over all classes (``torch.nn.functional.cross_entropy``'s ``label_smoothing``). ``val/loss``
            and ``test/loss`` stay the plain loss, comparable across runs. 0 disables it.

    The penalties and ``max_norm`` act on the kernels of Linear/Conv layers only (:meth:`regularized_weights`);
    when ``fit`` starts, a warning names the trainable weights they skip (e.g. a transformer's ``in_proj_weight``,
    ``cls_token``, ``pos_embed``, an RNN's kernels). The penalties act on training only: ``train/loss`` and
    ``val/loss`` are the data loss (comparable), the penalty is logged as ``train/penalty`` and the optimised loss
    is their sum.
    """

    def __init__(
        self,
        num_classes: int = 10,
        task: Task = "multiclass",
        input_shape: Sequence[int] = (1, 28, 28),
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: SchedulerInterval = "auto",
        init: InitName = "torch",
        prob_clip: float = 0.0,
        top_k: int = 5,
        l1: float = 0.0,
        l2: float = 0.0,
        max_norm: float | None = None,
        loss: LossName = "ce",
        class_weights: Sequence[float] | None = None,
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 2.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if task not in ("multiclass", "binary", "regression"):
            raise ValueError(f"task={task!r}: choose 'multiclass', 'binary' or 'regression'.")
        if task == "multiclass" and num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a multiclass task needs at least 2 classes.")
        if scheduler_interval not in ("auto", "step", "epoch"):
            raise ValueError(f"scheduler_interval={scheduler_interval!r}: choose auto, step or epoch.")
        for name, value in (("l1", l1), ("l2", l2), ("max_norm", max_norm or 0.0)):
            if value < 0:
                raise ValueError(f"{name}={value}: regularisation weights and norms must be >= 0.")
        self._check_loss(task, num_classes, loss, class_weights, focal_gamma)
        if label_smoothing and (task != "multiclass" or loss == "focal" or not 0 < label_smoothing < 1):
            raise ValueError(
                f"label_smoothing={label_smoothing}: choose a value in [0, 1) with task='multiclass' and loss 'ce' "
                f"or 'balanced_ce' (here task={task!r}, loss={loss!r})."
            )
        self.save_hyperparameters()
        self.task = task
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.optimizer_factory = SharedFactory.wrap(optimizer)
        self.scheduler_factory = SharedFactory.wrap(lr_scheduler)
        self.example_input_array = torch.zeros(2, *self.input_shape)
        # Per stage: metric objects and the batch-size weighted mean loss, updated every step and logged once per
        # epoch (see _step).
        self.train_metrics, self.train_loss = self._make_metrics("train"), EpochMean()
        self.val_metrics, self.val_loss = self._make_metrics("val"), EpochMean()
        self.test_metrics, self.test_loss = self._make_metrics("test"), EpochMean()
        self._train_logged_epoch: int | None = None
        if loss == "balanced_ce":  # a buffer only then: checkpoints of the other losses keep their exact keys
            weights = torch.ones(self._num_loss_classes) if class_weights is None else torch.tensor(class_weights)
            self.register_buffer("loss_class_weights", weights.float())

    @property
    def _num_loss_classes(self) -> int:
        return self.num_classes if self.task == "multiclass" else 2

    @staticmethod
    def _check_loss(
        task: str, num_classes: int, loss: str, class_weights: Sequence[float] | None, gamma: float
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}: choose one of {', '.join(LOSSES)}.")
        if task == "regression" and loss != "ce":
            raise ValueError(
                f"loss={loss!r} is a classification loss but task='regression' trains with MSE; "
                "drop --model.init_args.loss (or pick task multiclass/binary)."
            )
        if gamma < 0:
            raise ValueError(f"focal_gamma={gamma}: the focusing parameter must be >= 0 (0 gives plain CE).")
        expected = num_classes if task == "multiclass" else 2
        if class_weights is not None and len(class_weights) != expected:
            raise ValueError(
                f"class_weights has {len(class_weights)} entries but a {task} task needs {expected} "
                "(one per class; binary: [negative, positive])."
            )

    def compute_loss(self, logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """The configured loss (``loss``/``class_weights``/``focal_*``) of a batch; subclasses may reuse it.
        Training passes the configured ``label_smoothing``; evaluation computes the plain loss."""
        hp = self.hparams
        return task_loss(
            logits,
            target,
            self.task,
            hp.prob_clip,
            loss=hp.get("loss", "ce"),
            class_weights=getattr(self, "loss_class_weights", None),
            alpha=hp.get("focal_alpha", 0.25),
            gamma=hp.get("focal_gamma", 2.0),
            label_smoothing=label_smoothing,
        )

    @property
    def out_features(self) -> int:
        """Width of the output layer: N for multiclass, 1 for binary and regression."""
        return self.num_classes if self.task == "multiclass" else 1

    def _make_metrics(self, stage: str) -> MetricCollection:
        # validate_args=False: torchmetrics' checks of the targets (``unique``) would sync the GPU every step; the
        # loss, computed first on the same targets, already rejects labels outside [0, num_classes).
        if self.task == "multiclass":
            metrics = {"acc": MulticlassAccuracy(self.num_classes, average="micro", validate_args=False)}
            k = self.hparams.top_k
            if stage != "train" and self.num_classes > k:
                top_k = MulticlassAccuracy(self.num_classes, top_k=k, average="micro", validate_args=False)
                metrics[f"top{k}_err"] = 1 - top_k
        elif self.task == "binary":
            metrics = {"acc": BinaryAccuracy(validate_args=False)}
        else:
            metrics = {"mae": MeanAbsoluteError()}
        return MetricCollection(metrics, prefix=f"{stage}/", compute_groups=False)

    def init_weights(self) -> None:
        """Apply the configured initialisation to ``self.net``; subclasses call it once the net exists."""
        if self.hparams.init == "keras":
            keras_init_(self.net)

    # ---- regularisation ------------------------------------------------------------------------------
    def regularized_weights(self) -> Iterator[Tensor]:
        """The kernels the penalties and ``max_norm`` act on: weights of every Linear/Conv layer of ``self.net``
        (not biases, not normalisation layers). Override to choose others (e.g. conv kernels only)."""
        return (m.weight for m in self.net.modules() if isinstance(m, KERNEL_LAYERS))

    def unregularized_weights(self) -> list[str]:
        """Names of the trainable weights (2 or more dims: not biases or normalisation scales) that ``l1``, ``l2``
        and ``max_norm`` skip: neither in :meth:`regularized_weights` nor the kernel of a Linear/Conv layer that an
        override left out on purpose. E.g. ``MultiheadAttention.in_proj_weight``, a ``cls_token``, an RNN's
        kernels, an embedding."""
        chosen = {id(w) for w in self.regularized_weights()}
        chosen |= {id(m.weight) for m in self.modules() if isinstance(m, KERNEL_LAYERS)}
        return [n for n, p in self.named_parameters() if p.requires_grad and p.dim() >= 2 and id(p) not in chosen]

    def warn_unregularized(self) -> None:
        """Warn (once per message, rank zero) naming :meth:`unregularized_weights` when a penalty or max_norm is on."""
        hp = self.hparams
        if not (hp.l1 or hp.l2 or hp.max_norm is not None):
            return
        names = self.unregularized_weights()
        if names:
            shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
            rank_zero_warn(
                f"{type(self).__name__}: l1, l2 and max_norm act on the kernels of Linear/Conv layers only; these "
                f"trainable weights are not regularised: {shown}. Override regularized_weights() to include them."
            )

    def regularization_loss(self) -> Tensor:
        """``l1 * sum(|w|) + l2 * sum(w**2)`` over :meth:`regularized_weights`; zero when both are off."""
        l1, l2 = self.hparams.l1, self.hparams.l2
        penalty = torch.zeros((), device=self.device)
        if l1 or l2:
            for w in self.regularized_weights():
                penalty = penalty + (l1 * w.abs().sum() if l1 else 0.0) + (l2 * w.square().sum() if l2 else 0.0)
        return penalty

    @torch.no_grad()
    def apply_max_norm(self) -> None:
        """Rescale each unit's incoming weights (dim 0 indexes units) to an L2 norm of at most ``max_norm``."""
        limit = self.hparams.max_norm
        for w in self.regularized_weights():
            norms = w.flatten(1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
            w.mul_(norms.clamp(max=limit) / norms.clamp(min=1e-7))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.hparams.max_norm is not None:
            self.apply_max_norm()

    # ---- forward and steps ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _metric_inputs(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if self.task == "multiclass":
            return logits, target.argmax(dim=-1) if target.is_floating_point() else target
        if self.task == "binary":
            return logits.reshape(-1), target.reshape(-1).long()
        return logits.reshape(target.shape), target

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.compute_loss(logits, y, self.hparams.get("label_smoothing", 0.0) if stage == "train" else 0.0)
        getattr(self, f"{stage}_metrics").update(*self._metric_inputs(logits.detach(), y))
        getattr(self, f"{stage}_loss").update(loss, len(x))
        if stage == "train" and self._train_logged_epoch != self.current_epoch:
            self._train_logged_epoch = self.current_epoch
            self._log_epoch("train")
        if stage == "train" and (self.hparams.l1 or self.hparams.l2):
            penalty = self.regularization_loss()
            self.log("train/penalty", penalty, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(x))
            loss = loss + penalty
        return loss

    def _log_epoch(self, stage: str) -> None:
        """Log the stage's metric objects once; Lightning computes them (synced across ranks by torchmetrics) and
        resets them at the epoch's end, over every batch of the epoch.

        Only the metric states are updated per step: Lightning's ``self.log`` costs more than a small model's
        step. Training logs at its first step (the values appear when the training epoch ends), validation and
        test in their epoch-end hooks.
        """
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(getattr(self, f"{stage}_metrics"), on_step=False, on_epoch=True, prog_bar=stage != "train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """Class probabilities (multiclass: softmax rows, binary: P(class 1)) or regression values."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        logits = self(x)
        if self.task == "multiclass":
            return logits.softmax(dim=-1)
        return logits.sigmoid().reshape(-1) if self.task == "binary" else logits

    # ---- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self):
        parameters = (p for p in self.parameters() if p.requires_grad)
        interval = self.hparams.get("scheduler_interval", "auto")
        return optimizers_from_factories(
            self.optimizer_factory, self.scheduler_factory, parameters, interval, lambda: run_total_steps(self.trainer)
        )

    # ---- input checks --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.warn_unregularized()
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        if stage == "fit" and self.hparams.get("loss") == "balanced_ce" and self.hparams.class_weights is None:
            # The datamodule's setup ran first; every rank holds the whole training split, so all agree.
            counts = training_class_counts(datamodule, self._num_loss_classes)
            self.loss_class_weights.copy_(balanced_class_weights(counts).to(self.loss_class_weights))
        name = type(datamodule).__name__
        check_input_shape(datamodule, self.input_shape, " (or pick a datamodule that matches the model)")
        data_classes = getattr(datamodule, "num_classes", None)
        if self.task == "multiclass" and data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"{name} has {data_classes} classes but the model was built with num_classes="
                f"{self.num_classes}. Set --model.init_args.num_classes {data_classes}."
            )
