"""Topic networks match the book's layer shapes; the base module trains, checks its inputs and reloads."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from torch import nn

from datamodules import DigitsDataModule
from lightning_modules import CNNClassifier, MLPClassifier, RNNClassifier, YNetworkClassifier
from lightning_modules.layers import LockedDropout, activation, keras_init_
from lightning_modules.losses import task_loss


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("cls", "params"),
    [
        (MLPClassifier, 269_322),  # Keras summary of the book MLP
        (CNNClassifier, 80_266),  # Keras summary of the book CNN
        (RNNClassifier, 75_530 + 256),  # Keras SimpleRNN has one bias vector, PyTorch two (b_ih, b_hh)
        (YNetworkClassifier, 2 * (320 + 18_496 + 73_856) + (2 * 3 * 3 * 128 * 10 + 10)),
    ],
)
def test_book_networks(cls, params):
    model = cls()
    assert n_params(model) == params
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_flatten_is_576():
    head = CNNClassifier().net[-1]
    assert head.in_features == 576


@pytest.mark.parametrize("merge", ["concat", "add", "multiply"])
def test_y_network_merges_and_takes_two_inputs(merge):
    model = YNetworkClassifier(merge=merge).eval()
    x = torch.rand(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    assert torch.allclose(model(x), model(x, x))
    assert not torch.allclose(model(x), model(x, torch.zeros_like(x)))
    flat = model.net.head[-1].in_features
    assert flat == (3 * 3 * 256 if merge == "concat" else 3 * 3 * 128)


def test_y_network_branches_use_their_dilation():
    left, right = YNetworkClassifier().net.branches
    assert left[0].dilation == (1, 1) and right[0].dilation == (2, 2)


def test_rnn_reads_rows_as_time_steps():
    model = RNNClassifier(units=16, dropout=0.0).eval()
    assert model.net.rnn.input_size == 28
    x = torch.rand(2, 1, 28, 28)
    x_last_row_changed = x.clone()
    x_last_row_changed[:, :, -1] += 1
    # The output depends on the last row (the last time step) ...
    assert not torch.allclose(model(x), model(x_last_row_changed))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_cells(cell):
    model = RNNClassifier(units=32, cell=cell)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_locked_dropout_uses_one_mask_per_sequence():
    torch.manual_seed(0)
    drop = LockedDropout(0.5).train()
    out = drop(torch.ones(4, 7, 16))
    zero = out == 0
    assert zero.any() and (~zero).any()
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # the same units dropped at every step
    assert torch.allclose(out[~zero], torch.tensor(2.0))  # inverted-dropout scaling
    assert torch.equal(drop.eval()(torch.ones(2, 3, 4)), torch.ones(2, 3, 4))


def test_keras_init():
    torch.manual_seed(0)
    lstm = keras_init_(nn.LSTM(8, 5))
    assert torch.equal(lstm.bias_ih_l0[5:10], torch.ones(5))  # forget gate
    assert torch.count_nonzero(lstm.bias_hh_l0) == 0
    for gate in lstm.weight_hh_l0.chunk(4):
        assert torch.allclose(gate @ gate.T, torch.eye(5), atol=1e-5)
    dense = keras_init_(nn.Linear(300, 100))
    limit = math.sqrt(6 / 400)
    assert dense.weight.abs().max() <= limit and dense.weight.abs().max() > 0.9 * limit
    assert torch.count_nonzero(dense.bias) == 0


def test_activation_by_name():
    assert isinstance(activation("selu"), nn.SELU)
    with pytest.raises(ValueError, match="relu"):
        activation("swishy")


def test_integer_and_one_hot_targets_give_the_same_loss():
    logits = torch.randn(6, 4)
    target = torch.tensor([0, 3, 1, 2, 2, 0])
    one_hot = nn.functional.one_hot(target, 4).float()
    sparse = task_loss(logits, target, "multiclass")
    assert torch.allclose(sparse, nn.functional.cross_entropy(logits, target))
    assert torch.allclose(task_loss(logits, one_hot, "multiclass"), sparse)


def test_prob_clip_bounds_the_loss_like_keras():
    logits = torch.tensor([[50.0, -50.0]])
    wrong = torch.tensor([1])
    assert task_loss(logits, wrong, "multiclass") > 90
    assert task_loss(logits, wrong, "multiclass", prob_clip=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-4)
    assert task_loss(torch.tensor([[-40.0]]), torch.tensor([1.0]), "binary", 1e-7) == pytest.approx(
        -math.log(1e-7), rel=1e-4
    )


def test_binary_and_regression_heads():
    binary = MLPClassifier(task="binary", hidden_units=(8,))
    assert binary(torch.rand(5, 1, 28, 28)).shape == (5, 1)
    logits, y = torch.randn(5, 1), torch.tensor([0, 1, 1, 0, 1])
    assert torch.allclose(
        task_loss(logits, y, "binary"),
        nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float()),
    )
    regression = MLPClassifier(task="regression", hidden_units=(8,), input_shape=(1, 1, 13))
    assert regression(torch.rand(5, 1, 1, 13)).shape == (5, 1)
    assert task_loss(torch.ones(5, 1), torch.zeros(5), "regression") == pytest.approx(1.0)


def test_narrow_hidden_layer_warns():
    with pytest.warns(UserWarning, match="below the number of classes"):
        MLPClassifier(hidden_units=(256, 4))


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, **{"devices": 1, **kwargs})


def test_training_lowers_the_loss_and_learns(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    model = MLPClassifier(hidden_units=(64,), dropout=0.1)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=0)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]
    trainer = _trainer(tmp_path, max_epochs=5)
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert after["val/loss"] < 0.5 * before["val/loss"]
    assert after["val/acc"] > 0.85
    assert after["val/top5_err"] < 0.05 < before["val/top5_err"]  # learnt: the true class is among the top 5
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert set(result) >= {"test/loss", "test/acc", "test/top5_err"}


def test_epoch_metrics_are_sample_weighted_over_the_whole_split(tmp_path):
    """Validation updates metric states per batch and logs once: the logged loss and accuracy are those of the
    whole split, with a smaller last batch weighted by its size."""

    class Seen(pl.Callback):
        def __init__(self):
            self.batches = []

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.batches.append(batch)

    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)  # 144 validation images: 64 + 64 + 16
    model = MLPClassifier(hidden_units=(32,))
    seen = Seen()
    result = _trainer(tmp_path, callbacks=[seen]).validate(model, datamodule=dm, verbose=False)[0]
    x, y = (torch.cat(parts) for parts in zip(*seen.batches, strict=True))
    assert len({len(b[1]) for b in seen.batches}) == 2  # the last batch is smaller
    with torch.no_grad():
        logits = model.eval()(x)
    assert result["val/loss"] == pytest.approx(float(model.compute_loss(logits, y)), rel=1e-5)
    assert result["val/acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()), rel=1e-6)
    in_top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(dim=1)
    assert result["val/top5_err"] == pytest.approx(float(1 - in_top5.float().mean()), rel=1e-6)


def test_epoch_mean_weights_batches_keeps_nan_and_survives_inference_mode_resets():
    from lightning_modules.base import EpochMean

    mean = EpochMean()
    mean.update(torch.tensor(1.0), 3)
    mean.update(torch.tensor(3.0), 1)
    assert float(mean.compute()) == pytest.approx(1.5)
    with torch.inference_mode():  # Lightning resets metrics inside validation's inference mode
        mean.reset()
    mean.update(torch.tensor(2.0, requires_grad=True) * 1, 2)  # then training updates them
    assert float(mean.compute()) == pytest.approx(2.0)
    mean.update(torch.tensor(float("nan")), 1)
    assert math.isnan(float(mean.compute()))  # a diverging loss shows, it is not dropped


def test_one_hot_targets_train_exactly_as_integer_targets(tmp_path):
    """Keras' categorical CE on one-hot rows and its sparse CE on class indices: the same training run."""

    def fit(target_format: str) -> dict[str, float]:
        pl.seed_everything(0)
        trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=2)
        trainer.fit(MLPClassifier(hidden_units=(32,)), DigitsDataModule(batch_size=64, target_format=target_format))
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    one_hot, sparse = fit("one_hot"), fit("index")
    assert one_hot.keys() == sparse.keys() >= {"train/loss", "val/loss", "val/acc"}
    assert one_hot == pytest.approx(sparse, rel=1e-5)


