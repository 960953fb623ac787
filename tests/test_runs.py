"""A run's life through the CLI: fresh last.ckpt, continued metrics, checked checkpoints, the lock, cleanup, and
SLURM requeues that continue one run directory (``lifecycle/runs.py``, ``callbacks/slurm.py``).

Every test runs ``scripts/train.py``'s ``main`` in this process on generated MNIST files; ``run_command`` is the
code path of ``python scripts/train.py`` (its exit code and the one-paragraph error on stderr).
"""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_errors import run_command
from pytorch_lightning.callbacks import Callback
from train import main

from callbacks.guards import NonFiniteLossError
from callbacks.slurm import JobRequeued
from lifecycle.model_check import check_model, evaluation_hparams
from lifecycle.runs import RunError, RunLock

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "configs" / "mnist" / "mlp.yaml"
CNN = ROOT / "configs" / "mnist" / "cnn.yaml"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def mlp(mnist_dir: Path, *extra: str) -> list[str]:
    """The book MLP, small: 192 training images in 12 batches of 16, 64 for validation."""
    return ["-c", str(MLP), "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64",
            "--data.init_args.batch_size", "16", "--model.init_args.hidden_units", "[32]",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]  # fmt: skip


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def kinds(table: list[dict[str, str]]) -> list[tuple[int, str]]:
    """(epoch, 'val'|'train') of every epoch row, in file order."""
    return [(int(r["epoch"]), "val" if r.get("val/loss") else "train") for r in table if r.get("val/loss") or
            r.get("train/loss")]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if
            p.is_file()}  # fmt: skip


RUN = Path("runs") / "mnist_mlp" / "version_0"


# ---- 1. last.ckpt is the newest state, whatever the metric does ------------------------------------------------
def test_last_checkpoint_is_the_newest_epoch_even_when_the_metric_never_improves(mnist_dir):
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "4", "--model.init_args.optimizer.init_args.lr", "0")])
    last = torch.load(RUN / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (3, 4 * 12)  # lr 0: val/acc never improves after epoch 0
    assert [p.name for p in (RUN / "checkpoints").glob("epoch*.ckpt")] == ["epoch000.ckpt"]


def test_last_checkpoint_every_n_steps_inside_epochs(mnist_dir, monkeypatch):
    saved = []
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: saved.append(obj["global_step"]))
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "2", "--last_checkpoint.init_args.every_n_train_steps", "5")])
    # Steps 5 and 10 inside epoch 0, 15 and 20 inside epoch 1, the epoch ends 12 and 24, and the best checkpoint.
    assert sorted(set(saved)) == [5, 10, 12, 15, 20, 24]


# ---- 2. a resume loses no logged row ----------------------------------------------------------------------------
def test_resume_keeps_every_logged_row_and_replaces_the_relogged_ones(mnist_dir):
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "2")])
    first = rows(RUN)
    assert kinds(first) == [(0, "val"), (0, "train"), (1, "val"), (1, "train")]
    # last.ckpt was saved at the end of epoch 1, before Lightning logged that epoch's training row.
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "4", "--ckpt_path", "last")])
    table = rows(RUN)
    assert kinds(table) == [(e, k) for e in range(4) for k in ("val", "train")]
    assert table[:4] == first  # the rows of the first launch, unchanged


