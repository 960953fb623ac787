"""Our experiments against plain PyTorch loops and per-sample pipelines, side by side, as Markdown tables.

    python scripts/benchmark.py                 # both suites, 5 alternating repetitions: medians and best runs
    python scripts/benchmark.py --suite cifar   # one suite (mnist | cifar)
    python scripts/benchmark.py --quick         # tiny data, one repetition: checks that it runs (CI)
    python scripts/benchmark.py --same-process  # every run in this one process (finer on a noisy machine)

**MNIST suite** (seconds per epoch).

Every pipeline trains the book MLP (784-256-256-10, dropout .45, Adam) for ``--epochs`` epochs on 55,000 training
and 5,000 validation images at batch 128 and reports its fastest epoch (training + validation) after the first, so
start-up, imports, one-off decoding and warm-up are excluded. Each measurement runs in a fresh process; the
pipelines alternate within each repetition so drifts of the machine hit all of them alike. The table gives the
median over repetitions and the fastest repetition: on a shared 2-core VM the same process can run 1.5x slower
from one launch to the next, and the fastest repetition is the one least disturbed. ``--same-process`` runs every
repetition in the benchmark's own process instead (the pipelines still alternate), so a change of the machine's
speed between process launches no longer lands on one pipeline only.

- ``plain``: a hand-written loop over pre-normalised float tensors already in memory, with PyTorch's defaults
  (``nn.Dropout``, ``torch.optim.Adam``): the floor a researcher writes.
- ``plain_template_kernels``: the same loop with the two kernels the template picks, its CPU dropout
  (``lifecycle.speedups.ThresholdDropout``) and fused Adam: against it, the template's ratio is the cost of Lightning
  and of the template's logging, metrics and callbacks alone.
- ``lightning_minimal``: the same model, data and validation in a minimal LightningModule run by a bare
  ``Trainer`` (no metric objects, logging, callbacks or checkpoints): Lightning's own per-step cost.
- ``template``: ``configs/mnist/mlp.yaml`` through the CLI, i.e. the real experiment: MNISTDataModule reading IDX
  files, torchmetrics, CSV + TensorBoard logging, checkpointing, early stopping and EMA curves (progress bar off).
- ``per_sample``: the common torchvision path: uint8 array -> PIL image -> ToTensor -> Normalize per sample, default
  collate, then the same plain loop.
- ``per_sample_lightning``: the same data path under Lightning, with a module in the style of
  lightning-hydra-template's MNIST module (torchmetrics accuracy and mean loss called and logged at every step,
  ``ReduceLROnPlateau``, best-model checkpointing and early stopping; no logger or progress bar): the kind of
  pipeline the issue's "per-sample" anchor is.

A second table pairs epochs instead of runs: each epoch of ``lightning_minimal`` and ``template`` is followed, in
the same process, by one epoch of each plain loop, and each ratio is the median over those pairs. On this VM, whose
speed drifts by tens of percent between launches and over minutes, it is the steadier of the two ratios.

The plain loops run as in a process without Lightning: importing Lightning makes ``torch.cuda.is_available()`` an
NVML probe that a GPU-less machine repeats at every optimiser step (0.3 ms), which the template switches off when
training starts and the minimal module, as Lightning ships, keeps.

Every pipeline trains on one GPU when there is one (clocks read after ``torch.cuda.synchronize()``), else on the CPU.
The data are the fake digits of :func:`datamodules.synthetic.write_mnist` in MNIST's shape (speed does not depend on
the pixels), written as IDX files for the template; no download is needed.

**CIFAR-10 suite** (training images per second, ResNet20 v1, batch 32, the book's shift + flip augmentation).
Each pipeline trains ``--steps`` timed steps after a few warm-up steps, each in a fresh process:

- ``plain``: a hand-written loop with the same network, loss, L2 penalty, Adam and ``BatchAugment`` over a ``uint8``
  tensor in memory (per-pixel mean subtraction per batch).
- ``template``: ``configs/cifar10/resnet20_v1.yaml`` through the CLI (fake CIFAR-10 pickles in torchvision's
  layout): every callback of the recipe, logging, metrics and checkpointing.
- ``loader``: the template's training data path alone (batches + normalisation + augmentation, no model), the
  ceiling the data path puts on training speed.
- ``loader_albumentations``: the same with the per-sample albumentations path (``SampleAugment("book")``, in the
  main process) instead of the batch augmentation.

The pipelines live in ``scripts/bench_mnist.py`` and ``scripts/bench_cifar.py`` (what they share in
``scripts/bench_common.py``); this file runs them, each in a fresh process or all in this one, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_cifar import CIFAR_BATCH, CIFAR_PIPELINES, CIFAR_VAL_SIZE, CIFAR_WARMUP, run_cifar
from bench_mnist import BATCH, MNIST_RUNS, PAIRED_PIPELINES, PIPELINES, run_paired

from datamodules.synthetic import write_cifar10, write_mnist


def run_pipeline(
    suite: str, pipeline: str, data_dir: Path, val_size: int, epochs: int, steps: int
) -> float | list[list[float]]:
    """One measurement in this process: MNIST seconds per epoch (the fastest after the first), CIFAR images/s, or
    for ``paired`` the ``[pipeline, plain]`` seconds of each epoch (:func:`run_paired`).

    Every pipeline starts from the CUDA check importing Lightning leaves; the plain references switch it back as
    a process without Lightning would have it (:func:`bench_common.as_without_lightning`), the template switches it
    itself when training starts (on a GPU-less machine), the minimal module keeps it.
    """
    from lifecycle.speedups import NVML_CUDA_CHECK

    os.environ[NVML_CUDA_CHECK] = "1"
    if suite == "cifar":
        return run_cifar(pipeline, data_dir, steps)
    if suite == "paired":
        return run_paired(pipeline, data_dir, val_size, epochs)
    seconds = MNIST_RUNS[pipeline](data_dir, val_size, epochs)
    return min(seconds[1:] or seconds)


def measure(
    suite: str, pipeline: str, data_dir: Path, val_size: int, epochs: int, steps: int, same_process: bool = False
) -> float | list[list[float]]:
    """One measurement in a fresh process, or in this one with ``same_process``; either way it runs in
    ``data_dir``, so the template's ``runs/`` folder is thrown away with it."""
    if same_process:
        previous = os.getcwd()
        os.chdir(data_dir)
        try:
            return run_pipeline(suite, pipeline, data_dir, val_size, epochs, steps)
        finally:
            os.chdir(previous)
    command = [sys.executable, __file__, "--child-suite", suite, "--child", pipeline, "--data-dir", str(data_dir)]
    command += ["--val-size", str(val_size), "--epochs", str(epochs), "--steps", str(steps)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=data_dir).stdout
    return json.loads(out.strip().splitlines()[-1])["value"]


