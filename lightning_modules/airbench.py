"""A fast CIFAR-10 network and its training recipe, after Keller Jordan's airbench (94 % in about 10 epochs).

The network: a 2x2 patch-whitening convolution whose filters are the eigenvectors of the training patches'
covariance (scaled to unit variance, with their negatives; frozen), GELU, then three conv groups
(conv-pool-BN-GELU, conv-BN-GELU; BatchNorm with a frozen scale of 1), a global max pool and a bias-free linear
head scaled by 1/9. The recipe: label smoothing, Nesterov SGD whose learning rate and weight decay are given per
example and scaled by the batch size here, a linear warm-up and decay, lookahead of the weights, and test-time
augmentation (flip + one-pixel shifts) at validation, test and predict. Flip and translate augmentation of the
training batches is the datamodule's (``datamodules.augment.BatchAugment``) on the device.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LinearLR, SequentialLR

from lightning_modules.base import SupervisedModule
from lightning_modules.muon import FilterMuon
from lightning_modules.tta import tta_logits


# ---- whitening ------------------------------------------------------------------------------------------------
def image_patches(images: Tensor, size: Sequence[int]) -> Tensor:
    """Every ``size`` patch (stride 1) of ``(N, C, H, W)`` images as rows ``(M, C * kh * kw)`` in conv-weight order."""
    kh, kw = size
    patches = images.unfold(2, kh, 1).unfold(3, kw, 1)  # (N, C, H', W', kh, kw)
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * kh * kw)


def whitening_filters(images: Tensor, size: Sequence[int] = (2, 2), eps: float = 5e-4) -> Tensor:
    """Conv filters ``(2 * C * kh * kw, C, kh, kw)`` that whiten the ``size`` patches of ``images``.

    The filters are the eigenvectors of the patches' (uncentred) covariance divided by ``sqrt(eigenvalue + eps)``,
    largest eigenvalue first, followed by their negatives (so a GELU after the conv keeps both signs). On the
    patches, the first half of the outputs has covariance ``diag(l / (l + eps))``: the identity up to ``eps``.
    """
    patches = image_patches(images.double(), size)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    filters = (eigenvectors.T / (eigenvalues + eps).sqrt()[:, None]).flip(0)
    filters = filters.reshape(-1, images.shape[1], *size).float()
    return torch.cat([filters, -filters])


# ---- the network ----------------------------------------------------------------------------------------------
def frozen_scale_bn(channels: int, momentum: float, trainable_scale: bool = False) -> nn.BatchNorm2d:
    """BatchNorm whose scale stays 1 (only the shift trains); ``momentum`` in airbench's sense (weight of the old
    running statistics, i.e. PyTorch's ``1 - momentum``)."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=1 - momentum)
    norm.weight.requires_grad_(trainable_scale)
    return norm


class DiracConv(nn.Conv2d):
    """3x3 'same' conv without bias, initialised as PyTorch does but with identity kernels on the first filters."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: min(self.in_channels, self.out_channels)])


class ConvGroup(nn.Sequential):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, trainable_scale: bool) -> None:
        super().__init__(
            DiracConv(in_channels, out_channels),
            nn.MaxPool2d(2),
            frozen_scale_bn(out_channels, bn_momentum, trainable_scale),
            nn.GELU(),
            DiracConv(out_channels, out_channels),
            frozen_scale_bn(out_channels, bn_momentum, trainable_scale),
            nn.GELU(),
        )


class ResidualConvGroup(nn.Module):
    """airbench96's group: conv -> max-pool 2 -> BN -> GELU, then ``x + body(x)`` where ``body`` is
    conv -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, trainable_scale: bool) -> None:
        super().__init__()

        def norm() -> nn.BatchNorm2d:
            return frozen_scale_bn(out_channels, bn_momentum, trainable_scale)

        self.entry = nn.Sequential(DiracConv(in_channels, out_channels), nn.MaxPool2d(2), norm(), nn.GELU())
        self.body = nn.Sequential(
            *(DiracConv(out_channels, out_channels), norm(), nn.GELU()),
            *(DiracConv(out_channels, out_channels), norm(), nn.GELU()),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.entry(x)
        return x + self.body(x)


class AirbenchNet(nn.Module):
    """Whitening conv (2x2, ``2 * C * 4`` filters) -> GELU -> three :class:`ConvGroup` (or, with ``residual``,
    :class:`ResidualConvGroup`) -> max-pool -> linear."""

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        widths: Sequence[int] = (64, 256, 256),
        bn_momentum: float = 0.6,
        logit_scale: float = 1 / 9,
        trainable_bn_scale: bool = False,
        residual: bool = False,
    ) -> None:
        super().__init__()
        channels = input_shape[0]
        self.whiten = nn.Conv2d(channels, 2 * channels * 4, kernel_size=2, bias=True)
        nn.init.zeros_(self.whiten.bias)
        groups, previous = [], self.whiten.out_channels
        group = ResidualConvGroup if residual else ConvGroup
        for width in widths:
            groups.append(group(previous, width, bn_momentum, trainable_bn_scale))
            previous = width
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(previous, num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: Tensor) -> Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        x = torch.amax(x, dim=(2, 3))  # airbench: MaxPool2d(3) of the 4x4 map; the global max for any input size
        return self.head(x) * self.logit_scale