def test_resume_inside_an_epoch_logs_that_epoch_once(mnist_dir):
    # Stopped 6 batches into epoch 2: last.ckpt is that batch's state, and the cut epoch's training row is logged.
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "4", "--trainer.max_steps", "30")])
    last = torch.load(RUN / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["global_step"], last["epoch"]) == (30, 2)
    assert kinds(rows(RUN))[-1] == (2, "train")
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "4", "--ckpt_path", "last")])
    assert kinds(rows(RUN)) == [(e, k) for e in range(4) for k in ("val", "train")]
    assert torch.load(RUN / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 48


# ---- 3. a non-finite loss stops the run ------------------------------------------------------------------------
def test_a_diverging_run_stops_with_one_message_and_saves_nothing(mnist_dir, capsys):
    sgd = ["--model.init_args.optimizer", "torch.optim.SGD", "--model.init_args.optimizer.init_args.lr", "1e30"]
    args = ["fit", *mlp(mnist_dir, *sgd, "--model.init_args.prob_clip", "0", "--trainer.max_epochs", "3")]
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 2 \(epoch 0\).*learning rate is 1e\+30"):
        main(args)
    assert not Path("runs/mnist_mlp").exists() or not any(Path("runs/mnist_mlp").iterdir())  # no run left
    assert run_command(lambda: main(args)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: The training loss became nan") and err.count("\n") == 1


def test_a_nan_validation_loss_stops_the_run_before_the_checkpoint(mnist_dir):
    args = ["fit", *mlp(mnist_dir, "--trainer.max_epochs", "3")]
    with pytest.raises(NonFiniteLossError, match=r"val/loss = nan"):
        main([*args, "--trainer.callbacks+=test_runs.PoisonValidation"])
    last = torch.load(RUN / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0  # epoch 1 (NaN validation) was never saved, let alone called best
    best = [p.name for p in (RUN / "checkpoints").glob("epoch*.ckpt")]
    assert best and all(name.startswith("epoch000") for name in best)


class PoisonValidation(Callback):
    """Makes the validation loss of epoch 1 NaN (a model whose evaluation diverges)."""

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1 and not trainer.sanity_checking:
            pl_module.val_loss.total.fill_(float("nan"))


# ---- 4-6. a checkpoint is checked against the config before anything is written --------------------------------
def test_checkpoint_of_another_model_class_is_refused(mnist_dir):
    cnn = ["-c", str(CNN), "--data.init_args.data_dir", str(mnist_dir), "--data.init_args.val_size", "64"]
    main(["fit", *cnn, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    checkpoint = Path("runs/mnist_cnn/version_0/checkpoints/last.ckpt")
    for subcommand in ("test", "fit"):
        with pytest.raises(RunError, match=r"holds a lightning_modules\.cnn\.CNNClassifier, but this config builds "
                                           r"a lightning_modules\.mlp\.MLPClassifier"):  # fmt: skip
            main([subcommand, *mlp(mnist_dir, "--ckpt_path", str(checkpoint))])
    assert not Path("runs/mnist_mlp").exists()  # nothing filed under the MLP's runs


def test_resume_with_other_hyperparameters_is_refused_before_anything_is_written(mnist_dir):
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "1")])
    before = snapshot(RUN)
    with pytest.raises(RunError, match=r"hidden_units: \[32\] in the checkpoint, \[128, 128\] here"):
        main(["fit", *mlp(mnist_dir, "--ckpt_path", "last", "--model.init_args.hidden_units", "[128,128]")])
    with pytest.raises(RunError, match=r"optimizer\.init_args\.lr: 0\.001 in the checkpoint, 0\.05 here"):
        main(["fit", *mlp(mnist_dir, "--ckpt_path", "last", "--model.init_args.optimizer.init_args.lr", "0.05")])
    assert snapshot(RUN) == before and [p.name for p in RUN.parent.iterdir()] == ["version_0"]


def test_evaluation_builds_the_model_the_checkpoint_holds(mnist_dir, caplog):
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "1")])  # hidden_units [32]
    test = main(["test", "-c", str(MLP), "--data.init_args.data_dir", str(mnist_dir), "--ckpt_path", "last"])
    assert test.model.hparams.hidden_units == [32]  # the config says [256, 256]
    assert "test/acc" in test.trainer.callback_metrics


def test_evaluation_may_change_only_what_the_model_marks_evaluation_only():
    saved = {"hyper_parameters": {"_class_path": "lightning_modules.few_shot.ProtoNet", "filters": 64, "tta_shift": 2}}
    config = {"class_path": "lightning_modules.few_shot.ProtoNet", "init_args": {"filters": 64, "tta_shift": 0}}
    assert evaluation_hparams("lightning_modules.airbench.AirbenchClassifier") == ("tta_level",)
    assert evaluation_hparams("no.such.Module") == ()
    assert check_model(Path("a.ckpt"), saved, config, "test") is None  # built from the config: tta_shift 0
    wider = {**config, "init_args": {"filters": 128, "tta_shift": 0}}
    assert check_model(Path("a.ckpt"), saved, wider, "predict")["dict_kwargs"] == {"filters": 64, "tta_shift": 0}
    with pytest.raises(RunError, match="tta_shift: 2 in the checkpoint, 0 here"):  # a resumed fit keeps its run's
        check_model(Path("a.ckpt"), saved, config, "fit")


