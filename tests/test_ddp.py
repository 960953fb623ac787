"""Training on several processes: real DDP equals one process with the same global batch, the launchers hand
their layout to Lightning, SLURM preemption requeues and resumes, and the global-batch / lr-scaling options.

The equality runs use full-batch steps (global batch = the whole training split): every optimizer step then sees
the same samples on 1 or 2 processes whatever order the samplers draw them in, and the mean loss makes the
average of two half-batch gradients equal the full-batch gradient. With SGD (whose update is proportional to the
gradient, unlike Adam's) the final weights agree to ~1e-8, and any of these faults moves them by 3e-3 or more
(measured): gradients not averaged across ranks, summed instead of averaged, both ranks fed the whole split.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_mnist
from pytorch_lightning import Trainer
from train import main

from callbacks.batch_scaling import GlobalBatchSize, batch_plan
from datamodules import MNISTDataModule
from lightning_modules import MLPClassifier

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "configs" / "mnist" / "mlp.yaml"
N_TRAIN, VAL_SIZE = 448, 64  # 384 training images (even, so DistributedSampler pads nothing), 64 validation
GLOBAL_BATCH = N_TRAIN - VAL_SIZE  # full batch: one optimizer step per epoch
EPOCHS = 3
WEIGHT_ATOL = 1e-5  # correct DDP: ~1e-8; the faults above: >= 3e-3
REQUEUE_EPOCHS = 20  # long enough to be signalled after the first epoch, short to resume
SGD = json.dumps({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}})
# scripts/gpu_check.py sets "gpu" on a machine with 2+ GPUs: the same comparisons on NCCL, in full float32.
ACCELERATOR = os.environ.get("DDP_TEST_ACCELERATOR", "cpu")
PRECISION = ["--float32_matmul_precision", "highest"] if ACCELERATOR == "gpu" else []
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus anything that would make Lightning think it runs under SLURM or torchrun."""
    launch = [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in LAUNCH_VARS]
    env = {k: v for k, v in os.environ.items() if k not in launch}
    return {**env, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", **extra}


def experiment(data_dir: Path, *extra: str) -> list[str]:
    """The book MLP recipe on generated MNIST, dropout off, SGD, global batch = the whole training split."""
    return ["fit", "-c", str(MLP), "--data.init_args.data_dir", str(data_dir),
            "--data.init_args.val_size", str(VAL_SIZE), "--model.init_args.dropout", "0",
            "--model.init_args.optimizer", SGD, "--trainer.max_epochs", str(EPOCHS),
            "--trainer.accelerator", ACCELERATOR, "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=callbacks.GlobalBatchSize",
            "--trainer.callbacks.global_batch_size", str(GLOBAL_BATCH),
            *PRECISION, *extra]  # fmt: skip


def run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "runs" / "mnist_mlp").glob("version_*"))
    assert len(runs) == 1, f"expected one run directory under {cwd}, found {runs}"
    return runs[0]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # Lightning refreshes last.ckpt only when it saves a top-k checkpoint: make sure it holds the final step.
    assert checkpoint["global_step"] == EPOCHS, f"{run}: last.ckpt is from step {checkpoint['global_step']}"
    return checkpoint["state_dict"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def val_curve(run: Path) -> list[tuple[int, float, float]]:
    """(epoch, val/acc, val/loss) of every validation in metrics.csv."""
    with (run / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc")]
    return [(int(r["epoch"]), float(r["val/acc"]), float(r["val/loss"])) for r in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_output(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 180) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"rc={result.returncode}\n{output[-3000:]}"
    return output


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("data"), n_train=N_TRAIN, n_test=64)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> dict:
    """One process, global batch 384 (in this pytest process): initial and final weights, validation curve."""
    cwd = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        built = main(experiment(data_dir)[1:], run=False)  # same seed, same initialisation as the fit below
        initial = {k: v.clone() for k, v in built.model.state_dict().items()}
        cli = main(experiment(data_dir, "--trainer.devices", "1"))
    assert cli.datamodule.hparams.batch_size == GLOBAL_BATCH
    run = run_dir(cwd)
    return {"initial": initial, "final": final_weights(run), "val": val_curve(run), "run": run}


def assert_same_training(run: Path, reference: dict) -> None:
    moved = max_difference(reference["final"], reference["initial"])
    difference = max_difference(final_weights(run), reference["final"])
    print(f"{run}: max |w - w_1proc| = {difference:.3g}; max |w_1proc - w_init| = {moved:.3g}")
    assert moved > 100 * WEIGHT_ATOL, f"training barely moved the weights ({moved:.2e}): the comparison is void"
    assert difference < WEIGHT_ATOL, f"final weights differ by {difference:.2e} from the 1-process run"
    curve, expected = val_curve(run), reference["val"]
    assert [epoch for epoch, _, _ in curve] == [epoch for epoch, _, _ in expected] == list(range(EPOCHS))
    for (_, acc, loss), (_, ref_acc, ref_loss) in zip(curve, expected, strict=True):
        print(f"val/acc {acc} vs {ref_acc}, val/loss {loss} vs {ref_loss}")
        assert acc == pytest.approx(ref_acc, abs=1e-6)  # torchmetrics syncs the counts of both ranks
        assert loss == pytest.approx(ref_loss, rel=1e-5)  # sync_dist mean of equal-sized shards


def test_val_acc_comparison_can_tell_a_shard_from_the_whole(reference, data_dir):
    """If a rank logged the accuracy of its own half of the validation set, the DDP comparisons would fail."""
    model = MLPClassifier.load_from_checkpoint(reference["run"] / "checkpoints" / "last.ckpt").eval()
    datamodule = MNISTDataModule(data_dir=str(data_dir), val_size=VAL_SIZE)
    datamodule.setup("fit")
    images, labels = datamodule.val_set.images, datamodule.val_set.targets
    with torch.no_grad():
        correct = model(datamodule.normalize_images(images)).argmax(-1) == labels
    assert correct.float().mean().item() == pytest.approx(reference["val"][-1][1])  # what fit logged
    halves = {correct[0::2].float().mean().item(), correct[1::2].float().mean().item()}
    assert halves != {reference["val"][-1][1]}, "both halves score like the whole: the val/acc check is void"


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(data_dir, reference, tmp_path):
    """Lightning's own launcher (it re-runs the script per rank), gloo, 2 CPU processes of 192 samples each."""
    command = [sys.executable, str(ROOT / "scripts" / "train.py"),
               *experiment(data_dir, "--trainer.strategy", "ddp", "--trainer.devices", "2")]  # fmt: skip
    output = check_output(command, tmp_path, clean_env())
    assert "per-device batch 192 x devices 2 x nodes 1 = global batch 384" in output
    run = run_dir(tmp_path)  # one run directory for both ranks, with rank zero's files
    assert (run / "curves.png").is_file() and (run / "config.yaml").is_file()
    assert_same_training(run, reference)


@pytest.mark.slow  # two launches of torchrun.sh, ~20 s; the ddp test above covers DDP training in CI
def test_torchrun_two_nodes_equal_one_process(data_dir, reference, tmp_path):
    """scripts/torchrun.sh on two "nodes" of one process each (both on localhost, static rendezvous).

    Lightning cannot launch a second node itself: the run only completes if it took ranks and world size from
    torchrun (TorchElasticEnvironment), with --trainer.num_nodes 2 passed on by the script.
    """
    script = str(ROOT / "scripts" / "torchrun.sh")
    args = experiment(data_dir)
    env = clean_env(ACCELERATOR="cpu", NNODES="2", NPROC_PER_NODE="1", MASTER_PORT=str(free_port()),
                    PYTHON=sys.executable)  # fmt: skip
    node1 = subprocess.Popen(
        [script, *args], cwd=tmp_path, env={**env, "NODE_RANK": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output = check_output([script, *args], tmp_path, {**env, "NODE_RANK": "0"})
        node1_output = node1.communicate(timeout=60)[0].decode()
    finally:
        node1.kill()
    assert node1.returncode == 0, node1_output[-3000:]
    assert "per-device batch 192 x devices 1 x nodes 2 = global batch 384" in output
    assert_same_training(run_dir(tmp_path), reference)


# ---- SLURM ------------------------------------------------------------------------------------------------
FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: records its arguments and environment, then runs the command as the one task of the step.
printf '%s\\n' "$@" > "$FAKE_SLURM_LOG/srun_args"
env > "$FAKE_SLURM_LOG/srun_env"
echo $$ > "$FAKE_SLURM_LOG/task_pid"
while [[ "$1" == --* ]]; do shift; done
[ -n "${FAKE_SRUN_DRY:-}" ] && exit 0
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_SLURM_LOG/scontrol"
"""


def fake_slurm(tmp_path: Path, job_id: str, nodes: int, tasks_per_node: int, **extra: str) -> dict[str, str]:
    """srun/scontrol stand-ins on PATH and the variables sbatch gives a job: enough for Lightning's SLURMEnvironment."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm_log"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_LOG=str(log), SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME="train", SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node), SLURM_NTASKS=str(nodes * tasks_per_node),
        SLURM_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=str(tmp_path), PROJECT_DIR=str(tmp_path),
        VENV=str(tmp_path / "no-venv"), PYTHON=sys.executable, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
        **extra,
    )  # fmt: skip


def sbatch(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    """Run the sbatch template as SLURM would on the first node of the job (in tmp_path, a copy of scripts/)."""
    if not (tmp_path / "scripts").exists():
        (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    return subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_launch_scripts_parse_and_sbatch_header_is_consistent():
    for script in (ROOT / "scripts" / "torchrun.sh", ROOT / "scripts" / "slurm" / "train.sbatch"):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"
    header = dict(
        line.removeprefix("#SBATCH --").split("=", 1)
        for line in (ROOT / "scripts" / "slurm" / "train.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH --") and "=" in line
    )
    assert header["ntasks-per-node"] == header["gpus-per-node"]  # one task per GPU
    assert header["signal"] == "SIGUSR1@90"  # Lightning's requeue signal, 90 s ahead


def test_sbatch_passes_the_slurm_layout_to_train_py(tmp_path):
    env = fake_slurm(tmp_path, "4242", nodes=2, tasks_per_node=4, FAKE_SRUN_DRY="1", DATA_DIR="/scratch/data")
    output, _ = sbatch(tmp_path, env, "fit", "-c", "configs/mnist/cnn.yaml").communicate(timeout=30)
    args = (tmp_path / "slurm_log" / "srun_args").read_text().splitlines()
    assert args[: args.index("scripts/train.py") + 4] == [
        "--kill-on-bad-exit=1", sys.executable, "scripts/train.py", "fit", "-c", "configs/mnist/cnn.yaml"
    ]  # fmt: skip

    def passed(option: str) -> str:
        return args[args.index(option) + 1]

    assert passed("--trainer.devices") == "4" and passed("--trainer.num_nodes") == "2"
    assert passed("--trainer.strategy") == "ddp" and passed("--trainer.accelerator") == "gpu"
    assert passed("--trainer.default_root_dir") == str(tmp_path / "runs" / "slurm" / "4242")
    task_env = dict(line.split("=", 1) for line in (tmp_path / "slurm_log" / "srun_env").read_text().splitlines()
                    if "=" in line)  # fmt: skip
    assert task_env["WANDB_MODE"] == "offline" and task_env["DATA_DIR"] == "/scratch/data"
    assert "2 node(s) x 4 task(s)" in output


# Slow (two launches of the real sbatch script): tests/test_runs.py requeues twenty times in one process in CI.
@pytest.mark.slow
def test_sbatch_job_is_requeued_on_sigusr1_and_resumes_where_it_stopped(data_dir, tmp_path):
    """The template's job on one CPU task: Lightning accepts SLURM's layout; SIGUSR1 (what --signal sends before
    the time limit) saves an hpc checkpoint at the next safe point (callbacks.SafeRequeue), calls `scontrol
    requeue` and ends the job; the requeued job (same id, same command) resumes from it in the same run directory
    and validates every epoch exactly once."""
    env = fake_slurm(tmp_path, "777", nodes=1, tasks_per_node=1, ACCELERATOR="cpu")
    args = experiment(data_dir, "--trainer.max_epochs", str(REQUEUE_EPOCHS))
    first_epoch_done = tmp_path / "runs" / "mnist_mlp" / "version_0" / "checkpoints" / "last.ckpt"
    requeue_log = tmp_path / "slurm_log" / "scontrol"
    job = sbatch(tmp_path, env, *args)
    try:
        deadline = time.monotonic() + 120
        while not first_epoch_done.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, f"the job ended before it could be signalled:\n{job.communicate()[0][-3000:]}"
        task = int((tmp_path / "slurm_log" / "task_pid").read_text())
        os.kill(task, signal.SIGUSR1)  # SLURM: --signal=SIGUSR1@90
        first_output = job.communicate(timeout=60)[0]  # SafeRequeue ends the job once it is requeued
    finally:
        job.kill()
    assert job.returncode == 0, first_output[-3000:]
    assert requeue_log.read_text().split() == ["requeue", "777"], first_output[-3000:]
    saved = sorted((tmp_path / "runs" / "slurm" / "777").glob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in saved] == ["hpc_ckpt_1.ckpt"], first_output[-3000:]

    resumed, _ = sbatch(tmp_path, env, *args).communicate(timeout=180)
    assert f"Restoring states from the checkpoint path at {saved[0]}" in resumed, resumed[-3000:]
    assert f"`Trainer.fit` stopped: `max_epochs={REQUEUE_EPOCHS}` reached." in resumed, resumed[-3000:]
    assert [p.name for p in (tmp_path / "runs" / "mnist_mlp").iterdir()] == ["version_0"]
    epochs = [epoch for epoch, _, _ in val_curve(tmp_path / "runs" / "mnist_mlp" / "version_0")]
    assert epochs == list(range(REQUEUE_EPOCHS))


# ---- global batch size, lr scaling, printout -----------------------------------------------------------------
def test_fit_prints_the_global_batch_and_keeps_recipes_unchanged(mnist_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", str(MLP), "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]  # fmt: skip
    with caplog.at_level("INFO"):
        cli = main(args)
    assert "Batch size: per-device batch 128 x devices 1 x nodes 1 = global batch 128" in caplog.text
    assert cli.datamodule.hparams.batch_size == 128 and cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.001


def test_global_batch_size_and_linear_lr_scaling(mnist_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", str(MLP), "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64",
            "--trainer.limit_train_batches", "2", "--trainer.accumulate_grad_batches", "2",
            "--trainer.callbacks+=callbacks.GlobalBatchSize", "--trainer.callbacks.global_batch_size", "64",
            "--trainer.callbacks.lr_reference_batch", "16"]  # fmt: skip
    with caplog.at_level("INFO"):
        cli = main([*args, "--trainer.max_epochs", "1"])
    assert "per-device batch 32 x devices 1 x nodes 1 x accumulate_grad_batches 2 = global batch 64" in caplog.text
    assert cli.datamodule.hparams.batch_size == 32
    assert cli.trainer.train_dataloader.batch_size == 32
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001 * 64 / 16)

    # A resumed fit keeps the checkpoint's (already scaled) lr: never scaled twice.
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    resumed = main([*args, "--trainer.max_epochs", "2", "--ckpt_path", str(last)])
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001 * 64 / 16)


def test_global_batch_size_must_divide_over_the_processes(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="does not split evenly over devices 1 x nodes 1 x accumulate_grad_batches 3"):
        main(["fit", "-c", str(MLP), "--data.init_args.data_dir", str(mnist_dir),
              "--trainer.accumulate_grad_batches", "3", "--trainer.callbacks+=callbacks.GlobalBatchSize",
              "--trainer.callbacks.global_batch_size", "128"])  # fmt: skip


def test_batch_plan_counts_devices_and_nodes():
    """The multi-node arithmetic, on a Trainer that is built (not launched) for 2 devices x 3 nodes."""
    datamodule = MNISTDataModule(batch_size=32)
    trainer = Trainer(accelerator="cpu", devices=2, num_nodes=3, strategy="ddp", logger=False)
    assert str(batch_plan(trainer, datamodule)) == "per-device batch 32 x devices 2 x nodes 3 = global batch 192"
    trainer = Trainer(accelerator="cpu", devices=2, num_nodes=3, strategy="ddp", logger=False,
                      callbacks=[GlobalBatchSize(global_batch_size=1200, lr_reference_batch=300)])  # fmt: skip
    plan = batch_plan(trainer, datamodule)
    assert (plan.per_device, plan.global_batch) == (200, 1200)
    assert trainer.callbacks[0].lr_factor(plan) == 4.0
    with pytest.raises(ValueError, match="does nothing without arguments"):
        GlobalBatchSize()


def test_fsdp_is_gpu_only_in_lightning(tmp_path, monkeypatch):
    """The README documents --trainer.strategy fsdp as GPU-only: Lightning refuses it on CPU with this error."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="strategy `fsdp` requires a GPU accelerator"):
        config = str(ROOT / "configs" / "quickstart.yaml")
        main(["-c", config, "--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu"], run=False)
