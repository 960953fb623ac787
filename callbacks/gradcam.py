"""Class activation heatmaps (Grad-CAM) for a fixed sample during training (notes: *visualising what convnets
learn*: heatmaps of class activation, Deep Learning with Python 5.4.3).

Grad-CAM (Selvaraju et al., 2017): the activations ``A`` (K channels) of a conv layer are weighted by the
spatial mean of the gradient of the class score with respect to them, summed over channels and passed
through a ReLU: ``relu(sum_k mean_ij(d score / d A_kij) * A_k)``. Where the map is high, the layer's features
pushed the score of that class up.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from callbacks.activations import sample_input
from callbacks.images import save_and_log_figure

__all__ = [
    "GradCAM",
    "activated",
    "class_probabilities",
    "frozen_eval",
    "grad_cam",
    "last_conv",
    "overlay_figure",
    "resolve_module",
]


# ---- helpers shared with the filter patterns and the visualisation script -------------------------------------
@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with every parameter frozen; restore each module's mode and each
    parameter's ``requires_grad`` on exit (also after an error).

    Freezing keeps gradients away from the parameters (no ``.grad`` is touched, no graph is built for them);
    gradients are then taken with respect to inputs or activations only.
    """
    modes = {module: module.training for module in model.modules()}
    flags = {param: param.requires_grad for param in model.parameters()}
    try:
        model.eval()
        for param in flags:
            param.requires_grad_(False)
        yield model
    finally:
        for module, training in modes.items():
            module.training = training
        for param, flag in flags.items():
            param.requires_grad_(flag)