def test_class_count_mismatch_is_reported(tmp_path):
    trainer = _trainer(tmp_path, fast_dev_run=True)
    with pytest.raises(ValueError, match="num_classes 10"):
        trainer.fit(MLPClassifier(num_classes=5, hidden_units=(16,)), datamodule=DigitsDataModule())


def test_input_shape_mismatch_is_reported(tmp_path):
    trainer = _trainer(tmp_path, fast_dev_run=True)
    with pytest.raises(ValueError, match="input_shape"):
        trainer.fit(CNNClassifier(input_shape=(3, 32, 32)), datamodule=DigitsDataModule())


def test_scheduler_from_config_and_checkpoint_reload(tmp_path):
    from functools import partial

    model = CNNClassifier(
        filters=(8, 8),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = CNNClassifier.load_from_checkpoint(path, weights_only=False)
    assert restored.hparams.filters == (8, 8)
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(restored.eval()(x), model.eval()(x))


@pytest.mark.parametrize(("l1", "l2"), [(0.01, 0.0), (0.0, 0.01), (0.003, 0.02)])
def test_l1_l2_penalties_add_exactly_their_sum_over_kernels(l1, l2):
    torch.manual_seed(0)
    plain = MLPClassifier(hidden_units=(16,), dropout=0.0)
    model = MLPClassifier(hidden_units=(16,), dropout=0.0, l1=l1, l2=l2)
    model.load_state_dict(plain.state_dict())
    kernels = [m.weight for m in model.net if isinstance(m, nn.Linear)]
    expected = sum(l1 * w.abs().sum() + l2 * w.square().sum() for w in kernels)
    assert torch.allclose(model.regularization_loss(), expected)
    batch = (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
    with pytest.warns(UserWarning):  # self.log outside a Trainer
        difference = model.training_step(batch, 0) - plain.training_step(batch, 0)
    assert torch.allclose(difference, expected)  # biases are not penalised: only kernels count


def test_max_norm_constrains_each_unit_after_every_step(tmp_path):
    from functools import partial

    def max_unit_norm(model):
        return max(m.weight.norm(dim=1).max().item() for m in model.net if isinstance(m, nn.Linear))

    def fit(**kwargs):
        pl.seed_everything(0)
        model = MLPClassifier(hidden_units=(32,), optimizer=partial(torch.optim.SGD, lr=5.0), **kwargs)
        _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(model, DigitsDataModule())
        return model

    assert max_unit_norm(fit()) > 1.0  # a large learning rate pushes some units past the limit ...
    constrained = fit(max_norm=1.0)
    assert max_unit_norm(constrained) <= 1.0 + 1e-5  # ... which max_norm rescales back
    with pytest.raises(ValueError, match="max_norm"):
        MLPClassifier(max_norm=-1.0)


class RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("interval", ["auto", "epoch"])
def test_one_cycle_steps_per_batch_unless_told_otherwise(tmp_path, interval):
    """OneCycleLR's total_steps count batches: by default it steps every batch and reaches its peak."""
    steps = 3 * math.ceil(len(range(1293)) / 64)  # 3 epochs of the digits training split (1,293 images, batch 64)
    one_cycle = {"class_path": "torch.optim.lr_scheduler.OneCycleLR",
                 "init_args": {"max_lr": 0.05, "total_steps": steps, "pct_start": 0.3}}  # fmt: skip
    model = MLPClassifier(
        input_shape=(1, 28, 28),
        hidden_units=(32,),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(optimizer, **one_cycle["init_args"]),
        scheduler_interval=interval,
    )
    record = RecordLR()
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[record], num_sanity_val_steps=0)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    assert len(record.lrs) == steps
    if interval == "auto":
        assert trainer.lr_scheduler_configs[0].interval == "step"
        assert max(record.lrs) == pytest.approx(0.05, rel=1e-3)  # the peak, reached after 30 % of the steps
        assert record.lrs[-1] < 0.05 / 100  # and annealed at the end
    else:  # stepped once an epoch, as the option says: three values, never near the peak
        assert trainer.lr_scheduler_configs[0].interval == "epoch"
        assert len(set(record.lrs)) == 3 and max(record.lrs) < 0.01
    with pytest.raises(ValueError, match="scheduler_interval='sometimes'"):
        MLPClassifier(scheduler_interval="sometimes")


# ---- defaults are PyTorch's; what the Keras initialiser and the regularisers do not cover is named --------------


def test_defaults_are_pytorchs_own_and_keras_is_asked_for():
    torch.manual_seed(0)
    model = MLPClassifier(hidden_units=(16,))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Dropout(0.45), nn.Linear(16, 10))
    assert [type(m) for m in model.net] == [type(m) for m in plain]  # nn.Dropout, no custom kernel
    pairs = zip(model.net.state_dict().values(), plain.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)  # PyTorch's initialisation, untouched
    logits, target = torch.tensor([[30.0, -30.0]]), torch.tensor([1])
    assert float(model.compute_loss(logits.repeat(1, 5), target)) == pytest.approx(
        float(nn.functional.cross_entropy(logits.repeat(1, 5), target))
    )  # no probability clipping (Keras' would cap it at -log(1e-7) = 16.1): PyTorch's cross-entropy
    keras = MLPClassifier(hidden_units=(16,), init="keras")
    assert all(torch.count_nonzero(m.bias) == 0 for m in keras.net if isinstance(m, nn.Linear))  # Keras' zero biases


