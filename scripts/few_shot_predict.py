"""Label query images from a support set on disk with a trained few-shot model (or the nearest-neighbour floor).

    python scripts/few_shot_predict.py --checkpoint runs/omniglot_protonet_1shot/version_0/checkpoints/last.ckpt \\
        --support my_support/ --query my_queries/ [--output predictions.csv]
    python scripts/few_shot_predict.py --baseline pixels --support my_support/ --query my_queries/

``--support`` holds one sub-folder per class (its name is the label) with one or more images each (the shots);
``--query`` holds the images to label (sub-folders are searched too). Images are preprocessed exactly as in
training: grayscale, resized to the model's input size, strokes inverted and fitted to the frame when the training
data's were (read from the checkpoint's datamodule settings). The output is a CSV ``query,label,probability``,
printed or written to ``--output``. Nothing is learnt about the new classes: the model compares each query with
the support images. ``--centre_sets`` scores the queries as one set (see ``ProtoNet``'s ``centre_sets``): use it
when one person drew the support images and another the queries, with every class among the queries about equally.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

from datamodules.omniglot import load_image
from lightning_modules.checkpoints import read_checkpoint
from lightning_modules.few_shot import FewShotModule, NearestNeighbourBaseline, ProtoNet

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_support(folder: Path) -> tuple[list[str], list[Path], list[int]]:
    """(class names, image paths, label per image) of a folder with one sub-folder per class."""
    if not folder.is_dir():
        raise SystemExit(f"error: --support {folder} is not a folder (expected one sub-folder of images per class).")
    classes, paths, labels = [], [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = _images(sub)
        if files:
            labels += [len(classes)] * len(files)
            classes.append(sub.name)
            paths += files
    if len(classes) < 2:
        raise SystemExit(
            f"error: --support {folder} has {len(classes)} class sub-folder(s) with images; a few-shot task needs at "
            "least 2 (one sub-folder per class, e.g. support/cat/1.png, support/dog/1.png)."
        )
    return classes, paths, labels


def load_model(checkpoint: str | None, baseline: str | None) -> tuple[FewShotModule, dict]:
    """The model, and the preprocessing its training data used (``image_size``, ``invert``, ``fit_strokes``)."""
    if baseline:
        return NearestNeighbourBaseline(features=baseline).eval(), {}
    state = read_checkpoint(checkpoint)
    data = state.get("datamodule_hyper_parameters", {})
    model = ProtoNet.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    return model, {key: data[key] for key in ("image_size", "invert", "fit_strokes") if key in data}


def predict(
    model: FewShotModule,
    support_dir: Path,
    query_dir: Path,
    image_size: int | None = None,
    invert: bool = True,
    fit_strokes: float | None = None,
) -> list[tuple[str, str, float]]:
    """``(query path relative to query_dir, predicted class, its probability)`` for every query image."""
    classes, support_paths, labels = read_support(support_dir)
    queries = _images(query_dir) if query_dir.is_dir() else []
    if not queries:
        raise SystemExit(f"error: --query {query_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    size = image_size or model.input_shape[-1]

    def batch(paths: list[Path]) -> torch.Tensor:
        arrays = np.stack([load_image(p, size, invert, fit_strokes) for p in paths])
        return torch.from_numpy(arrays).unsqueeze(1).float().div_(255.0)

    episode = {"support": batch(support_paths), "support_labels": torch.tensor(labels), "query": batch(queries)}
    with torch.no_grad():
        out = model.predict_step(episode)
    return [
        (q.relative_to(query_dir).as_posix(), classes[int(label)], float(probs[label]))
        for q, label, probs in zip(queries, out["labels"], out["probabilities"], strict=True)
    ]


def main(args: list[str] | None = None) -> list[tuple[str, str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a ProtoNet checkpoint (.ckpt) written by scripts/train.py fit")
    source.add_argument("--baseline", choices=["pixels", "random_encoder"], help="nearest neighbour, no training")
    parser.add_argument("--support", required=True, type=Path, help="folder with one sub-folder of images per class")
    parser.add_argument("--query", required=True, type=Path, help="folder of images to label")
    parser.add_argument("--output", type=Path, help="CSV file to write (default: print)")
    parser.add_argument("--image_size", type=int, help="override the input size (default: as in training)")
    parser.add_argument(
        "--invert", action=argparse.BooleanOptionalAction, default=None, help="dark strokes on light paper -> bright"
    )
    parser.add_argument(
        "--centre_sets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="centre support and query embeddings on their own means (default: as the checkpoint says)",
    )
    opts = parser.parse_args(args)
    model, data = load_model(opts.checkpoint, opts.baseline)
    if opts.centre_sets is not None:
        if not isinstance(model, ProtoNet):
            raise SystemExit("error: --centre_sets needs a ProtoNet --checkpoint, not a --baseline.")
        model.centre_sets = opts.centre_sets
    invert = data.get("invert", True) if opts.invert is None else opts.invert
    size = opts.image_size or data.get("image_size")
    rows = predict(model, opts.support, opts.query, size, invert, data.get("fit_strokes"))
    out = open(opts.output, "w", newline="") if opts.output else sys.stdout  # noqa: SIM115
    try:
        writer = csv.writer(out)
        writer.writerow(["query", "label", "probability"])
        writer.writerows((q, label, f"{p:.4f}") for q, label, p in rows)
    finally:
        if opts.output:
            out.close()
    return rows


if __name__ == "__main__":
    from cli_errors import run_command  # errors as one paragraph (TEMPLATE_TRACEBACK=1: the traceback)

    sys.exit(run_command(main))
