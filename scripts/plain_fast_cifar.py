"""The fast CIFAR-10 recipe (``configs/cifar10/fast.yaml``) as a plain PyTorch loop: the reference of the
time-to-accuracy table in BENCHMARKS.md.

The same network, whitening, optimiser, schedule, lookahead, augmentation and test-time augmentation as
:class:`~lightning_modules.airbench.AirbenchClassifier` (imported, not re-written), driven by a hand-written loop
with no Lightning, no checkpoints, no logging and no validation. It reads an image-folder copy of CIFAR-10
(``D/train/<class>/*``, ``D/test/<class>/*``) as ``ImageFolderDataModule`` does and prints the held-out accuracy and
the wall time of the whole run. A gap between this loop and the CLI run (accuracy or time) is the framework's::

    python scripts/plain_fast_cifar.py --data-dir D --val-size 1000       # as the CLI run with the same val_size
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from datamodules import ImageFolderDataModule
from datamodules.augment import BatchAugment
from lightning_modules.airbench import (
    AirbenchClassifier,
    AirbenchNet,
    Lookahead,
    decoupled_step_sizes,
    parameter_groups,
    whitening_filters,
)
from lightning_modules.tta import tta_logits


def recipe() -> dict:
    """The recipe's hyperparameters: the classifier's defaults (the values of configs/cifar10/fast.yaml)."""
    params = inspect.signature(AirbenchClassifier.__init__).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def lr_factor(step: int, total: int, hp: dict) -> float:
    """The classifier's schedule: a linear warm-up from ``warmup_start`` to 1, then down to ``final_lr_factor``."""
    warmup = min(max(1, int(total * hp["warmup_fraction"])), max(1, total - 1)) if hp["warmup_fraction"] else 0
    if step < warmup:
        return hp["warmup_start"] + (1 - hp["warmup_start"]) * step / warmup
    return 1 + (hp["final_lr_factor"] - 1) * min(1.0, (step - warmup) / max(1, total - warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="image-folder copy: train/<class>, test/<class>")
    parser.add_argument("--val-size", type=int, default=1000, help="training images left out, as the CLI's val_size")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--precision", choices=("bf16-mixed", "32-true"), default="bf16-mixed")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    hp = recipe()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )

    data = ImageFolderDataModule(
        data_dir=str(args.data_dir), image_size=(32, 32), val_size=args.val_size, normalize="standardize"
    )
    data.prepare_data()
    data.setup("fit")
    images = data.normalize_images(data.train_set.images.to(device)).contiguous(memory_format=torch.channels_last)
    labels = data.train_set.targets.to(device)
    test_images, test_labels = data.load_split("test")
    test_images = data.normalize_images(test_images.to(device)).contiguous(memory_format=torch.channels_last)

    net = AirbenchNet((3, 32, 32), 10, hp["widths"], hp["bn_momentum"], hp["logit_scale"]).to(device)
    net = net.to(memory_format=torch.channels_last)
    with torch.no_grad():
        net.whiten.weight.copy_(whitening_filters(images[: hp["whiten_samples"]], (2, 2), hp["whiten_eps"]))
    net.whiten.weight.requires_grad_(False)

    steps_per_epoch = len(images) // args.batch_size + bool(len(images) % args.batch_size)
    total = steps_per_epoch * args.epochs
    lr, decay = decoupled_step_sizes(hp["lr"], hp["weight_decay"], args.batch_size, hp["momentum"])
    groups = parameter_groups(net, lr, decay, hp["bias_lr_factor"])
    optimizer = torch.optim.SGD(groups, momentum=hp["momentum"], nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, hp))
    augment = BatchAugment(horizontal_flip=True, crop_padding=2)
    lookahead, step = Lookahead(), 0

    for epoch in range(args.epochs):
        net.train()
        epoch_start = time.perf_counter()
        for batch in torch.randperm(len(images), device=device).split(args.batch_size):
            with autocast:
                logits = net(augment(images[batch]))
                loss = F.cross_entropy(logits, labels[batch], label_smoothing=hp["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if epoch >= hp["whiten_bias_epochs"]:
                net.whiten.bias.grad = None
            optimizer.step()
            schedule.step()
            step += 1
            if step >= total:
                lookahead.update(net, decay=1.0)
            elif step % hp["lookahead_every"] == 0:
                lookahead.update(net, decay=hp["lookahead_decay"] ** hp["lookahead_every"] * (step / total) ** 3)
        print(f"epoch {epoch}: loss {loss.item():.4f}, {time.perf_counter() - epoch_start:.1f} s", flush=True)

    net.eval()
    with torch.no_grad(), autocast:
        logits = torch.cat([tta_logits(net, chunk, hp["tta_level"]) for chunk in test_images.split(1000)])
    accuracy = (logits.argmax(1).cpu() == test_labels).float().mean().item()
    print(f"test accuracy {accuracy:.4f} on {len(test_labels)} images; {time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    main()