def alternate(suite: str, pipelines: tuple[str, ...], reps: int, **kwargs) -> dict[str, list]:
    """``reps`` measurements per pipeline (see :func:`measure`); the pipelines alternate within each repetition."""
    values: dict[str, list] = {p: [] for p in pipelines}
    for rep in range(reps):
        for pipeline in pipelines:
            values[pipeline].append(measure(suite, pipeline, **kwargs))
            value = values[pipeline][-1]
            if isinstance(value, float):
                shown = f"{value:.3f}"
            else:  # paired: the seconds of each epoch and of the plain epochs after it
                shown = " ".join("/".join(f"{v:.3f}" for v in epoch) for epoch in value)
            print(f"{suite} rep {rep + 1}/{reps} {pipeline}: {shown}", file=sys.stderr)
    return values


def print_table(values: dict[str, list[float]], unit: str, higher_is_better: bool, digits: int) -> dict[str, float]:
    """Markdown table of the median and the best repetition of each pipeline, each also as a ratio to ``plain``;
    returns the medians."""
    best = max if higher_is_better else min
    medians = {p: statistics.median(v) for p, v in values.items()}
    bests = {p: best(v) for p, v in values.items()}
    print(f"| pipeline | {unit}, median | vs plain loop | {unit}, best run | vs plain loop, best runs |")
    print("| --- | --- | --- | --- | --- |")
    for p in values:
        ratios = medians[p] / medians["plain"], bests[p] / bests["plain"]
        print(f"| {p} | {medians[p]:.{digits}f} | {ratios[0]:.2f} | {bests[p]:.{digits}f} | {ratios[1]:.2f} |")
    return medians