# ---- 7. leftovers of killed saves --------------------------------------------------------------------------------
def test_leftovers_of_killed_saves_are_removed_when_the_run_continues(mnist_dir):
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "1")])
    leftover = RUN / "checkpoints" / ".last.ckpt.0a1b2c3d.tmp"  # what AtomicCheckpointIO leaves when SIGKILLed
    leftover.write_bytes(b"PK\x03\x04" + bytes(1000))
    kept = RUN / "checkpoints" / "notes.tmp"  # not one of ours
    kept.write_text("mine")
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "2", "--ckpt_path", "last")])
    assert not leftover.exists() and kept.exists()


# ---- 8. one process per run ---------------------------------------------------------------------------------------
def test_a_second_process_on_a_run_is_refused_and_stale_locks_are_taken_over(mnist_dir, tmp_path):
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "1")])
    lock = RunLock(RUN)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.path.write_text(f'{{"pid": {holder.pid}, "host": "{socket.gethostname()}", "slurm_job": null, '
                             '"started": "2026-11-30T10:00:00+00:00"}')  # fmt: skip
        with pytest.raises(RunError, match=f"in use by process {holder.pid} on {socket.gethostname()}"):
            main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "2", "--ckpt_path", "last")])
    finally:
        holder.kill()
        holder.wait()
    assert rows(RUN)[-1]["epoch"] == "0"  # the refused launch wrote nothing
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "2", "--ckpt_path", "last")])  # its process is gone: stale
    assert not lock.path.exists() and rows(RUN)[-1]["epoch"] == "1"


def test_lock_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    other = RunLock(tmp_path)
    other._me = lambda: {"pid": 1, "host": "elsewhere", "slurm_job": None, "started": ""}  # another machine
    with pytest.raises(RunError, match="in use by process"):
        other.acquire()
    mtime = lock.path.stat().st_mtime
    os.utime(lock.path, (mtime - 3600, mtime - 3600))
    import time

    time.sleep(0.2)
    assert lock.path.stat().st_mtime > mtime - 10  # the holder's heartbeat refreshed it
    lock.release()
    assert not lock.path.exists()
    # Another host's lock whose heartbeat stopped 20 minutes ago is stale; so is one of this very SLURM job.
    lock.path.write_text('{"pid": 1, "host": "elsewhere", "slurm_job": "42", "started": ""}')
    os.utime(lock.path, (mtime - 1200, mtime - 1200))
    assert RunLock(tmp_path)._stale(RunLock(tmp_path).holder())
    os.utime(lock.path)
    assert not RunLock(tmp_path)._stale(RunLock(tmp_path).holder())
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert RunLock(tmp_path)._stale(RunLock(tmp_path).holder())  # a requeued job takes over from itself


# ---- 9. predict writes and prints its scores ----------------------------------------------------------------------
def test_predict_prints_the_scores_and_writes_them_to_the_run_directory(mnist_dir, capsys):
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "1")])
    predict = main(["predict", *mlp(mnist_dir, "--ckpt_path", "last")])
    path = Path(predict.trainer.log_dir) / "predictions.csv"
    with path.open(newline="") as file:
        table = list(csv.DictReader(file))
    assert [int(r["id"]) for r in table] == list(range(64))  # the 64 generated test images, in order
    assert list(table[0]) == ["id", "label", "probability", *(f"p_{c}" for c in range(10))]
    probabilities = torch.cat(predict.trainer.predict_loop.predictions)
    assert [int(r["label"]) for r in table] == probabilities.argmax(1).tolist()
    assert float(table[5]["probability"]) == pytest.approx(probabilities[5].max().item(), rel=1e-6)
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["id", "label", "probability"] and "... 44 more" in out
    assert f"Predictions: 64 rows written to {path}" in out


# ---- 12. errors are one paragraph ---------------------------------------------------------------------------------
def test_errors_are_one_paragraph_without_traceback(mnist_dir, tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(5000))
    missing_data = ["fit", "-c", str(MLP), "--data.init_args.data_dir", str(tmp_path / "nowhere")]
    cases = [
        (["test", *mlp(mnist_dir, "--ckpt_path", str(junk))], 1, "cannot be read: it is damaged or incomplete"),
        (["test", *mlp(mnist_dir, "--ckpt_path", "missing.ckpt")], 1, "--ckpt_path missing.ckpt: no such file"),
        (missing_data, 1, "MNIST"),
        (["fit", *mlp(mnist_dir, "--data.init_args.val_size", "5000")], 1, "val_size=5000 asks for 5000 validation"),
    ]
    for args, code, expected in cases:
        assert run_command(lambda args=args: main(args)) == code
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
        assert "Traceback" not in err and "pickled Python objects" not in err
    assert not Path("runs").exists() or not any(Path("runs").rglob("version_*"))  # 13: no empty run left