def resolve_module(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of ``layer``, given as a name from ``named_modules()`` or as a submodule."""
    for name, module in model.named_modules():
        if module is layer or name == layer:
            return name, module
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    examples = (convs or [name for name, _ in model.named_modules() if name])[:8]
    what = repr(layer) if isinstance(layer, str) else f"a {type(layer).__name__} that is not a submodule"
    raise ValueError(f"{type(model).__name__} has no module {what}. Use names from named_modules(), e.g. {examples}.")


def last_conv(model: nn.Module) -> str:
    """Name of the last ``nn.Conv2d`` of ``model`` in ``named_modules()`` order."""
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer; name the layer to use explicitly.")
    return convs[-1]


# Layers that turn a conv's raw output into its feature maps when they follow it directly.
_POINTWISE = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
)


def activated(model: nn.Module, layer: str) -> str:
    """The name of the module that outputs ``layer``'s feature maps after its nonlinearity: the last of the
    batch-norm and activation modules that directly follow ``layer`` in its ``nn.Sequential``, else ``layer``.

    A Keras ``Conv2D(activation="relu")`` outputs post-ReLU maps, and Grad-CAM and filter visualisation are
    defined on those; a PyTorch ``nn.Conv2d`` outputs the pre-activation values, whose negative part gives
    Grad-CAM spurious evidence and makes the mean activation of a first-layer filter linear in the input (a
    flat pattern). For ``Conv2d -> ReLU -> MaxPool2d`` this returns the ReLU, for ``Conv2d -> BatchNorm2d ->
    ReLU`` the ReLU.
    """
    parent_name, _, child = layer.rpartition(".")
    parent = dict(model.named_modules()).get(parent_name)
    if not isinstance(parent, nn.Sequential):
        return layer
    names = list(parent._modules)
    if child not in names:
        return layer
    result = layer
    for name in names[names.index(child) + 1 :]:
        if not isinstance(parent._modules[name], _POINTWISE):
            break
        result = f"{parent_name}.{name}" if parent_name else name
    return result


def _logits_of(output: Any) -> Tensor:
    if not isinstance(output, Tensor) or output.ndim not in (1, 2):
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"expected the model to return logits (N, num_classes), (N, 1) or (N,); got {shape}")
    return output if output.ndim == 2 else output[:, None]


def class_probabilities(logits: Tensor) -> Tensor:
    """Logits -> ``(N, K)`` class probabilities: softmax of ``K > 1`` logits; a single logit ``z`` (binary head,
    sigmoid) gives the two columns ``[1 - sigmoid(z), sigmoid(z)]``."""
    logits = _logits_of(logits).float()
    if logits.shape[1] > 1:
        return logits.softmax(dim=1)
    p = logits.sigmoid()
    return torch.cat([1 - p, p], dim=1)


def _class_scores(logits: Tensor, target: Tensor) -> Tensor:
    """The score of class ``target[i]`` for each row: its logit, or for a 1-logit head ``z`` (class 1) and
    ``-z`` (class 0), the evidence for each side of the sigmoid."""
    if logits.shape[1] > 1:
        return logits.gather(1, target[:, None]).squeeze(1)
    return torch.where(target == 1, logits[:, 0], -logits[:, 0])


def _resolve_target(target: int | Sequence[int] | Tensor | None, probabilities: Tensor) -> Tensor:
    """``(N,)`` class indices: the most probable class when ``target`` is None, else ``target`` checked and
    broadcast to every row. ``probabilities`` are :func:`class_probabilities` ``(N, K)``."""
    n, k = probabilities.shape
    if target is None:
        return probabilities.argmax(dim=1)
    target = torch.as_tensor(target, dtype=torch.long, device=probabilities.device).reshape(-1).expand(n)
    if target.min() < 0 or target.max() >= k:
        raise ValueError(f"target class {target.tolist()} is out of range for a model with {k} classes.")
    return target


def grad_cam(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module,
    target: int | Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Grad-CAM heatmaps of ``images`` for one class each.

    One forward pass in eval mode with a forward hook on ``layer``; the gradient of the class score is taken
    with ``torch.autograd.grad`` with respect to the layer's output only, so parameters (frozen meanwhile,
    see :func:`frozen_eval`) get no ``.grad``. Works inside ``torch.no_grad()`` or ``torch.inference_mode()``
    (gradients are switched back on locally, the input is cloned into a normal tensor). The hook is always
    removed and every module's train/eval mode restored, also when the forward fails.

    Args:
        model: Maps ``(N, C, H, W)`` images to logits ``(N, K)`` (multiclass) or ``(N, 1)``/``(N,)`` (binary:
            one logit ``z``; class 1's score is ``z``, class 0's is ``-z``).
        images: ``(N, C, H, W)`` batch, as the model takes it (normalised).
        layer: Name in ``named_modules()`` (e.g. ``net.0.3``) or the module itself; its output must be
            ``(N, K, h, w)``. Usually the last conv layer's feature maps, after its activation:
            ``activated(model, last_conv(model))``. If the layer runs several times in one forward, its last
            call is used.
        target: Class per image: ``None`` for the predicted class, an int for all images, or one per image.

    Returns:
        ``(N, H, W)`` float heatmaps on ``images``' device, upsampled (bilinear) to the input size and divided
        by their maximum, so in [0, 1]; a map with no positive evidence is all zeros. Blank maps are common
        early in training and with ``Flatten -> Linear`` heads, whose position-dependent weights can average
        out negative over a channel; a layer nearer the input often still shows where the evidence is.
    """
    _, module = resolve_module(model, layer)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, list | tuple):
            output = next((o for o in output if isinstance(o, Tensor)), None)
        if isinstance(output, Tensor):
            captured.append(output)

    handle = module.register_forward_hook(hook)
    try:
        with torch.inference_mode(False), torch.enable_grad(), frozen_eval(model):
            # A clone made outside inference mode is a normal tensor even when ``images`` is an inference one;
            # requiring its gradient puts the layer's output in the graph while the parameters are frozen.
            x = images.detach().clone().requires_grad_(True)
            logits = _logits_of(model(x))
            if not captured:
                raise RuntimeError(f"layer {layer!r} did not run in the forward pass of {type(model).__name__}.")
            activations = captured[-1]
            if activations.ndim != 4:
                raise ValueError(f"layer {layer!r} gives {tuple(activations.shape)}; Grad-CAM needs (N, K, h, w).")
            scores = _class_scores(logits, _resolve_target(target, class_probabilities(logits.detach())))
            # Rows are independent in eval mode: the gradient of the sum gives each image its own gradient.
            (grads,) = torch.autograd.grad(scores.sum(), activations)
            with torch.no_grad():  # still outside inference mode: the heatmaps are normal tensors
                weights = grads.float().mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * activations.detach().float()).sum(dim=1, keepdim=True))
                cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
                peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
                return (cam / peak).clamp(0, 1)
    finally:
        handle.remove()


def _display(image: Tensor) -> np.ndarray:
    """A normalised ``(C, H, W)`` input as an ``(H, W)`` or ``(H, W, 3)`` array in [0, 1] (min-max scaled)."""
    image = image.detach().float().cpu()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-8)
    return image[0].numpy() if image.shape[0] == 1 else image[:3].permute(1, 2, 0).numpy()


