"""Held-out accuracy of an MNIST config on a small labelled set, every image tested once (K folds).

    python scripts/mnist_folds.py --images IMAGES --labels LABELS -c configs/mnist/fast.yaml
    python scripts/mnist_folds.py --images IMAGES --labels LABELS -c configs/mnist/cnn.yaml \\
        --data.init_args.val_size 0 --checkpoint null --early_stopping null    # the book CNN on the same folds
    python scripts/mnist_folds.py --images IMAGES --labels LABELS --data_only  # only write the folds' files

IMAGES and LABELS are IDX files (gzipped or not) of labelled digits, such as MNIST's official test files
``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``; ``--first N`` keeps their first N (all by default).
Fold k (0 to K-1) tests on the k-th block of consecutive images (N/K of them) and trains on all the others, in their
order. Its four IDX files go to ``OUT/fold<k>/MNIST/raw`` (``OUT`` defaults to ``$DATA_DIR/mnist_folds``, or
``./data/mnist_folds``), so ``--data.init_args.data_dir OUT/fold<k>`` trains on it. Each fold is then one
``scripts/train.py fit ... --test_after_fit true`` in this process, its run in ``runs/<experiment>_fold<k>``;
options this script does not know go to that CLI. The table at the end gives each fold's test accuracy, errors, wall
and CPU time (of the fit and test in this process: a separate command also pays Python's start-up and imports), and
the accuracy over all N held-out images with its 95 % interval: with 500 test images one image is 0.2 points, and
the 10 folds of 5,000 images give an interval sqrt(10), about 3 times, narrower than one 500-image split.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.base import CorruptDataError, DataNotFoundError, default_data_dir
from datamodules.mnist import MNIST_FILES, read_idx_ubyte
from datamodules.synthetic import write_idx

ROOT = Path(__file__).resolve().parents[1]


def read_digits(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ``(N, 28, 28)`` images and ``(N,)`` labels of two IDX files, which must hold the same number of digits."""
    for option, path in (("--images", images), ("--labels", labels)):
        if not path.is_file():
            raise DataNotFoundError(
                f"{option} {path}: no such file. Pass the IDX files (optionally .gz) of the images and their labels, "
                "e.g. MNIST's t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
            )
    x, y = read_idx_ubyte(images, ndim=3).numpy(), read_idx_ubyte(labels, ndim=1).numpy()
    if len(x) != len(y):
        raise CorruptDataError(
            f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; pass the label file that belongs "
            "to these images."
        )
    return x, y


def held_out_blocks(n: int, folds: int) -> list[np.ndarray]:
    """The test indices of each fold: ``folds`` blocks of consecutive indices covering ``0 .. n-1`` once."""
    if not 2 <= folds <= n:
        raise ValueError(f"--folds {folds}: choose between 2 and the number of images ({n}).")
    return np.array_split(np.arange(n), folds)


def write_folds(x: np.ndarray, y: np.ndarray, out: Path, folds: int) -> list[Path]:
    """Write every fold's train and test IDX files (MNIST's raw layout) under ``out/fold<k>``; returns the folders.
    Each file is written whole under a temporary name and then renamed, so an interrupted run leaves no fold that
    mixes two sets of images."""
    dirs = []
    for k, test in enumerate(held_out_blocks(len(x), folds)):
        train = np.setdiff1d(np.arange(len(x)), test)  # sorted: the training images keep their order
        raw = out / f"fold{k}" / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", train), ("test", test)):
            for name, array in zip(MNIST_FILES[split], (x[rows], y[rows]), strict=True):
                (raw / f"{name}.gz").unlink(missing_ok=True)  # the loader would otherwise see two copies' names
                # a name of this process's own: under DDP every rank writes the same files at once
                os.replace(write_idx(raw / f"{name}.{os.getpid()}.part", array), raw / name)
        dirs.append(out / f"fold{k}")
    return dirs


