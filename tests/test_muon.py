"""FilterMuon (lightning_modules/muon.py) and the airbench classifier's Muon option."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from test_fast_cifar import CONFIG, ROOT, EpochLosses, folder_data, small_model, write_colour_tree
from train import main

from lightning_modules.muon import FilterMuon, orthogonalize


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = trainer.current_epoch == self.epoch


def gradients(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def run(optimizer, param, grads):
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach().clone()


def test_orthogonalize_flattens_the_spectrum():
    matrix = torch.randn(16, 72) @ torch.diag(torch.logspace(-2, 1, 72))  # condition number 1000
    singular = torch.linalg.svdvals(orthogonalize(matrix, steps=5).float())
    assert singular.min() > 0.6 and singular.max() < 1.3, singular
    tall = orthogonalize(matrix.T, steps=5).float()  # tall matrices are orthogonalised through their transpose
    torch.testing.assert_close(tall, orthogonalize(matrix, steps=5).float().T)


def test_a_matrix_steps_as_with_torchs_muon():
    """On a 2-D weight, without momentum or the normalisation, FilterMuon steps as torch.optim.Muon. (With momentum
    torch's buffer is an average, ours a sum: the same direction, whose scale the orthogonalisation drops; the
    bfloat16 roundings of the two scales differ, so that case is checked against the formula in the next test.)"""
    start, grads = torch.randn(8, 24), gradients((8, 24), 3)
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    group = {"params": [ours], "muon": True}
    mine = run(FilterMuon([group], lr=0.05, muon_momentum=0.0, ns_steps=5, normalize=False), ours, grads)
    reference = torch.optim.Muon([theirs], lr=0.05, momentum=0.0, nesterov=True, weight_decay=0.0, ns_steps=5)
    torch.testing.assert_close(mine, run(reference, theirs, grads))
    assert (mine - start).abs().max() > 0.02  # it moved


def test_other_groups_step_as_torchs_nesterov_sgd():
    start, grads = torch.randn(5, 3), gradients((5, 3), 4)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    mine = run(FilterMuon([ours], lr=0.1, momentum=0.85, weight_decay=0.01), ours, grads)
    reference = torch.optim.SGD([theirs], lr=0.1, momentum=0.85, weight_decay=0.01, nesterov=True)
    torch.testing.assert_close(mine, run(reference, theirs, grads))


def test_filters_are_normalised_then_stepped_along_the_orthogonalised_momentum():
    filters = torch.nn.Parameter(3 * torch.randn(4, 2, 3, 3))
    (grad,) = gradients((4, 2, 3, 3), 1)
    optimizer = FilterMuon([{"params": [filters], "muon": True}], lr=0.0)
    run(optimizer, filters, [grad])
    assert filters.norm().item() == pytest.approx(2.0)  # sqrt(out channels)
    before = filters.detach().clone()
    optimizer.param_groups[0]["lr"] = 0.1
    after = run(optimizer, filters, [grad])  # momentum 0.6: buffer = 1.6 g, Nesterov update = g + 0.6 * 1.6 g
    expected = before - 0.1 * orthogonalize((1.96 * grad).reshape(4, -1), 3).float().reshape(4, 2, 3, 3)
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)


def test_bad_groups_and_options_are_refused():
    with pytest.raises(ValueError, match="Muon needs >= 2-D"):
        FilterMuon([{"params": [torch.nn.Parameter(torch.ones(3))], "muon": True}], lr=0.1)
    with pytest.raises(ValueError, match="momenta"):
        FilterMuon([torch.nn.Parameter(torch.ones(3))], lr=0.1, muon_momentum=1.0)
    with pytest.raises(ValueError, match="ns_dtype"):
        FilterMuon([torch.nn.Parameter(torch.ones(3))], lr=0.1, ns_dtype="float16")
    with pytest.raises(ValueError, match="filter_optimizer"):
        small_model(filter_optimizer="adam")


def test_the_momentum_survives_the_optimizers_state_dict():
    start, grads = torch.randn(6, 2, 3, 3), gradients((6, 2, 3, 3), 4)

    def fresh():
        param = torch.nn.Parameter(start.clone())
        return param, FilterMuon([{"params": [param], "muon": True}], lr=0.05)

    param, optimizer = fresh()
    straight = run(optimizer, param, grads)
    param, optimizer = fresh()
    run(optimizer, param, grads[:2])
    state, halfway = optimizer.state_dict(), param.detach().clone()
    param, optimizer = fresh()
    param.data.copy_(halfway)
    optimizer.load_state_dict(state)
    torch.testing.assert_close(run(optimizer, param, grads[2:]), straight)


def test_the_classifier_trains_with_muon_and_resumes_exactly(tmp_path):
    root = write_colour_tree(tmp_path / "data", {"train": 24, "test": 4})
    options = dict(filter_optimizer="muon", lr=0.05, lookahead_every=0, warmup_fraction=0.0, final_lr_factor=0.0)
    pl.seed_everything(0)
    model = small_model(**options)
    losses = EpochLosses()
    trainer = quiet_trainer(tmp_path, max_epochs=4, num_sanity_val_steps=0, callbacks=[losses])
    trainer.fit(model, folder_data(root, batch_size=16))
    assert losses.val_losses[-1] < losses.val_losses[0] - 0.05, losses.val_losses
    assert float(trainer.callback_metrics["val/acc"]) > 0.9
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, FilterMuon)
    shifts, rest, filters = optimizer.param_groups
    assert filters["muon"] and all(p.ndim == 4 for p in filters["params"]) and len(filters["params"]) == 6
    assert any(p is model.net.whiten.bias for p in shifts["params"])
    assert [p is model.net.head.weight for p in rest["params"]] == [True]
    assert filters["lr"] == pytest.approx(0.0)  # decayed linearly to final_lr_factor 0 at the last step
    assert filters["ns_dtype"] == "float32"  # the Trainer's precision is 32-true: no bfloat16 iterations

    # 4 epochs stopped after 2, a checkpoint, resumed == 4 epochs straight: weights and Muon momentum restored.
    # (Without the augmentation, whose random state the CLI's checkpoints keep but these bare Trainers do not.)
    def fit(ckpt_path=None, stop_after_epoch=None):
        pl.seed_everything(0)
        data, model = folder_data(root, batch_size=16), small_model(**options)
        data.augment = None
        stop = StopAfterEpoch(stop_after_epoch) if stop_after_epoch is not None else None
        trainer = quiet_trainer(tmp_path, max_epochs=4, num_sanity_val_steps=0, callbacks=[stop] if stop else [])
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return trainer, model

    _, straight = fit()
    stopped, _ = fit(stop_after_epoch=1)
    assert stopped.global_step == 8  # 2 of the 4 epochs
    stopped.save_checkpoint(tmp_path / "stopped.ckpt")
    _, resumed = fit(ckpt_path=tmp_path / "stopped.ckpt")
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def test_the_muon_variant_composes_with_the_fast_config(tmp_path):
    variant = str(ROOT / "configs" / "variants" / "cifar10_muon.yaml")
    root = write_colour_tree(tmp_path / "data", {"train": 8, "test": 4}, classes=10)
    cli = main(["fit", "-c", CONFIG, "-c", variant, "--model.init_args.widths", "[8, 16, 16]",
                "--data=datamodules.ImageFolderDataModule", "--data.init_args.data_dir", str(root),
                "--data.init_args.image_size", "[32, 32]", "--data.init_args.val_size", "20",
                "--trainer.fast_dev_run", "1"])  # fmt: skip
    hp = cli.model.hparams
    assert (hp.filter_optimizer, hp.lookahead_every, hp.warmup_fraction, hp.tta_level) == ("muon", 0, 0.0, 2)
    assert cli.datamodule.hparams.batch_size == 2000  # kept across --data=...
    assert cli.config["fit"]["trainer"]["max_epochs"] == 8  # (fast_dev_run itself runs one batch)
    assert cli.config["fit"]["experiment"] == "cifar10_fast_muon"  # its runs stand apart from the SGD recipe's
    assert isinstance(cli.trainer.optimizers[0], FilterMuon)
    assert torch.isfinite(cli.trainer.callback_metrics["test/acc"])
