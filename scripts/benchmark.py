"""Seconds per MNIST epoch of our MLP experiment against a plain PyTorch loop and a per-sample pipeline.

    python scripts/benchmark.py                 # 3 alternating repetitions, Markdown table of medians
    python scripts/benchmark.py --quick         # tiny data, one repetition: checks that it runs (CI)

Every pipeline trains the book MLP (784-256-256-10, dropout .45, Adam) for ``--epochs`` epochs on 55,000 training
and 5,000 validation images at batch 128 and reports the duration of its last epoch (training + validation), so
start-up, imports and one-off decoding are excluded. Each measurement runs in a fresh process; the pipelines
alternate within each repetition so drifts of the machine hit all of them alike.

- ``plain``: a hand-written loop over pre-normalised float tensors already in memory (the floor).
- ``template``: ``configs/mnist/mlp.yaml`` through the CLI, i.e. the real experiment: MNISTDataModule reading IDX
  files, torchmetrics, CSV + TensorBoard logging, checkpointing, early stopping and EMA curves (progress bar off).
- ``per_sample``: the common torchvision path: uint8 array -> PIL image -> ToTensor -> Normalize per sample, default
  collate, then the same plain loop.

The data are random ``uint8`` images in MNIST's shape (speed does not depend on the pixels), written as IDX files
for the template; no download is needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("plain", "template", "per_sample")
BATCH = 128


def make_data(n_train: int, n_test: int, directory: Path) -> Path:
    """MNIST-shaped random data as IDX files in torchvision's raw layout under ``directory``."""
    raw = directory / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            array = rng.integers(0, 256 if kind.startswith("images") else 10, shape, dtype=np.uint8)
            header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())
    return directory


def load_split(data_dir: Path, val_size: int) -> tuple[torch.Tensor, ...]:
    from datamodules import MNISTDataModule

    images, labels = MNISTDataModule(data_dir=str(data_dir)).load_split("train")
    return images[val_size:], labels[val_size:], images[:val_size], labels[:val_size]


def book_mlp() -> nn.Module:
    from lightning_modules.mlp import MLP

    return MLP(784, (256, 256), 10, dropout=0.45, act="relu")


def plain_epochs(batches_of, n_train: int, x_val, y_val, epochs: int) -> float:
    """Train/validate the book MLP with a hand-written loop; returns the last epoch's seconds."""
    model = book_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    seconds = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for x, y in batches_of(n_train):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            correct = sum(
                (model(x_val[i : i + BATCH]).argmax(1) == y_val[i : i + BATCH]).sum()
                for i in range(0, len(x_val), BATCH)
            )
        float(correct)
        seconds = time.perf_counter() - start
    return seconds


def run_plain(data_dir: Path, val_size: int, epochs: int) -> float:
    x_train, y_train, x_val, y_val = load_split(data_dir, val_size)
    x_train, x_val = x_train.float() / 255, x_val.float() / 255

    def batches(n):
        perm = torch.randperm(n)
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            yield x_train[idx], y_train[idx]

    return plain_epochs(batches, len(x_train), x_val, y_val, epochs)


def run_per_sample(data_dir: Path, val_size: int, epochs: int) -> float:
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    x_train, y_train, x_val, y_val = load_split(data_dir, val_size)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])

    class PerSample(Dataset):
        def __init__(self, images, labels):
            self.images, self.labels = images.squeeze(1).numpy(), labels.tolist()

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(self.images[i], mode="L")), self.labels[i]

    train, val = PerSample(x_train, y_train), PerSample(x_val, y_val)
    val_x = torch.stack([val[i][0] for i in range(len(val))])  # built once, outside the timing
    loader = DataLoader(train, batch_size=BATCH, shuffle=True)

    def batches(_n):
        yield from loader

    return plain_epochs(batches, len(train), val_x, torch.tensor(val.labels), epochs)


def run_template(data_dir: Path, val_size: int, epochs: int) -> float:
    from pytorch_lightning.callbacks import Callback
    from train import main

    class EpochTimer(Callback):
        seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):  # Lightning 2: after the epoch's validation
            self.seconds.append(time.perf_counter() - self.start)

    cli = main(
        ["-c", str(ROOT / "configs/mnist/mlp.yaml"), "--data.init_args.data_dir", str(data_dir),
         "--data.init_args.val_size", str(val_size), "--trainer.max_epochs", str(epochs),
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"],
        run=False,
    )  # fmt: skip
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.seconds[-1]


def child(pipeline: str, data_dir: Path, val_size: int, epochs: int) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    run = {"plain": run_plain, "template": run_template, "per_sample": run_per_sample}[pipeline]
    print(json.dumps({"pipeline": pipeline, "seconds": run(data_dir, val_size, epochs)}))


def measure(pipeline: str, data_dir: Path, val_size: int, epochs: int) -> float:
    """One fresh process; it runs in ``data_dir``, so the template's ``runs/`` folder is thrown away with it."""
    command = [sys.executable, __file__, "--child", pipeline, "--data-dir", str(data_dir)]
    command += ["--val-size", str(val_size), "--epochs", str(epochs)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=data_dir).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions per pipeline")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed")
    parser.add_argument("--quick", action="store_true", help="tiny data, one repetition: only checks it runs")
    parser.add_argument("--child", choices=PIPELINES, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--val-size", type=int, default=5000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data_dir, args.val_size, args.epochs)
        return

    n_train, val_size, reps, epochs = (60_000, 5_000, args.reps, args.epochs)
    if args.quick:
        n_train, val_size, reps, epochs = (1_024, 256, 1, 1)
    times: dict[str, list[float]] = {p: [] for p in PIPELINES}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_data(n_train, 256, Path(tmp))
        for rep in range(reps):
            for pipeline in PIPELINES:
                times[pipeline].append(measure(pipeline, data_dir, val_size, epochs))
                print(f"rep {rep + 1}/{reps} {pipeline}: {times[pipeline][-1]:.3f} s", file=sys.stderr)

    medians = {p: statistics.median(t) for p, t in times.items()}
    print(
        f"\nMNIST MLP, {n_train - val_size} train + {val_size} val images, batch {BATCH}, median of {reps} fresh "
        f"processes, last of {epochs} epoch(s), torch threads {torch.get_num_threads()}\n"
    )
    print("| pipeline | s / epoch | vs plain loop |\n| --- | --- | --- |")
    for pipeline in PIPELINES:
        print(f"| {pipeline} | {medians[pipeline]:.3f} | {medians[pipeline] / medians['plain']:.2f} |")
    print(f"\nper_sample / template: {medians['per_sample'] / medians['template']:.2f}x")


if __name__ == "__main__":
    main()