def test_a_full_disk_is_named(mnist_dir, monkeypatch, capsys):
    def full(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1394") from OSError(
            28, "No space left on device"
        )

    monkeypatch.setattr(torch, "save", full)
    assert run_command(lambda: main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "1")])) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: The disk is full: checkpoint ") and "MiB free" in err and "unexpected pos" not in err


def test_traceback_on_request(mnist_dir, monkeypatch):
    monkeypatch.setenv("TEMPLATE_TRACEBACK", "1")
    with pytest.raises(RunError):
        run_command(lambda: main(["test", *mlp(mnist_dir, "--ckpt_path", "missing.ckpt")]))


# ---- 13. a failed run leaves no directory behind ------------------------------------------------------------------
def test_a_run_failing_before_its_first_checkpoint_leaves_no_directory(mnist_dir):
    class Boom(Callback):
        def on_train_batch_start(self, *args):
            raise RuntimeError("boom")

    import test_runs

    test_runs.Boom = Boom
    with pytest.raises(RuntimeError, match="boom"):
        main(["fit", *mlp(mnist_dir, "--trainer.callbacks+=test_runs.Boom")])
    assert not RUN.exists()
    main(["fit", *mlp(mnist_dir, "--trainer.max_epochs", "1")])
    assert RUN.is_dir()  # the next run takes version_0: no gap, nothing stale for best/last


# ---- 14. SLURM requeues continue one run directory -----------------------------------------------------------------
HOOKS = ["on_train_batch_start", "on_train_batch_end", "on_validation_batch_start", "on_validation_end",
         "on_train_epoch_end", "on_sanity_check_start"]  # fmt: skip


class SignalAt(Callback):
    """Sends this process SIGUSR1 (SLURM's warning before the time limit) at the ``at``-th call of ``hook``.

    A resume inside an epoch has no sanity check: ``on_sanity_check_start`` then signals when training starts.
    """

    def __init__(self, hook: str, at: int) -> None:
        self.hook, self.at, self.calls = hook, at, 0
        for name in HOOKS:
            setattr(self, name, self._count if name == hook else (lambda *args, **kwargs: None))

    def _count(self, *args, **kwargs) -> None:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.hook == "on_sanity_check_start" and self.calls == 0:
            self._count()


def test_slurm_requeues_continue_the_run_and_validate_every_epoch_once(mnist_dir, tmp_path, monkeypatch):
    """Twelve requeues, the signal landing in every phase of an epoch (each hook but the sanity check's at its first
    and at its second call): one run directory, every epoch validated and logged once, and the final weights of the
    uninterrupted run."""
    epochs, requeues = 16, 12
    args = ["fit", *mlp(mnist_dir, "--trainer.max_epochs", str(epochs), "--data.init_args.batch_size", "64",
                        "--trainer.deterministic", "true")]  # fmt: skip
    (tmp_path / "reference").mkdir()
    monkeypatch.chdir(tmp_path / "reference")
    main(args)  # uninterrupted
    expected = torch.load(RUN / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    monkeypatch.chdir(tmp_path)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = {"SLURM_JOB_ID": "777", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_NNODES": "1", "SLURM_NODELIST": "127.0.0.1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0"}  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    job = [*args, "--trainer.default_root_dir", "runs/slurm/777", "--trainer.callbacks+=callbacks.SafeRequeue"]
    for n in range(requeues):  # as the sbatch script does: the same command for the first launch and every requeue
        hook = HOOKS[n % len(HOOKS)]
        at = 1 if hook == "on_sanity_check_start" else 1 + n // len(HOOKS) % 2
        signal_at = f"--trainer.callbacks+={{'class_path': 'test_runs.SignalAt', 'init_args': {{'hook': '{hook}', 'at': {at}}}}}"  # noqa: E501
        with pytest.raises(JobRequeued):
            main([*job, signal_at])
    finished = main(job)
    assert finished.trainer.current_epoch == epochs
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"] * requeues
    assert [p.name for p in Path("runs/mnist_mlp").iterdir()] == ["version_0"]
    assert kinds(rows(RUN)) == [(e, k) for e in range(epochs) for k in ("val", "train")]
    final = torch.load(RUN / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name, weight in expected.items():
        assert torch.equal(final[name], weight), f"{name} differs from the uninterrupted run"
