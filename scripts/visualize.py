"""Look inside a trained convnet: its activation maps, filter patterns and Grad-CAM heatmap for one image (notes:
*Convnet Visualization*).

    python scripts/visualize.py --ckpt runs/mnist_cnn/version_0/checkpoints/last.ckpt --image digit.png
    python scripts/visualize.py --ckpt CKPT --image digit.png --out vis --layers net.0.1 net.0.4 --filters 8
    python scripts/visualize.py --ckpt CKPT --image digit.png --class-index 7   # why (not) a 7?

The module class comes from the checkpoint (``hyper_parameters["_class_path"]``, written by ``scripts/train.py``).
The image is converted to the model's ``input_shape`` (grayscale or RGB, resized to H x W) and normalised with
the training datamodule's statistics stored in the checkpoint (``x / 255`` when there are none). Writes into
``--out``:

- ``activations/<layer>.png``: the feature maps of every conv layer (:class:`callbacks.ActivationMaps`' grids);
- ``filters/<layer>.png``: the input patterns that maximise the first ``--filters`` filters of each layer of
  ``--layers`` (default: every conv layer's feature maps, i.e. the activation right after each conv);
- ``gradcam.png``: the Grad-CAM overlay of the predicted class (or ``--class-index``) on the last conv layer's
  feature maps;

and prints the predicted class and the class probabilities.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from pytorch_lightning import LightningModule
from torch import Tensor

from callbacks.activations import ActivationMaps
from callbacks.filters import filter_patterns, pattern_grid
from callbacks.gradcam import activated, class_probabilities, grad_cam, last_conv, overlay_figure, resolve_module
from callbacks.images import to_rgb_array
from lightning_modules.checkpoints import CheckpointError, read_checkpoint


class VisualizeError(RuntimeError):
    """An input of the script cannot be used; the message says what failed and what to do."""


# ---- inputs ---------------------------------------------------------------------------------------------------
def load_module(path: str | Path) -> tuple[LightningModule, dict[str, Any]]:
    """The LightningModule of a checkpoint written by ``scripts/train.py`` (eval mode, CPU) and the checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise VisualizeError(
            f"Checkpoint {path} does not exist. Pass the .ckpt file of a finished run, e.g. "
            "runs/<experiment>/version_<N>/checkpoints/last.ckpt (`ls runs/*/version_*/checkpoints` lists them)."
        )
    checkpoint = read_checkpoint(path)  # CheckpointError with a clear message for damaged or unsafe files
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path")
    if not isinstance(class_path, str):
        raise VisualizeError(
            f"Checkpoint {path} does not record its module class (no hyper_parameters['_class_path']): it was not "
            "written through scripts/train.py. Train with `python scripts/train.py fit -c <config>` and pass one of "
            "that run's checkpoints, or load this one in Python with <YourModule>.load_from_checkpoint(path)."
        )
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise VisualizeError(
            f"Checkpoint {path} was written by {class_path}, which cannot be imported ({type(err).__name__}: "
            f"{err}). Run the script from the repository root with the project installed (`pip install -e .`), "
            "at a commit where that class exists."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise VisualizeError(f"Checkpoint {path} names {class_path}, which is not a LightningModule.")
    try:
        model = cls.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:
        raise VisualizeError(
            f"Checkpoint {path} cannot be loaded into {class_path} ({type(err).__name__}: {err}). The class's code "
            "has probably changed since the checkpoint was written (renamed arguments or layers): check out the "
            "commit recorded in the run's run_info.yaml, or retrain."
        ) from None
    return model.eval(), checkpoint


def normalization(checkpoint: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
    """Per-channel ``(mean, std)`` in pixel units of the datamodule the checkpoint was trained with, if stored.

    Lightning saves a datamodule's ``state_dict()`` under its class name; the template's image datamodules keep
    their normalisation statistics there (``{"mean": ..., "std": ...}``).
    """
    class_path = checkpoint.get("datamodule_hyper_parameters", {}).get("_class_path", "")
    candidates = [checkpoint.get(class_path.rpartition(".")[2])] if class_path else []
    candidates += [value for key, value in checkpoint.items() if key[:1].isupper()]  # other datamodule states
    for state in candidates:
        if isinstance(state, dict) and isinstance(state.get("mean"), Tensor) and isinstance(state.get("std"), Tensor):
            return state["mean"].float().reshape(-1), state["std"].float().reshape(-1)
    return None


def model_input_shape(model: LightningModule) -> tuple[int, int, int]:
    shape = getattr(model, "input_shape", None)
    if shape is None and getattr(model, "example_input_array", None) is not None:
        shape = tuple(model.example_input_array.shape[1:])
    if shape is None or len(shape) != 3:
        raise VisualizeError(
            f"{type(model).__name__} does not say which images it takes (no 3-dim `input_shape`, got {shape}); the "
            "script needs (C, H, W) image models."
        )
    return tuple(int(s) for s in shape)


def read_image(path: str | Path, shape: Sequence[int], stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """An image file as a ``(1, C, H, W)`` float batch: gray (C=1) or RGB (C=3), resized (bilinear) to ``H x W``,
    normalised as ``(x - mean) / std`` with ``stats`` in pixel units, else ``x / 255``."""
    channels, height, width = shape
    if channels not in (1, 3):
        raise VisualizeError(f"The model takes {channels}-channel inputs; the script reads gray (1) or RGB (3).")
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")  # decodes the whole file
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise VisualizeError(
            f"Image {path} cannot be read ({type(err).__name__}: {err}). Pass an existing image file in a format "
            "PIL reads (PNG, JPEG, BMP, ...); the script converts it to the model's input shape "
            f"{tuple(shape)} itself."
        ) from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image, dtype=np.float32))
    x = pixels[None] if channels == 1 else pixels.permute(2, 0, 1)
    mean, std = stats if stats is not None else (torch.zeros(1), torch.full((1,), 255.0))
    return ((x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1))[None]


def save_png(image: Figure | Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_rgb_array(image)).save(path)
    return path


# ---- the pictures ---------------------------------------------------------------------------------------------
def visualize(
    model: LightningModule,
    x: Tensor,
    out: Path,
    layers: Sequence[str] | None = None,
    num_filters: int = 16,
    class_index: int | None = None,
    stats: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, int, list[Path]]:
    """Write the activation maps, filter patterns and Grad-CAM overlay of input ``x`` (1, C, H, W) into ``out``;
    returns the class probabilities ``(K,)``, the class Grad-CAM explains and the written files. ``stats``
    (pixel-unit mean and std of the input normalisation, default ``x / 255``) put the filter patterns' gray start
    and step size in input units.
    """
    maps = ActivationMaps()
    convs = maps.resolve_layers(model)  # every nn.Conv2d
    if not convs:
        raise VisualizeError(
            f"{type(model).__name__} has no nn.Conv2d layer: activation maps, filter patterns and Grad-CAM are for "
            "convnets. Pass the checkpoint of a convolutional model (e.g. configs/mnist/cnn.yaml)."
        )
    with torch.no_grad():
        probabilities = class_probabilities(model.eval()(x))[0]
    target = int(probabilities.argmax()) if class_index is None else class_index
    if not 0 <= target < len(probabilities):
        raise VisualizeError(
            f"--class-index {target} is out of range: the model has {len(probabilities)} classes (0 to "
            f"{len(probabilities) - 1})."
        )
    if layers:
        try:
            layers = [resolve_module(model, name)[0] for name in layers]
        except ValueError as err:
            raise VisualizeError(f"--layers: {err}") from None
    else:
        layers = [activated(model, name) for name in convs]

    written = []
    for name, output in maps.feature_maps(model, x, convs).items():
        written.append(save_png(maps.grid(output), out / "activations" / f"{name}.png"))
    if num_filters > 0:
        mean, std = stats if stats is not None else (torch.zeros(1), torch.full((1,), 255.0))
        scale = 255.0 / float(std.mean())  # one unit of [0, 1] pixel scale, in input units
        gray = float(((127.5 - mean) / std).mean())
        outputs = maps.feature_maps(model, x, layers)  # the layers' widths
        for name in layers:
            output = outputs.get(name)
            if output is None or output.ndim != 4:
                raise VisualizeError(f"--layers: {name!r} gives no (N, C, H, W) feature maps; pick a conv layer.")
            channels = range(min(num_filters, output.shape[1]))
            patterns = filter_patterns(
                model, name, channels, x.shape[1:], lr=0.05 * scale, gray=gray, noise=0.1 * scale
            )
            written.append(save_png(pattern_grid(patterns), out / "filters" / f"{name}.png"))

    layer = activated(model, last_conv(model))
    heatmap = grad_cam(model, x, layer, target)
    figure = overlay_figure(x, heatmap, [f"class {target} (p={float(probabilities[target]):.2f})"])
    figure.suptitle(f"Grad-CAM, {layer}", fontsize=9)
    written.append(save_png(figure, out / "gradcam.png"))
    return probabilities, target, written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Activation maps, filter patterns and a Grad-CAM heatmap of a trained convnet for one image.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint (.ckpt) written by scripts/train.py")
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, ...); converted to the input shape")
    parser.add_argument("--out", default="visualizations", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="modules (names from named_modules()) whose filter patterns are drawn; default: every conv layer's "
        "feature maps, i.e. the activation right after each nn.Conv2d",
    )
    parser.add_argument("--filters", type=int, default=16, metavar="N", help="filters drawn per layer; 0 skips them")
    parser.add_argument(
        "--class-index", type=int, metavar="K", help="class Grad-CAM explains (default: the predicted class)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the script; returns the written files. Unusable inputs end it with a one-paragraph error message."""
    args = parse_args(argv)
    try:
        model, checkpoint = load_module(args.ckpt)
        shape = model_input_shape(model)
        stats = normalization(checkpoint)
        x = read_image(args.image, shape, stats)
        probabilities, target, written = visualize(
            model, x, Path(args.out), args.layers, args.filters, args.class_index, stats
        )
    except (VisualizeError, CheckpointError) as err:
        # read_checkpoint's advice names train.py's flag; this script's flag is --ckpt.
        raise SystemExit(f"error: {str(err).replace('--ckpt_path', '--ckpt')}") from None
    predicted = int(probabilities.argmax())
    print(f"Predicted class: {predicted} (p = {float(probabilities[predicted]):.4f})")
    print("Class probabilities: " + ", ".join(f"{k}: {float(p):.4f}" for k, p in enumerate(probabilities)))
    print(f"Grad-CAM explains class {target}")
    print(f"Wrote {len(written)} files to {args.out}:")
    for path in written:
        print(f"  {path}")
    return written


if __name__ == "__main__":
    from cli_errors import run_command  # errors as one paragraph (TEMPLATE_TRACEBACK=1: the traceback)

    sys.exit(run_command(main))
