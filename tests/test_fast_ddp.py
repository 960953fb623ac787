"""The MNIST, IMDB and Omniglot fast recipes under real DDP (2 CPU processes, gloo) train the same parameters as one
process with the same global batch, as test_fast_cifar.py checks for the CIFAR-10 recipe and test_ddp.py for the book
MLP.

IMDB: full-batch steps (global batch = every training review), so the two processes' shards make up the one process's
batch whatever order the samplers draw, and the mean loss averages to the full-batch gradient; the NB ratio must come
from all the training reviews on both ranks. Omniglot: one episode a process and step against one process accumulating
two episodes; the episode sampler must deal the one process's episodes out to the ranks, and BatchNorm's batch
statistics are an episode's either way (CPU DDP has no SyncBatchNorm). All three use SGD, whose step is proportional
to the gradient (Adam's step turns rounding in near-zero gradients into whole steps), and one thread a process: with 2
threads in the one process, as Lightning gives 1 to each of 2 DDP processes on 2 cores, the convolutions add in
another order and the Omniglot parameters drift 2e-2 apart in 4 steps. Measured: the parameters agree to 1.2e-7
(MNIST), 6e-8 (IMDB) and exactly (Omniglot); with the NB ratio counted on each rank's shard of the reviews, the ratios
differ by up to 0.38, and with each rank drawing episodes from its own seed, the Omniglot parameters differ by 2.9.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omniglot_fakes import write_tree
from test_ddp import clean_env
from train import main

from datamodules.synthetic import write_imdb, write_mnist

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
         "--curves", "null"]  # fmt: skip
ONE = ["--trainer.devices", "1"]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
SGD = '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.9}}'
NOT_TRAINED = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics accumulate per process


def last_checkpoint(common: list[str], extra: list[str], cwd: Path) -> dict:
    cwd.mkdir()
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "fit", *common, *QUIET, *extra]
    result = subprocess.run(
        command, cwd=cwd, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (path,) = cwd.glob("runs/*/version_0/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_parameters(one: dict, ddp: dict, initial: dict, steps: int) -> None:
    assert one["global_step"] == ddp["global_step"] == steps
    moved = difference = 0.0
    for name, value in one["state_dict"].items():
        if name.endswith(NOT_TRAINED):
            continue
        difference = max(difference, (value.double() - ddp["state_dict"][name].double()).abs().max().item())
        moved = max(moved, (value.double() - initial[name].double()).abs().max().item())
    assert moved > 1e-2, f"training barely moved the weights ({moved:.2e}): the comparison is void"
    print(f"max |w_ddp - w_1proc| = {difference:.3g}; max |w_1proc - w_init| = {moved:.3g}")
    assert difference < 1e-5, f"DDP parameters differ by {difference:.2e} from the one-process run"


@pytest.mark.slow  # two launches, one of 2 DDP processes: ~35 s on 2 slow cores
def test_imdb_recipe_under_ddp_trains_as_one_process(tmp_path):
    data = write_imdb(tmp_path / "data", n_train=72)  # 64 train (even: DistributedSampler pads nothing), 8 validate
    common = ["-c", str(ROOT / "configs/imdb/fast.yaml"), "--data.init_args.data_dir", str(data),
              "--data.init_args.max_ngrams", "500", "--model.init_args.input_shape", "[500]",
              "--data.init_args.val_size", "8", "--trainer.max_epochs", "3",
              "--model.init_args.optimizer", SGD]  # fmt: skip
    one = last_checkpoint(common, [*ONE, "--data.init_args.batch_size", "64"], tmp_path / "one")
    ddp = last_checkpoint(common, [*DDP, "--data.init_args.batch_size", "32"], tmp_path / "ddp")
    initial = main([*common, *QUIET, *ONE, "--data.init_args.batch_size", "64"], run=False).model.state_dict()
    # The ratio is a buffer counted from the data, not trained: both must hold the ratio of all 64 training reviews.
    assert one["state_dict"]["nb_ratio"].abs().sum() > 0
    torch.testing.assert_close(one["state_dict"]["nb_ratio"], ddp["state_dict"]["nb_ratio"])
    initial["nb_ratio"] = one["state_dict"]["nb_ratio"]
    assert_same_parameters(one, ddp, initial, steps=3)


@pytest.mark.slow  # two launches, one of 2 DDP processes: ~35 s on 2 slow cores
def test_omniglot_recipe_under_ddp_trains_as_one_process(tmp_path):
    data = tmp_path / "data"
    write_tree(data / "omniglot-py" / "images_background_small1", {"Alpha": 6, "Beta": 6}, size=35, seed=1)
    write_tree(data / "omniglot-py" / "images_background_small2", {"Gamma": 7}, size=35, seed=1)
    common = ["-c", str(ROOT / "configs/omniglot/fast.yaml"), "--data.init_args.data_dir", str(data),
              "--data.init_args.cache_dir", str(data / "cache"), "--data.init_args.train_way", "5",
              "--model.init_args.num_classes", "5", "--data.init_args.train_episodes", "4",
              "--data.init_args.test_alphabets", "[Gamma]", "--data.init_args.augment", "null",
              "--model.init_args.filters", "[8, 16, 16, 32]", "--trainer.max_epochs", "2",
              "--model.init_args.optimizer", SGD, "--model.init_args.lr_scheduler.init_args.max_lr", "0.5"]  # fmt: skip
    one = last_checkpoint(common, [*ONE, "--trainer.accumulate_grad_batches", "2"], tmp_path / "one")
    ddp = last_checkpoint(common, DDP, tmp_path / "ddp")
    initial = main([*common, *QUIET, *ONE], run=False).model.state_dict()
    assert_same_parameters(one, ddp, initial, steps=4)  # 2 epochs x 4 episodes / 2 episodes a step


@pytest.mark.slow  # two launches, one of 2 DDP processes: ~35 s on 2 slow cores
def test_mnist_recipe_under_ddp_trains_as_one_process(tmp_path):
    """One image a forward, as for CIFAR-10: BatchNorm's batch statistics are then an image's however the 8 training
    images are split; dropout and augmentation off, since each process draws its own."""
    data = write_mnist(tmp_path / "data", n_train=8, n_test=4)
    common = ["-c", str(ROOT / "configs/mnist/fast.yaml"), "--data.init_args.data_dir", str(data),
              "--data.init_args.batch_size", "1", "--data.init_args.augment", "null",
              "--model.init_args.dropout", "0", "--trainer.max_epochs", "3",
              "--model.init_args.optimizer", SGD, "--model.init_args.lr_scheduler.init_args.max_lr", "0.5"]  # fmt: skip
    one = last_checkpoint(common, [*ONE, "--trainer.accumulate_grad_batches", "8"], tmp_path / "one")
    ddp = last_checkpoint(common, [*DDP, "--trainer.accumulate_grad_batches", "4"], tmp_path / "ddp")
    initial = main([*common, *QUIET, *ONE], run=False).model.state_dict()
    assert_same_parameters(one, ddp, initial, steps=3)  # one step an epoch: all 8 images
