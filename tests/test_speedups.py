"""The CLI's optional speed-ups (lifecycle/speedups.py): they change how fast a run goes, never what it computes, and
leave the researcher's module exactly as it was when the run ends."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from torch import nn

from datamodules import DigitsDataModule
from lifecycle.speedups import (
    NVML_CUDA_CHECK,
    CPUSpeedups,
    NullProfiler,
    ThresholdDropout,
    use_runtime_cuda_check_without_gpu,
    use_threshold_dropout,
)
from lightning_modules import MLPClassifier


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, **{"devices": 1, "max_epochs": 1, "limit_val_batches": 0, **kwargs})


# ---- dropout -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.2, 0.45, 0.8])
def test_threshold_dropout_drops_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    drop = ThresholdDropout(p).train()
    x = (torch.rand(256, 512) + 0.5).requires_grad_()
    out = drop(x)
    kept = out != 0
    assert abs((~kept).float().mean().item() - p) < 0.01  # 131k draws: the dropped share is p within 1 %
    assert torch.allclose(out[kept], x[kept] / (1 - p))  # inverted-dropout scaling
    out.sum().backward()
    assert torch.allclose(x.grad, kept.float() / (1 - p))  # gradient flows through kept units only
    assert isinstance(drop, nn.Dropout) and not list(drop.state_dict())  # drop-in for nn.Dropout


def test_threshold_dropout_edge_rates_and_eval_match_torch():
    x = torch.rand(8, 16) + 0.5
    assert torch.equal(ThresholdDropout(0.5).eval()(x), x)
    assert torch.equal(ThresholdDropout(0.0).train()(x), x)
    assert torch.count_nonzero(ThresholdDropout(1.0).train()(x)) == 0
    torch.manual_seed(1)
    in_place = x.clone()
    ThresholdDropout(0.5, inplace=True).train()(in_place)
    assert (in_place == 0).any() and not (x == 0).any()


def test_threshold_dropout_swaps_plain_dropout_only_and_undoes_it():
    class MyDropout(nn.Dropout):
        pass

    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), MyDropout(0.3), nn.Dropout1d(0.3))
    dropout = net[1]
    undo = use_threshold_dropout(net)
    assert [type(m) for m in net] == [nn.Linear, ThresholdDropout, MyDropout, nn.Dropout1d]
    assert net[1] is dropout and net[1].p == 0.3  # the same object: hooks and references stay valid
    undo()
    assert type(net[1]) is nn.Dropout


# ---- the CUDA availability check ---------------------------------------------------------------------------------


def test_cuda_check_switches_only_without_a_gpu(monkeypatch):
    monkeypatch.setenv(NVML_CUDA_CHECK, "1")  # what importing Lightning does
    with mock.patch.object(torch.cuda, "device_count", return_value=2):
        assert not use_runtime_cuda_check_without_gpu()  # a GPU machine keeps the fork-safe check
    assert os.environ[NVML_CUDA_CHECK] == "1"
    with mock.patch.object(torch.cuda, "device_count", return_value=0):
        assert use_runtime_cuda_check_without_gpu()
    assert os.environ[NVML_CUDA_CHECK] == "0" and not torch.cuda.is_available()


# ---- the callback ------------------------------------------------------------------------------------------------


class Inspect(pl.Callback):
    """What the module looks like while it trains."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.dropouts = [type(m) for m in pl_module.modules() if isinstance(m, nn.Dropout)]
        self.cuda_check = os.environ.get(NVML_CUDA_CHECK)


def test_speedups_apply_while_fitting_and_are_undone_after(tmp_path, monkeypatch):
    monkeypatch.setenv(NVML_CUDA_CHECK, "1")
    model = MLPClassifier(hidden_units=(8, 8))
    inspect = Inspect()
    with mock.patch.object(torch.cuda, "device_count", return_value=0):
        trainer = _trainer(tmp_path, limit_train_batches=1, callbacks=[CPUSpeedups(), inspect])
        trainer.fit(model, DigitsDataModule(batch_size=16))
    assert inspect.dropouts == [ThresholdDropout, ThresholdDropout] and inspect.cuda_check == "0"
    assert [type(m) for m in model.modules() if isinstance(m, nn.Dropout)] == [nn.Dropout, nn.Dropout]
    assert os.environ[NVML_CUDA_CHECK] == "1"


def test_speedups_are_undone_when_the_run_fails(tmp_path):
    class Fails(MLPClassifier):
        def training_step(self, batch, batch_idx):
            self.dropout_while_training = type(self.net[3])
            raise RuntimeError("boom")

    model = Fails(hidden_units=(8,))
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, callbacks=[CPUSpeedups()]).fit(model, DigitsDataModule(batch_size=16))
    assert model.dropout_while_training is ThresholdDropout and type(model.net[3]) is nn.Dropout


def test_speedups_change_nothing_that_is_computed(tmp_path):
    """Without dropout randomness, a run with the speed-ups ends with exactly the weights of a run without."""

    def fit(callbacks) -> dict[str, torch.Tensor]:
        pl.seed_everything(0)
        model = MLPClassifier(hidden_units=(16,), dropout=0.0)
        _trainer(tmp_path, limit_train_batches=5, callbacks=callbacks).fit(model, DigitsDataModule(batch_size=32))
        return model.state_dict()

    plain, fast = fit([]), fit([CPUSpeedups()])
    assert plain.keys() == fast.keys() and all(torch.equal(plain[k], fast[k]) for k in plain)


def test_null_profiler_hands_out_one_no_op_context_and_fits(tmp_path):
    profiler = NullProfiler()
    assert profiler.profile("a") is profiler.profile("b")
    with profiler.profile("a"), profiler.profile("a"):  # reentrant
        pass
    model = MLPClassifier(hidden_units=(8,))
    before = model.net[1].weight.detach().clone()
    _trainer(tmp_path, limit_train_batches=2, profiler=profiler).fit(model, DigitsDataModule(batch_size=16))
    assert not torch.equal(before, model.net[1].weight)


def test_the_cli_applies_the_speedups_unless_told_not_to(tmp_path, monkeypatch):
    from pathlib import Path

    from train import main

    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    with_them = main(["-c", config], run=False).trainer.callbacks
    without = main(["-c", config, "--cpu_speedups", "false"], run=False).trainer.callbacks
    assert [type(c) for c in with_them if isinstance(c, CPUSpeedups)] == [CPUSpeedups]
    assert not any(isinstance(c, CPUSpeedups) for c in without)
