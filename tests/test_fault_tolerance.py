"""Fault tolerance, reproducibility and checkpoint safety.

The centrepiece kills a ``scripts/train.py fit`` process with SIGKILL in mid-epoch, resumes it with ``--ckpt_path
last`` (``train.py``'s ``__main__`` run again, in the test process) and checks that the final weights are
bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import csv
import logging
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DistributedSampler

from datamodules.base import InMemoryImageDataset
from datamodules.loaders import ResumableDataLoader, ResumableSampler, collate_batch
from lifecycle.checkpoint_io import AtomicCheckpointIO, DiskFullError
from lightning_modules.checkpoints import UNSAFE_LOAD_OPT_IN, CheckpointError, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
MLP = ROOT / "configs" / "mnist" / "mlp.yaml"
# The shipped MLP config's checkpointing, with last.ckpt also refreshed every 4 steps inside an epoch.
CHECKPOINTS_EVERY_4_STEPS = """
last_checkpoint: {init_args: {every_n_train_steps: 4}}
"""
STEPS_PER_EPOCH = 12  # 256 generated images - 64 for validation = 192, batches of 16
EPOCHS = 3


class StopResponding(Callback):
    """Loaded by the training subprocess: once ``global_step`` reaches ``at_step``, write ``marker`` and hang.

    The process then sits in mid-epoch, some steps past its last checkpoint, until the test kills it.
    """

    def __init__(self, at_step: int, marker: str) -> None:
        self.at_step = at_step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.at_step:
            Path(self.marker).write_text(str(trainer.global_step))
            time.sleep(600)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")


def _fit_command(mnist_dir: Path, config: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(TRAIN), "fit", "-c", str(MLP), "-c", str(config),
        "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64",
        "--data.init_args.batch_size", "16", "--model.init_args.hidden_units", "[32]",
        "--trainer.max_epochs", str(EPOCHS), "--trainer.deterministic", "true",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra,
    ]  # fmt: skip


def _subprocess_env() -> dict[str, str]:
    # The callback above is imported from this file by the subprocess.
    paths = [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _train_as_script(monkeypatch, *args: str) -> int | str | None:
    """``python scripts/train.py ARGS`` run in this process (its ``__main__`` block), sparing the 10-14 s of imports
    a new interpreter costs on a slow CPU; returns its exit code."""
    monkeypatch.setattr(sys, "argv", [str(TRAIN), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(TRAIN), run_name="__main__")
    return exit_.value.code


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def test_kill_mid_epoch_and_resume_gives_the_uninterrupted_weights(mnist_dir, tmp_path, monkeypatch, caplog):
    config = tmp_path / "checkpoints.yaml"
    config.write_text(CHECKPOINTS_EVERY_4_STEPS)
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    env = _subprocess_env()
    marker = killed_dir / "stopped_at_step"
    stall = f"--trainer.callbacks+={{'class_path': 'test_fault_tolerance.StopResponding', 'init_args': {{'at_step': 18, 'marker': '{marker}'}}}}"  # noqa: E501
    # The uninterrupted reference and the run to be killed, side by side.
    reference = subprocess.Popen(
        _fit_command(mnist_dir, config), cwd=reference_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    victim = subprocess.Popen(
        _fit_command(mnist_dir, config, stall),
        cwd=killed_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert victim.poll() is None, victim.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run to be killed never reached step 18"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        victim.kill()
        victim.stdout.close()
    run_dir = killed_dir / "runs" / "mnist_mlp" / "version_0"
    interrupted = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # Killed at step 18, two steps after its last checkpoint, 4 batches into epoch 1.
    assert (interrupted["global_step"], interrupted["epoch"]) == (16, 1)  # a mid-epoch checkpoint: the resume
    # below must continue the data order from its 5th batch for the weights to come out equal.

    # The restart runs train.py's __main__ in this process: only the file on disk links it to the killed run.
    monkeypatch.chdir(killed_dir)
    with caplog.at_level(logging.INFO):
        code = _train_as_script(monkeypatch, *_fit_command(mnist_dir, config, "--ckpt_path", "last")[2:])
    assert code in (None, 0)
    assert f"Using checkpoint {Path('runs/mnist_mlp/version_0/checkpoints/last.ckpt')}" in caplog.text
    assert reference.wait(timeout=120) == 0, reference.stdout.read().decode()[-3000:]
    reference.stdout.close()

    # One run directory: the resumed fit continued version_0 instead of starting version_1.
    assert [p.name for p in (killed_dir / "runs" / "mnist_mlp").iterdir()] == ["version_0"]
    expected = torch.load(reference_dir / "runs/mnist_mlp/version_0/checkpoints/last.ckpt", weights_only=True)
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == expected["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    for name, weight in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][name], weight), f"{name} differs from the uninterrupted run"
    for slot, state in expected["optimizer_states"][0]["state"].items():
        for key, value in state.items():
            assert torch.equal(final["optimizer_states"][0]["state"][slot][key], value), f"Adam {key}"
    # metrics.csv continues: every epoch's validation row once, each equal to the uninterrupted run's.
    rows = _metrics(run_dir)
    assert [row["epoch"] for row in rows] == ["0", "0", "1", "1", "2", "2"]
    val_rows = [row for row in rows if row["val/loss"]]
    assert val_rows == [row for row in _metrics(reference_dir / "runs/mnist_mlp/version_0") if row["val/loss"]]


@pytest.mark.slow
def test_ddp_resume_mid_epoch_gives_the_uninterrupted_weights(mnist_dir, tmp_path):
    """Two CPU processes (gloo): each rank's shard continues where it stopped, RNG states restored per rank."""
    config = tmp_path / "checkpoints.yaml"
    config.write_text(CHECKPOINTS_EVERY_4_STEPS)
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    ddp += ["--trainer.max_epochs", "4"]  # 6 steps per epoch on each of 2 ranks, 24 in all
    env = {**_subprocess_env(), "PYTHONWARNINGS": "ignore"}
    runs = {}
    for name, extra in [
        ("reference", []),
        ("stopped", ["--trainer.max_steps", "10"]),
        ("stopped", ["--ckpt_path", "last"]),
    ]:
        (tmp_path / name).mkdir(exist_ok=True)
        result = subprocess.run(
            _fit_command(mnist_dir, config, *ddp, *extra), cwd=tmp_path / name, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        last = tmp_path / name / "runs/mnist_mlp/version_0/checkpoints/last.ckpt"
        runs.setdefault(name, []).append(torch.load(last, weights_only=True))
    interrupted, final = runs["stopped"]
    # Stopped by max_steps after 4 of epoch 1's 6 steps: last.ckpt is that mid-epoch state.
    assert (interrupted["global_step"], interrupted["epoch"]) == (10, 1)
    assert len(interrupted["callbacks"]["ResumeState"]["rng"]) == 2  # one RNG state per rank
    expected = runs["reference"][0]
    assert final["global_step"] == expected["global_step"] == 24
    for name, weight in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][name], weight), f"{name} differs from the uninterrupted run"
    assert [p.name for p in (tmp_path / "stopped" / "runs" / "mnist_mlp").iterdir()] == ["version_0"]