def experiment_name(configs: list[str]) -> str:
    """The ``experiment`` the configs set (the last one that sets it wins), else ``mnist``."""
    name = "mnist"
    for config in configs:
        path = Path(config) if Path(config).is_absolute() else ROOT / config  # as results.run_experiment reads it
        text = yaml.safe_load(path.read_text()) or {}
        name = text.get("experiment") or name
    return name


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_folds(dirs: list[Path], configs: list[str], name: str, cli_args: list[str]) -> list[dict[str, Any]]:
    """``fit --test_after_fit true`` on every fold; one row per fold (test accuracy, images, errors, wall and CPU
    time)."""
    from results import run_experiment  # imports Lightning: not needed to write the folds

    rows = []
    for k, data_dir in enumerate(dirs):
        args = ["--data.init_args.data_dir", str(data_dir), "--experiment", f"{name}_fold{k}", *cli_args]
        cpu = cpu_seconds()
        row = run_experiment({"configs": configs, "args": args, "metric": "test/acc"}, max_time=None)
        images = len(read_idx_ubyte(data_dir / "MNIST" / "raw" / MNIST_FILES["test"][1], ndim=1))
        errors = round((1 - row["value"]) * images)
        rows.append({"fold": k, "acc": row["value"], "images": images, "errors": errors, "wall_s": row["wall_s"]})
        rows[-1]["cpu_s"] = cpu_seconds() - cpu
    return rows


def pooled(rows: list[dict[str, Any]]) -> tuple[float, int, int, float]:
    """Accuracy over every fold's test images, the errors, the images, and the half-width of its 95 % interval."""
    errors = sum(r["errors"] for r in rows)
    images = sum(r["images"] for r in rows)
    acc = 1 - errors / images
    return acc, errors, images, 1.96 * math.sqrt(acc * (1 - acc) / images)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| fold | test images | test acc | errors | wall | CPU (user + sys) |", "| --- " * 6 + "|"]
    for r in rows:
        lines.append(
            f"| {r['fold']} | {r['images']} | {100 * r['acc']:.2f} % | {r['errors']} | {r['wall_s']:.0f} s "
            f"| {r['cpu_s'] / 60:.2f} min |"
        )
    acc, errors, images, half = pooled(rows)
    lines.append(f"| all | {images:,} | **{100 * acc:.2f} ± {100 * half:.2f} %** | {errors} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description="K-fold held-out accuracy of an MNIST config; other options go to scripts/train.py's CLI.",
        allow_abbrev=False,
    )
    parser.add_argument("--images", type=Path, required=True, help="IDX file of the images (optionally .gz)")
    parser.add_argument("--labels", type=Path, required=True, help="IDX file of their labels (optionally .gz)")
    parser.add_argument("--first", type=int, default=None, help="use only the first N images (default: all)")
    parser.add_argument("--folds", type=int, default=10, help="number of folds K (default 10)")
    parser.add_argument("--out", type=Path, default=None, help="where the folds go (default $DATA_DIR/mnist_folds)")
    parser.add_argument("-c", "--config", action="append", default=[], help="config(s) to fit, as for train.py")
    parser.add_argument("--data_only", action="store_true", help="write the folds' IDX files and stop")
    args, rest = parser.parse_known_args(argv)
    if rest and rest[0] == "fit":
        rest = rest[1:]
    if not args.data_only and not args.config:
        parser.error("give the config to evaluate with -c (e.g. -c configs/mnist/fast.yaml), or --data_only.")
    x, y = read_digits(args.images, args.labels)
    if args.first is not None:
        if not 0 < args.first <= len(x):
            raise ValueError(f"--first {args.first}: {args.images} holds {len(x)} images; choose 1 to {len(x)}.")
        x, y = x[: args.first], y[: args.first]
    dirs = write_folds(x, y, args.out or Path(default_data_dir()) / "mnist_folds", args.folds)
    print(f"{args.folds} folds of {len(x)} images in {dirs[0].parent} (fold0 to fold{args.folds - 1})")
    if args.data_only:
        return []
    from pytorch_lightning.utilities import rank_zero_only

    rows = run_folds(dirs, args.config, experiment_name(args.config), rest)
    if rank_zero_only.rank == 0:  # every DDP rank runs the folds; one prints
        print(table(rows))
    return rows


if __name__ == "__main__":
    from cli_errors import run_command  # errors as one paragraph (TEMPLATE_TRACEBACK=1: the traceback)

    sys.exit(run_command(main))