# ---- lookahead ------------------------------------------------------------------------------------------------
class Lookahead:
    """Lookahead of a module's floating-point state (weights and BatchNorm statistics), airbench's variant.

    :meth:`update` moves the slow copy towards the module (``slow += (1 - decay) * (module - slow)``) and then
    sets the module to the slow copy. ``state_dict``/``load_state_dict`` put the slow copy into checkpoints.
    """

    def __init__(self) -> None:
        self.slow: dict[str, Tensor] | None = None

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        fast = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
        if self.slow is None:
            self.slow = {k: v.detach().clone() for k, v in fast.items()}
        for name, slow in self.slow.items():
            if slow.device != fast[name].device:
                slow = self.slow[name] = slow.to(fast[name].device)
            slow.lerp_(fast[name], 1 - decay)
            fast[name].copy_(slow)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.slow is None else dict(self.slow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.slow = {k: v.clone() for k, v in state.items()} or None


def decoupled_step_sizes(lr: float, weight_decay: float, batch_size: int, momentum: float) -> tuple[float, float]:
    """The optimiser's per-step lr and decay for per-example ``lr``/``weight_decay`` (see the class docstring)."""
    scale = batch_size / (1 + 1 / (1 - momentum))
    return lr * scale, weight_decay * scale


def parameter_groups(
    net: AirbenchNet, lr: float, decay: float, bias_lr_factor: float, muon_lr: float | None = None
) -> list[dict]:
    """Optimiser groups of ``net``'s trainable parameters: the BatchNorm shifts at ``lr * bias_lr_factor``, the rest
    at ``lr``; both decay by ``decay`` per step (torch's SGD multiplies a group's weight_decay by its lr, hence the
    divisions). With ``muon_lr`` (airbench94_muon's split), the conv filters form a third group, ``muon=True`` at
    ``muon_lr`` (see :class:`~lightning_modules.muon.FilterMuon`), and the whitening bias joins the shifts."""
    shift_ids = {id(p) for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    trainable = [p for p in net.parameters() if p.requires_grad]
    filters = [p for p in trainable if p.ndim == 4] if muon_lr is not None else []
    if muon_lr is not None:
        shift_ids.add(id(net.whiten.bias))
    filter_ids = {id(p) for p in filters}
    bias_lr = lr * bias_lr_factor
    groups = [
        {"params": [p for p in trainable if id(p) in shift_ids], "lr": bias_lr, "weight_decay": decay / bias_lr},
        {"params": [p for p in trainable if id(p) not in shift_ids | filter_ids], "lr": lr, "weight_decay": decay / lr},
    ]
    return groups + ([{"params": filters, "lr": muon_lr, "muon": True}] if filters else [])


# ---- the LightningModule --------------------------------------------------------------------------------------
class AirbenchClassifier(SupervisedModule):
    """Airbench-style CIFAR classifier with its own optimiser, schedule, lookahead and test-time augmentation.

    Args:
        num_classes: Number of classes.
        input_shape: ``(C, H, W)`` of one input (checked against the datamodule).
        widths: Channels of the three conv groups.
        residual_groups: Groups of three convs with a residual connection around the last two, as airbench96's
            (about 4x the work per epoch with its widths, 128-384-512); ``False``: airbench94's two-conv groups.
        bn_momentum: Weight of the old BatchNorm running statistics (airbench: 0.6).
        logit_scale: Factor on the logits.
        trainable_bn_scale: Train the BatchNorm scales too (airbench keeps them at 1).
        whiten: Initialise the first conv from the training patches and freeze its weights; ``False`` keeps
            PyTorch's random initialisation and trains it (an ablation).
        whiten_samples: Training images whose patches give the whitening filters (the first ones of the split).
        whiten_eps: Added to the eigenvalues before the square root.
        whiten_bias_epochs: Epochs during which the whitening conv's bias trains; frozen afterwards.
        lr: Learning rate per example (airbench: 11.5 per 1024 examples); the optimiser's rate is
            ``lr * batch / (1 + 1 / (1 - momentum))`` for the global batch, so the step size does not depend on the
            batch size or the momentum.
        weight_decay: Weight decay per example (airbench: 0.0153 per 1024), scaled like ``lr`` and independent of it.
        momentum: Nesterov momentum.
        filter_optimizer: ``sgd`` (airbench94) or ``muon``: the conv filters step with Muon (airbench94_muon; see
            :class:`~lightning_modules.muon.FilterMuon`), the BatchNorm and whitening biases and the head with SGD.
            Its Newton-Schulz iterations run in bfloat16, or in float32 under ``--trainer.precision 32-true``.
        muon_lr: Learning rate of the Muon steps (not scaled by the batch: Muon's steps have a fixed size).
        muon_momentum: Momentum of the Muon steps.
        bias_lr_factor: Learning-rate factor of the BatchNorm shifts (not of their weight decay).
        label_smoothing: Label smoothing of the cross-entropy.
        warmup_fraction: Fraction of the steps over which the lr rises linearly from ``warmup_start`` times its
            peak (0: no warm-up); it then falls linearly to ``final_lr_factor`` times the peak at the last step.
        warmup_start: Start factor of the warm-up.
        final_lr_factor: Factor of the peak lr at the last step.
        lookahead_every: Steps between lookahead updates; 0 disables lookahead.
        lookahead_decay: Per-step decay; an update uses ``decay ** every * (step / total) ** 3``, and the last
            step sets the weights to the slow copy.
        tta_level: Test-time augmentation at validation, test and predict: 0 none, 1 mirror, 2 mirror + shifts.
        top_k, l1, l2, max_norm: As in :class:`~lightning_modules.base.SupervisedModule` (the recipe uses none of
            the penalties: its weight decay is the optimiser's). The base's optimizer/scheduler options do not
            apply: the recipe builds its own.
    """

    evaluation_hparams = ("tta_level",)  # a test may set it for a checkpoint trained with another level

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        widths: Sequence[int] = (64, 256, 256),
        residual_groups: bool = False,
        bn_momentum: float = 0.6,
        logit_scale: float = 1 / 9,
        trainable_bn_scale: bool = False,
        whiten: bool = True,
        whiten_samples: int = 5000,
        whiten_eps: float = 5e-4,
        whiten_bias_epochs: int = 3,
        lr: float = 11.5 / 1024,
        weight_decay: float = 0.0153 / 1024,
        momentum: float = 0.85,
        filter_optimizer: str = "sgd",
        muon_lr: float = 0.24,
        muon_momentum: float = 0.6,
        bias_lr_factor: float = 64.0,
        label_smoothing: float = 0.2,
        warmup_fraction: float = 0.23,
        warmup_start: float = 0.2,
        final_lr_factor: float = 0.07,
        lookahead_every: int = 5,
        lookahead_decay: float = 0.95,
        tta_level: int = 2,
        top_k: int = 5,
        l1: float = 0.0,
        l2: float = 0.0,
        max_norm: float | None = None,
    ) -> None:
        if tta_level not in (0, 1, 2):
            raise ValueError(f"tta_level={tta_level}: choose 0 (none), 1 (mirror) or 2 (mirror + one-pixel shifts).")
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths={list(widths)}: give the channels of the three conv groups.")
        if not 0 <= warmup_fraction < 1 or not 0 <= momentum < 1 or lookahead_every < 0:
            raise ValueError("need 0 <= warmup_fraction < 1, 0 <= momentum < 1 and lookahead_every >= 0.")
        if filter_optimizer not in ("sgd", "muon"):
            raise ValueError(f"filter_optimizer={filter_optimizer!r}: choose 'sgd' (airbench94) or 'muon'.")
        super().__init__(num_classes=num_classes, input_shape=input_shape, top_k=top_k, l1=l1, l2=l2, max_norm=max_norm)
        # The base saved its own options too (its optimiser, loss, ...): keep only this recipe's, which has its own.
        for name in set(self.hparams) - set(inspect.signature(AirbenchClassifier.__init__).parameters):
            del self.hparams[name]
        self.net = AirbenchNet(
            input_shape, num_classes, widths, bn_momentum, logit_scale, trainable_bn_scale, residual_groups
        )
        self.net.whiten.weight.requires_grad_(not whiten)
        # True once the whitening filters are set: a restored or fine-tuned model keeps its filters.
        self.register_buffer("whitened", torch.zeros((), dtype=torch.bool))
        self.lookahead = Lookahead()
        self._lookahead_step = -1

    # ---- forward with test-time augmentation ------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.net(x)
        return tta_logits(self.net, x, self.hparams.tta_level)

    def compute_loss(self, logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        # the base passes the configured smoothing for training batches and 0 for val/test (plain, comparable loss)
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)

    # ---- whitening initialisation -----------------------------------------------------------------------------
    def whitening_images(self) -> Tensor:
        """The first ``whiten_samples`` training images, normalised as the datamodule feeds them (same on every rank:
        the datamodule's split is seeded)."""
        datamodule = self.trainer.datamodule
        train_set = getattr(datamodule, "train_set", None)
        if train_set is None or not hasattr(datamodule, "normalize_images"):
            raise ValueError(
                f"{type(self).__name__}(whiten=True) initialises its first conv from the training images of an "
                "image datamodule (train_set + normalize_images); use one (CIFAR10DataModule, "
                "ImageFolderDataModule) or set --model.init_args.whiten false."
            )
        images = train_set.images[: self.hparams.whiten_samples].to(self.device)
        return datamodule.normalize_images(images)

    @torch.no_grad()
    def init_whitening(self, images: Tensor) -> None:
        """Set the whitening conv's filters from ``images`` (normalised ``(N, C, H, W)`` floats)."""
        weight = self.net.whiten.weight
        weight.copy_(whitening_filters(images, weight.shape[2:], self.hparams.whiten_eps).to(weight))
        self.whitened.fill_(True)

    def on_fit_start(self) -> None:
        if self.hparams.whiten and not bool(self.whitened):
            self.init_whitening(self.whitening_images())
            # Identical on every rank already; rank 0's copy makes it exact whatever the devices' arithmetic.
            weight = self.trainer.strategy.broadcast(self.net.whiten.weight.detach().clone(), src=0)
            self.net.whiten.weight.data.copy_(weight.to(self.net.whiten.weight))

    # ---- optimiser and schedule -------------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        """Examples per optimiser step: the loader's batch x processes x accumulated batches."""
        trainer = self.trainer
        batch = getattr(trainer.train_dataloader, "batch_size", None)
        if batch is None:
            batch = getattr(getattr(trainer.datamodule, "hparams", {}), "get", lambda _: None)("batch_size")
        if batch is None:
            raise ValueError(
                f"{type(self).__name__} scales its per-example lr and weight decay by the batch size, but the "
                "training loader has no batch_size attribute; use a loader or datamodule that has one."
            )
        return int(batch) * trainer.world_size * trainer.accumulate_grad_batches

    def configure_optimizers(self):
        hp = self.hparams
        total = int(self.trainer.estimated_stepping_batches)  # loads the training data: its batch size is known
        lr, decay = decoupled_step_sizes(hp.lr, hp.weight_decay, self.global_batch_size(), hp.momentum)
        if hp.filter_optimizer == "muon":
            groups = parameter_groups(self.net, lr, decay, hp.bias_lr_factor, muon_lr=hp.muon_lr)
            # Full precision asked for (32-true, 64-true): the Newton-Schulz iterations too; else bfloat16.
            ns_dtype = "float32" if str(self.trainer.precision).startswith(("32", "64")) else "bfloat16"
            optimizer = FilterMuon(groups, lr, momentum=hp.momentum, muon_momentum=hp.muon_momentum, ns_dtype=ns_dtype)
        else:
            groups = parameter_groups(self.net, lr, decay, hp.bias_lr_factor)
            optimizer = torch.optim.SGD(groups, momentum=hp.momentum, nesterov=True)
        warmup = min(max(1, int(total * hp.warmup_fraction)), max(1, total - 1)) if hp.warmup_fraction else 0
        if warmup:
            warm = LinearLR(optimizer, hp.warmup_start, 1.0, total_iters=warmup)
            decline = LinearLR(optimizer, 1.0, hp.final_lr_factor, total_iters=max(1, total - warmup))
            schedule = SequentialLR(optimizer, [warm, decline], milestones=[warmup])
        else:
            schedule = LinearLR(optimizer, 1.0, hp.final_lr_factor, total_iters=max(1, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The whitening bias trains for whiten_bias_epochs only. Its gradient is dropped rather than requires_grad
        # switched off, which DDP's gradient buckets would not survive; SGD skips a parameter without a gradient.
        if self.current_epoch >= self.hparams.whiten_bias_epochs:
            self.net.whiten.bias.grad = None

    # ---- lookahead --------------------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every, step = self.hparams.lookahead_every, self.global_step
        if not every or step == 0 or step == self._lookahead_step:
            return  # off, or no optimiser step yet / since the last call (gradient accumulation)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if step >= total:
            self.lookahead.update(self.net, decay=1.0)  # the last step: the weights become the slow copy
        elif step % every == 0:
            self.lookahead.update(self.net, decay=self.hparams.lookahead_decay**every * (step / total) ** 3)
        self._lookahead_step = step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lookahead"] = self.lookahead.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.lookahead.load_state_dict(checkpoint.get("lookahead", {}))


__all__ = [
    "AirbenchClassifier",
    "AirbenchNet",
    "Lookahead",
    "decoupled_step_sizes",
    "image_patches",
    "parameter_groups",
    "whitening_filters",
]