def test_same_seed_same_metrics_different_seed_different_metrics(mnist_dir, tmp_path, monkeypatch):
    from train import main

    def val_loss(seed: str) -> torch.Tensor:
        cli = main(
            ["fit", "-c", str(MLP), "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64",
             "--data.init_args.batch_size", "16", "--model.init_args.hidden_units", "[32]", "--seed_everything", seed,
             "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "5"]
        )  # fmt: skip
        # LightningCLI seeds with seed_everything(seed, workers=True): DataLoader workers get derived seeds too.
        assert os.environ["PL_SEED_WORKERS"] == "1" and os.environ["PL_GLOBAL_SEED"] == seed
        return cli.trainer.callback_metrics["val/loss"]

    first, again, other = val_loss("42"), val_loss("42"), val_loss("7")
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_cli_writes_checkpoints_atomically_and_they_load_with_weights_only(mnist_dir, monkeypatch):
    from train import main

    saved = []
    original = AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        saved.append(Path(path).name)
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    cli = main(
        ["fit", "-c", str(MLP), "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64",
         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false"]
    )  # fmt: skip
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert "last.ckpt" in saved  # ModelCheckpoint's saves go through the plugin
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # nothing but tensors and plain types
    assert {"ResumeState", "ModelCheckpoint"} <= {key.split("{")[0] for key in checkpoint["callbacks"]}
    assert not list(last.parent.glob(".*.tmp"))


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)

    def crash_halfway(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04" + bytes(5000))  # the start of a zip file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(DiskFullError, match=r"The disk is full: checkpoint .*last\.ckpt could not be written"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    previous = torch.load(path, weights_only=True)
    assert previous["global_step"] == 1 and torch.equal(previous["state_dict"]["w"], torch.ones(1000))


def test_damaged_checkpoint_is_one_clear_error(mnist_dir, tmp_path, monkeypatch, capsys):
    from train import main

    common = ["-c", str(MLP), "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64"]
    common += ["--trainer.enable_progress_bar", "false"]
    main(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    last = tmp_path / "runs" / "mnist_mlp" / "version_0" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # cut in half, as a crash during a plain write leaves it
    with pytest.raises(CheckpointError, match=r"last\.ckpt cannot be read: it is damaged or incomplete.*ls -lt"):
        main(["fit", *common, "--ckpt_path", "last"])
    # As `python scripts/train.py test ...`: one paragraph naming the file and the fix, exit code 1, no traceback.
    assert _train_as_script(monkeypatch, "test", *common, "--ckpt_path", str(last)) == 1
    err = capsys.readouterr().err
    assert f"error: Checkpoint {last} cannot be read" in err and "ls -lt" in err and "Traceback" not in err


class _RunsCode:
    """Unpickling this object calls ``Path.touch(marker)``: it stands for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoint_with_pickled_code_is_refused_unless_opted_in(mnist_dir, tmp_path, monkeypatch):
    from train import main

    marker = tmp_path / "code_ran"
    path = tmp_path / "downloaded.ckpt"
    torch.save({"state_dict": {}, "extra": _RunsCode(marker)}, path)
    common = ["-c", str(MLP), "--data.init_args.data_dir", str(mnist_dir), "--ckpt_path", str(path)]
    with pytest.raises(CheckpointError, match=f"pickled Python objects.*{UNSAFE_LOAD_OPT_IN}=1"):
        main(["validate", *common])
    assert not marker.exists()
    monkeypatch.setenv(UNSAFE_LOAD_OPT_IN, "1")  # the user trusts the file
    read_checkpoint(path)
    assert marker.exists()


def test_fit_last_without_an_earlier_run_starts_afresh(mnist_dir):
    from train import main

    cli = main(
        ["fit", "-c", str(MLP), "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64",
         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--ckpt_path", "last"]
    )  # fmt: skip
    assert cli.trainer.state.finished and cli.trainer.ckpt_path is None


# ---- the sampler and loader on their own -----------------------------------------------------------------------
def _dataset(n: int) -> InMemoryImageDataset:
    return InMemoryImageDataset(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n))  # labels = indices


def _loader(dataset, world: int, rank: int, epoch: int) -> ResumableDataLoader:
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=3)
    loader = ResumableDataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate_batch)
    sampler.set_epoch(epoch)
    return loader


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_exactly_like_distributed_sampler(world):
    dataset = _dataset(50)
    for epoch in (0, 1):
        for rank in range(world):
            ours, torch_sampler = (
                ResumableSampler(dataset, world, rank, seed=3),
                DistributedSampler(dataset, world, rank, seed=3),
            )
            ours.set_epoch(epoch)
            torch_sampler.set_epoch(epoch)
            assert list(ours) == list(torch_sampler)


@pytest.mark.parametrize("world", [1, 2])
def test_loader_resumes_mid_epoch_on_every_rank(world):
    dataset = _dataset(50)
    full, done, state = {}, {}, None
    for rank in range(world):
        full[rank] = [y.tolist() for _, y in _loader(dataset, world, rank, epoch=1)]
        interrupted = _loader(dataset, world, rank, epoch=1)
        batches = iter(interrupted)
        done[rank] = [next(batches)[1].tolist() for _ in range(3)]
        state = interrupted.state_dict()  # every rank's state is the same; rank 0's is the one saved
    assert (state["epoch"], state["position"]) == (1, 3 * 4 * world)
    for rank in range(world):
        restored = _loader(dataset, world, rank, epoch=0)
        restored.load_state_dict(state)
        restored.sampler.set_epoch(1)  # what Lightning does before the epoch continues: the position stays
        assert done[rank] + [y.tolist() for _, y in restored] == full[rank]
        restored.sampler.set_epoch(2)  # the next epoch starts from its beginning
        assert sum(len(y) for _, y in restored) == len(restored.sampler)


def test_loader_resumed_on_another_world_size_skips_nothing():
    dataset = _dataset(50)
    order = ResumableSampler(dataset, num_replicas=2, seed=3)
    order.set_epoch(1)
    interrupted = _loader(dataset, world=2, rank=0, epoch=1)
    batches = iter(interrupted)
    next(batches), next(batches)
    state = interrupted.state_dict()  # 2 batches x 4 samples x 2 ranks consumed
    rest = []
    for rank in range(3):
        restored = _loader(dataset, world=3, rank=rank, epoch=1)
        with pytest.warns(UserWarning, match="re-sharded"):
            restored.load_state_dict(state)
        rest.append([i for _, y in restored for i in y.tolist()])
    assert len({len(r) for r in rest}) == 1  # equal shares: no rank waits for the others at the end
    assert set(order.epoch_order()[16:]) <= {i for r in rest for i in r}  # only repeats, no gaps