def overlay_figure(
    images: Tensor,
    heatmaps: Tensor,
    titles: Sequence[str] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Figure:
    """A matplotlib ``Figure`` (no pyplot) with a column per image: the input on top, the input with its
    heatmap laid over it (``alpha`` opacity, colour map ``cmap``) below.

    Args:
        images: ``(N, C, H, W)`` inputs, any scale (each is min-max scaled for display); C is 1 or 3.
        heatmaps: ``(N, H, W)`` maps in [0, 1], e.g. from :func:`grad_cam`.
        titles: Optional caption per column (e.g. ``"class 3 (p=0.97)"``).
    """
    n = len(images)
    fig = Figure(figsize=(2.2 * n, 4.6), dpi=100, layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        picture = _display(images[i])
        gray = "gray" if picture.ndim == 2 else None
        axes[0, i].imshow(picture, cmap=gray)
        axes[1, i].imshow(picture, cmap=gray)
        axes[1, i].imshow(heatmaps[i].detach().float().cpu().numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=9)
        for ax in axes[:, i]:
            ax.set_axis_off()
    return fig


def _titles(probabilities: Tensor, target: Tensor) -> list[str]:
    return [f"class {int(k)} (p={float(p[k]):.2f})" for p, k in zip(probabilities, target, strict=True)]


# ---- the callback ---------------------------------------------------------------------------------------------
class GradCAM(Callback):
    """Save Grad-CAM overlays for a fixed sample every ``every_n_epochs`` training epochs.

    At the start of training the first ``num_images`` samples of a validation batch (a training batch when
    there is no validation) are kept, taken and prepared as :class:`~callbacks.activations.ActivationMaps` does
    (random state untouched, the datamodule's batch-transfer hooks applied). After every ``every_n_epochs``-th
    training epoch :func:`grad_cam` runs on them (on every process, in eval mode, gradients enabled locally
    even under ``no_grad``/inference mode, hooks removed, parameters untouched), and global rank zero saves
    the overlays (:func:`overlay_figure`, titled with the explained class and its probability) as
    ``<run dir>/<filename_prefix>/epoch<NNN>.png`` (epoch from 0) and sends them to the loggers that take
    images under the tag ``<filename_prefix>``.

    Args:
        layer: Module name in ``named_modules()`` whose activations are weighted; default the feature maps of
            the last ``nn.Conv2d``, i.e. the output of the activation (and batch norm) right after it
            (``activated(model, last_conv(model))``, see :func:`activated`).
        target: Class explained for every image; ``None`` explains each image's predicted class.
        every_n_epochs: Draw after every n-th training epoch.
        num_images: Number of samples drawn (a column each).
        alpha: Opacity of the heatmap over the image.
        cmap: Matplotlib colour map of the heatmap.
        filename_prefix: Folder (under the run folder) and logger tag.
    """

    def __init__(
        self,
        layer: str | None = None,
        target: int | None = None,
        every_n_epochs: int = 1,
        num_images: int = 4,
        alpha: float = 0.5,
        cmap: str = "jet",
        filename_prefix: str = "gradcam",
    ) -> None:
        super().__init__()
        for arg, value in (("every_n_epochs", every_n_epochs), ("num_images", num_images)):
            if value < 1:
                raise ValueError(f"{arg}={value} must be at least 1.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must be in [0, 1].")
        self.layer = layer
        self.target = target
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.alpha = alpha
        self.cmap = cmap
        self.filename_prefix = filename_prefix
        self._layer: str | None = None
        self._sample: Tensor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layer is not None:
            self._layer = resolve_module(pl_module, self.layer)[0]
            return
        try:
            self._layer = activated(pl_module, last_conv(pl_module))
        except ValueError:
            self._layer = None
            rank_zero_warn(
                f"GradCAM: {type(pl_module).__name__} has no nn.Conv2d layer and no `layer` was given; no "
                "heatmaps will be drawn."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._layer is None:
            return
        self._sample = sample_input(trainer, pl_module, self.num_images, owner="GradCAM")
        if self._sample is None:
            self._layer = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sample is None or self._layer is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        precision = trainer.precision_plugin
        with torch.inference_mode(False), torch.enable_grad(), precision.forward_context():
            x = precision.convert_input(self._sample)
            with frozen_eval(pl_module), torch.no_grad():
                probabilities = class_probabilities(pl_module(x))
            target = _resolve_target(self.target, probabilities)
            heatmaps = grad_cam(pl_module, x, self._layer, target)
        if not trainer.is_global_zero:
            return
        figure = overlay_figure(self._sample, heatmaps, _titles(probabilities, target), self.alpha, self.cmap)
        figure.suptitle(f"Grad-CAM of {self._layer}, epoch {trainer.current_epoch}", fontsize=10)
        save_and_log_figure(
            trainer,
            figure,
            f"{self.filename_prefix}/epoch{trainer.current_epoch:03d}",
            tag=self.filename_prefix,
        )
