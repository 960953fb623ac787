"""The fast Omniglot recipe (``configs/omniglot/fast.yaml``) as a plain PyTorch loop: the reference of the
time-to-accuracy table in BENCHMARKS.md.

The recipe's encoder, augmentation, optimiser, one-cycle schedule, ``all_pairs`` loss, episodes and test-time views,
all read from the config file (not re-typed here), driven by a hand-written loop (on the GPU when one is visible, as
the CLI) with no Lightning trainer, data loaders, checkpoints, logging or validation. ``OmniglotDataModule`` reads,
fits and pools the drawings and draws the episodes, the same ones as the CLI run with the same seed. The loop scores
every test run inductively, as the recipe does (``centre_sets`` is not applied), and prints the mean accuracy over
the runs with its 95 % interval and the wall time of the whole run. A gap between this loop and the CLI run of the
same config on the same alphabets (accuracy or time) is the framework's::

    python scripts/plain_fast_omniglot.py --data-dir DATA --test-alphabets "Japanese_(katakana)" Sanskrit
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from plain_recipe import class_of, read_recipe
from torch import Tensor

from datamodules.augment import BatchAugment
from datamodules.omniglot import OmniglotDataModule
from lightning_modules.few_shot import (
    ProtoNet,
    ProtoNetEncoder,
    all_pairs_logits,
    mean_and_ci95,
    prototypes,
    squared_euclidean,
)
from lightning_modules.tta import shift_averaged, symmetry_concatenated

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "omniglot" / "fast.yaml"


def recipe(config: Path = CONFIG) -> dict:
    """The config's settings (:func:`plain_recipe.read_recipe`), the model's under ProtoNet's defaults."""
    return read_recipe(config, ProtoNet)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="holds omniglot-py/images_background_small1, ...")
    parser.add_argument(
        "--test-alphabets", nargs="+", default=None, help="background alphabets held out for the test runs "
        "(default: the config's test alphabets, i.e. images_evaluation's)",
    )  # fmt: skip
    parser.add_argument("--config", type=Path, default=CONFIG, help="default: configs/omniglot/fast.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's trainer.max_epochs")
    parser.add_argument("--seed", type=int, default=42, help="the training episodes' and the weights' seed")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    hp = recipe(args.config)
    m, epochs = hp["model"], args.epochs or hp["epochs"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory_format = torch.channels_last if hp["data"].get("channels_last") else torch.contiguous_format

    settings = {**hp["data"], "data_dir": str(args.data_dir)}
    if args.test_alphabets:
        settings["test_alphabets"] = args.test_alphabets
    data = OmniglotDataModule(**settings)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    augment = BatchAugment(**hp["augment"]) if hp["augment"] else None

    def pixels(images: Tensor, training: bool) -> Tensor:
        """uint8 drawings -> float in [0, 1] on the device (the datamodule's scaling), augmented when training."""
        images = images.to(device).float().div_(255.0)
        if training and augment is not None:
            images = augment(images)
        return images.contiguous(memory_format=memory_format)

    encoder = ProtoNetEncoder(m["input_shape"][0], m["filters"], m["blocks"]).to(device, memory_format=memory_format)
    optimizer = class_of(hp["optimizer"])(encoder.parameters(), **hp["optimizer"]["init_args"])
    episodes = len(data.train_set)
    schedule = class_of(hp["lr_scheduler"])(optimizer, total_steps=episodes * epochs, **hp["lr_scheduler"]["init_args"])

    for epoch in range(epochs):
        encoder.train()
        epoch_start, losses = time.perf_counter(), []
        for index in range(episodes):
            episode = data.train_set.episode(args.seed, epoch, index)
            support, query = pixels(episode["support"], True), pixels(episode["query"], True)
            embeddings, way = encoder(torch.cat([support, query])), len(episode["classes"])
            if m["all_pairs"]:
                logits, labels = all_pairs_logits(embeddings, way)
            else:
                centres = prototypes(embeddings[: len(support)], episode["support_labels"].to(device), way)
                logits, labels = -squared_euclidean(embeddings[len(support) :], centres), episode["query_labels"]
            loss = F.cross_entropy(logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())
        mean_loss = torch.stack(losses).mean().item()
        print(f"epoch {epoch}: loss {mean_loss:.4f}, {time.perf_counter() - epoch_start:.1f} s", flush=True)

    encoder.eval()
    embed = partial(symmetry_concatenated, partial(shift_averaged, encoder, radius=m["tta_shift"]))
    accuracies = []
    with torch.no_grad():
        for index in range(len(data.test_set)):
            episode = data.test_set.episode(data.hparams.seed, 0, index)
            support, query, way = episode["support"], episode["query"], len(episode["classes"])
            embeddings = embed(pixels(torch.cat([support, query]), False), m["tta_symmetries"])
            centres = prototypes(embeddings[: len(support)], episode["support_labels"].to(device), way)
            predictions = squared_euclidean(embeddings[len(support) :], centres).argmin(1).cpu()
            accuracies.append((predictions == episode["query_labels"]).float().mean())
    mean, ci95 = mean_and_ci95(torch.stack(accuracies))
    print(
        f"test accuracy {mean:.4f} ± {ci95:.4f} over {len(accuracies)} runs; {time.perf_counter() - start:.1f} s in all"
    )
    return mean


if __name__ == "__main__":
    from cli_errors import run_command  # errors as one paragraph (TEMPLATE_TRACEBACK=1: the traceback)

    sys.exit(run_command(main))