def keras_init_warnings(module: nn.Module) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_init_(module)
    return [str(w.message) for w in caught if "keep PyTorch's initialisation" in str(w.message)]


class TinyTransformer(nn.Module):
    """Patch tokens -> + pos_embed, a cls_token -> self-attention -> Dense on the cls token."""

    def __init__(self, out_features: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(28, dim)  # one token per image row
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 29, dim))
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_features)

    def forward(self, x):
        tokens = self.proj(x.flatten(1, 2))
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        attended, _ = self.attention(tokens, tokens, tokens)
        return self.head(self.norm(attended[:, 0]))


def test_keras_init_names_the_parameters_it_leaves_at_pytorchs_init():
    (message,) = keras_init_warnings(TinyTransformer())
    for name in ("cls_token", "pos_embed", "attention.in_proj_weight", "attention.in_proj_bias"):
        assert name in message
    assert "proj.weight," not in message and "norm" not in message and "head" not in message  # covered or own
    for book in (MLPClassifier(), CNNClassifier(), RNNClassifier(cell="lstm"), YNetworkClassifier()):
        assert keras_init_warnings(book) == []  # the book's networks are covered completely


class TransformerClassifier(MLPClassifier):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = TinyTransformer(self.out_features)


@pytest.mark.parametrize("penalty", [{"l2": 0.01}, {"l1": 0.01}, {"max_norm": 2.0}])
def test_regularisers_name_the_weights_they_skip_when_fit_starts(tmp_path, penalty):
    model = TransformerClassifier(hidden_units=(16,), **penalty)
    assert set(model.unregularized_weights()) == {"net.cls_token", "net.pos_embed", "net.attention.in_proj_weight"}
    with pytest.warns(UserWarning, match="not regularised") as caught:
        _trainer(tmp_path, fast_dev_run=1).fit(model, DigitsDataModule(batch_size=16))
    (message,) = [str(w.message) for w in caught if "not regularised" in str(w.message)]
    assert "net.cls_token" in message and "net.pos_embed" in message and "in_proj_weight" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no penalty, nothing to warn about
        TransformerClassifier(hidden_units=(16,)).warn_unregularized()