def print_paired_table(pairs: dict[str, list[list[list[float]]]]) -> None:
    """Markdown table of paired epochs: each pipeline epoch over the epochs of the two plain loops run right after
    it (``plain``, then ``plain_template_kernels``)."""
    print(
        "| pipeline | s / epoch, median | plain loop s / epoch, median | vs plain loop, median of pairs | range "
        "| plain loop with the template's kernels, s / epoch | vs it, median of pairs | range |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for p, runs in pairs.items():
        epochs = [epoch for run in runs for epoch in run]
        cells = [f"{statistics.median(e[0] for e in epochs):.3f}"]
        for ref in (1, 2):
            ratios = [e[0] / e[ref] for e in epochs]
            cells += [f"{statistics.median(e[ref] for e in epochs):.3f}", f"{statistics.median(ratios):.2f}"]
            cells.append(f"{min(ratios):.2f}-{max(ratios):.2f}")
        print(f"| {p} | {' | '.join(cells)} |")


def runs_text(reps: int, same_process: bool) -> str:
    return f"{reps} runs per pipeline " + ("alternating in one process" if same_process else "in fresh processes")


def mnist_suite(quick: bool, reps: int, epochs: int, same_process: bool) -> None:
    n_train, val_size = (1_024, 256) if quick else (60_000, 5_000)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_mnist(Path(tmp), n_train=n_train, n_test=256)
        values = alternate(
            "mnist", PIPELINES, reps, data_dir=data_dir, val_size=val_size, epochs=epochs, steps=0,
            same_process=same_process,
        )  # fmt: skip
        pairs = alternate(
            "paired", PAIRED_PIPELINES, reps, data_dir=data_dir, val_size=val_size, epochs=epochs, steps=0,
            same_process=same_process,
        )  # fmt: skip
    print(
        f"\nMNIST MLP, {n_train - val_size} train + {val_size} val images, batch {BATCH}, "
        f"{runs_text(reps, same_process)}, fastest of epochs 2-{epochs} of each run (epoch 1 when only one), "
        f"torch threads {torch.get_num_threads()}\n"
    )
    medians = print_table(values, "s / epoch", higher_is_better=False, digits=3)
    for reference in ("per_sample", "per_sample_lightning", "plain_template_kernels"):
        print(f"\n{reference} / template (medians): {medians[reference] / medians['template']:.2f}x")
    print(
        f"\nThe same Lightning pipelines with every epoch followed by one epoch of each plain loop in the same process "
        f"({runs_text(reps, same_process)}; the pairs of epochs 2-{epochs}): a change of the machine's speed between "
        "runs or launches hits both sides of a pair alike.\n"
    )
    print_paired_table(pairs)


def cifar_suite(quick: bool, reps: int, steps: int, same_process: bool) -> None:
    n_train = 1_000 if quick else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_cifar10(Path(tmp), per_batch=n_train // 5, n_test=100)
        values = alternate(
            "cifar", CIFAR_PIPELINES, reps, data_dir=data_dir, val_size=CIFAR_VAL_SIZE, epochs=1, steps=steps,
            same_process=same_process,
        )  # fmt: skip
    print(
        f"\nCIFAR-10 ResNet20 v1 training, batch {CIFAR_BATCH}, book augmentation (shift 0.1 + flip), {steps} timed "
        f"steps after {CIFAR_WARMUP} warm-up steps, {runs_text(reps, same_process)}, torch threads "
        f"{torch.get_num_threads()}\n"
    )
    print_table(values, "images / s", higher_is_better=True, digits=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("all", "mnist", "cifar"), default="all", help="which table(s) to measure")
    parser.add_argument("--child-suite", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions per pipeline")
    parser.add_argument("--epochs", type=int, default=3, help="MNIST: epochs per run; the fastest after the 1st counts")
    parser.add_argument("--steps", type=int, default=40, help="CIFAR-10: timed training steps per run")
    parser.add_argument("--quick", action="store_true", help="tiny data, one repetition: only checks it runs")
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run every repetition in this one process instead of fresh ones: finer comparisons on a machine whose "
        "speed changes from one process launch to the next",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--val-size", type=int, default=5000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        value = run_pipeline(args.child_suite, args.child, args.data_dir, args.val_size, args.epochs, args.steps)
        print(json.dumps({"pipeline": args.child, "value": value}))
        return
    reps, epochs, steps = (1, 1, 2) if args.quick else (args.reps, args.epochs, args.steps)
    if args.suite in ("all", "mnist"):
        mnist_suite(args.quick, reps, epochs, args.same_process)
    if args.suite in ("all", "cifar"):
        cifar_suite(args.quick, reps, steps, args.same_process)


if __name__ == "__main__":
    main()
