"""The fast MNIST recipe (``configs/mnist/fast.yaml``) as a plain PyTorch loop: the reference of the time-to-accuracy
table in BENCHMARKS.md.

The recipe's network, augmentation, optimiser, one-cycle schedule, label smoothing, batch size and epochs, all read
from the config file (not re-typed here), driven by a hand-written loop (on the GPU when one is visible, as the CLI)
with no Lightning trainer, checkpoints, logging or validation. It reads the MNIST IDX files of ``D/MNIST/raw`` as
``MNISTDataModule`` does (e.g. a fold that ``scripts/mnist_folds.py`` wrote) and prints the test accuracy and the
wall time of the whole run. A gap between this loop and the CLI run of the same config on the same files (accuracy
or time) is the framework's::

    python scripts/plain_fast_mnist.py --data-dir data/mnist_folds/fold0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from plain_recipe import class_of, read_recipe

from datamodules import MNISTDataModule
from datamodules.augment import BatchAugment
from lightning_modules.cnn import CNNClassifier, ConvNet

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist" / "fast.yaml"


def recipe(config: Path = CONFIG) -> dict:
    """The config's settings (:func:`plain_recipe.read_recipe`), the model's under CNNClassifier's defaults."""
    return read_recipe(config, CNNClassifier)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="holds MNIST/raw/{train,t10k}-*-idx*-ubyte[.gz]")
    parser.add_argument("--config", type=Path, default=CONFIG, help="default: configs/mnist/fast.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's trainer.max_epochs")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    hp = recipe(args.config)
    epochs = args.epochs or hp["epochs"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    data = MNISTDataModule(data_dir=str(args.data_dir), **hp["data"])
    data.setup("fit")
    data.setup("test")
    images = data.normalize_images(data.train_set.images.to(device))
    labels = data.train_set.targets.to(device)
    test_images, test_labels = data.normalize_images(data.test_set.images.to(device)), data.test_set.targets

    m = hp["model"]
    net = ConvNet(
        data.dims, m["filters"], data.num_classes, m["kernel_size"], m["pool_size"], m["stride"], m["padding"],
        m["dropout"], m["activation"], m["batch_norm"],
    ).to(device)  # fmt: skip
    optimizer = class_of(hp["optimizer"])(net.parameters(), **hp["optimizer"]["init_args"])
    batch_size = data.hparams.batch_size
    steps_per_epoch = len(images) // batch_size + bool(len(images) % batch_size)
    schedule = class_of(hp["lr_scheduler"])(
        optimizer, total_steps=steps_per_epoch * epochs, **hp["lr_scheduler"]["init_args"]
    )
    augment = BatchAugment(**hp["augment"])

    for epoch in range(epochs):
        net.train()
        epoch_start = time.perf_counter()
        for batch in torch.randperm(len(images), device=device).split(batch_size):
            loss = F.cross_entropy(
                net(augment(images[batch])), labels[batch], label_smoothing=m.get("label_smoothing", 0.0)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch}: loss {loss.item():.4f}, {time.perf_counter() - epoch_start:.1f} s", flush=True)

    net.eval()
    with torch.no_grad():
        predictions = torch.cat([net(chunk).argmax(1).cpu() for chunk in test_images.split(1000)])
    accuracy = (predictions == test_labels).float().mean().item()
    print(f"test accuracy {accuracy:.4f} on {len(test_labels)} images; {time.perf_counter() - start:.1f} s in all")
    return accuracy


if __name__ == "__main__":
    from cli_errors import run_command  # errors as one paragraph (TEMPLATE_TRACEBACK=1: the traceback)

    sys.exit(run_command(main))
