"""Transfer learning from torchvision bases, offline: weights 'random', local state_dict files, a fake torch cache."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torchvision
from conftest import quiet_trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from train import main

from lightning_modules.backbones import BATCH_NORM
from lightning_modules.fine_tuning import TransferFinetuning
from lightning_modules.pretrained import PretrainedWeightsError, cached_weight_file
from lightning_modules.transfer import TransferClassifier, average_across_processes_

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs/cifar10/transfer_feature_extraction.yaml", ROOT / "configs/cifar10/transfer_finetune.yaml"]


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """A private torch cache, and any download attempt fails as it would without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def loader(n: int = 8, classes: int = 10, batch_size: int = 4, shape=(3, 32, 32)) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def trainer(tmp_path: Path, callbacks=(), **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, callbacks=list(callbacks), **{"max_epochs": 1, "limit_val_batches": 0, **kwargs})


def base_state(model: TransferClassifier) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.net.base.state_dict().items()}


def validate(tmp_path: Path, model: TransferClassifier) -> None:
    """One validation batch: the Trainer runs prepare_data and setup, as a fit or a test would."""
    quiet_trainer(tmp_path, limit_val_batches=1).validate(model, loader(), verbose=False)


def trainable(model: TransferClassifier) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# ---- weights ------------------------------------------------------------------------------------------------------


def test_weights_none_explains_the_choices():
    with pytest.raises(ValueError, match="needs `weights`") as err:
        TransferClassifier(backbone="resnet18")
    message = str(err.value)
    assert "IMAGENET1K_V1" in message and "'random'" in message and ".pth" in message
    assert str(Path(torch.hub.get_dir()) / "checkpoints") in message


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        TransferClassifier(backbone="resnet19", weights="random")
    with pytest.raises(ValueError, match="vision transformer"):
        TransferClassifier(backbone="vit_b_16", weights="random")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        TransferClassifier(backbone="resnet18", weights="IMAGENET")


def test_local_state_dict_file_loads_lazily(tmp_path):
    source = torchvision.models.resnet18()  # the whole torchvision model: its fc keys are ignored
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = TransferClassifier(backbone="resnet18", weights=str(path))
    assert not model.base_weights_ready  # construction reads nothing
    assert not torch.equal(model.net.base.conv1.weight, source.conv1.weight)
    validate(tmp_path, model)
    for key, value in model.net.base.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    assert model.base_weights_ready
    # A state restored from a checkpoint is never overwritten by the configured weights.
    trained = TransferClassifier(backbone="resnet18", weights=str(path))
    trained.load_state_dict(model.state_dict())
    with torch.no_grad():
        trained.net.base.conv1.weight.add_(1.0)
    validate(tmp_path, trained)
    assert torch.equal(trained.net.base.conv1.weight, source.conv1.weight + 1.0)


def test_mismatched_file_names_the_keys(tmp_path):
    path = tmp_path / "mobilenet.pt"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    model = TransferClassifier(backbone="resnet18", weights=str(path))
    with pytest.raises(
        PretrainedWeightsError, match=r"missing keys \d+ \(conv1.weight, .*unexpected keys \d+ \(features"
    ):
        model.load_base_weights()
    with pytest.raises(FileNotFoundError, match="no such file"):
        TransferClassifier(backbone="resnet18", weights=str(tmp_path / "absent.pth")).load_base_weights()


def test_failed_download_names_the_cache_and_the_file_alternative():
    model = TransferClassifier(backbone="resnet18", weights="IMAGENET1K_V1")  # no download at construction
    with pytest.raises(PretrainedWeightsError) as err:
        model.prepare_data()
    message = str(err.value)
    cached = cached_weight_file(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    assert str(cached) in message and cached.name == "resnet18-f37072fd.pth"
    assert "URLError" in message and "--model.init_args.weights /path/to/resnet18-f37072fd.pth" in message


def test_torchvision_weights_come_from_the_torch_cache(tmp_path):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    source = torchvision.models.resnet18()
    cached = cached_weight_file(weights)
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)  # what a download would have left there
    model = TransferClassifier(backbone="resnet18", weights="ResNet18_Weights.IMAGENET1K_V1")
    validate(tmp_path, model)  # prepare_data finds the file (no download), setup loads it
    assert torch.equal(model.net.base.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    cached.write_bytes(b"cut short")
    with pytest.raises(PretrainedWeightsError, match="delete it to download it again"):
        TransferClassifier(backbone="resnet18", weights="DEFAULT").load_base_weights()


# ---- structure and shapes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "out"),
    [
        ({"task": "binary"}, 1),
        ({"num_classes": 10, "pool": "flatten", "resize": 64}, 10),
        ({"num_classes": 3, "input_shape": (1, 28, 28), "head_units": ()}, 3),
    ],
)
def test_output_shapes(kwargs, out):
    model = TransferClassifier(backbone="resnet18", weights="random", **kwargs).eval()
    x = torch.rand(4, *model.input_shape)
    assert model(x).shape == (4, out)
    expected_dim = 512 * 2 * 2 if kwargs.get("pool") == "flatten" else 512  # 64x64 -> 2x2 maps
    assert model.feature_dim == expected_dim


def test_blocks_and_truncation():
    model = TransferClassifier(backbone="resnet18", weights="random", truncate_after="layer2")
    assert model.block_names == ["stem", "layer1", "layer2"]
    assert model.feature_dim == 128 and not hasattr(model.net.base, "layer3")
    mobile = TransferClassifier(backbone="mobilenet_v3_small", weights="random", truncate_after="features.3")
    assert mobile.block_names == ["features.0", "features.1", "features.2", "features.3"]
    with pytest.raises(ValueError, match="Blocks: stem, layer1"):
        TransferClassifier(backbone="resnet18", weights="random", truncate_after="layer5")


def test_imagenet_normalisation_and_resize():
    model = TransferClassifier(backbone="resnet18", weights="random", resize=48)
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    resized = torch.nn.functional.interpolate((x - mean[:, None, None]) / std[:, None, None], size=(48, 48),
                                              mode="bilinear", align_corners=False)  # fmt: skip
    assert torch.allclose(model.net.inputs(x), resized, atol=1e-5)


# ---- the three modes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["feature_extraction", "frozen"])
def test_frozen_base_trains_only_the_head_with_the_base_in_eval_mode(mode, tmp_path):
    model = TransferClassifier(backbone="mobilenet_v3_small", weights="random", mode=mode, num_classes=10)
    assert model.configure_callbacks() == []
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("net.head.")}
    before = base_state(model)
    head_before = model.net.head[0].weight.clone()
    trainer(tmp_path, max_steps=2).fit(model, loader())
    assert not any(m.training for m in model.net.base.modules())
    after = model.net.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert not torch.equal(head_before, model.net.head[0].weight)


def test_extract_features_is_the_cheap_path_of_method_one(tmp_path):
    model = TransferClassifier(backbone="mobilenet_v3_small", weights="random", num_classes=10)
    data = loader(n=6, batch_size=3)
    features, targets = model.extract_features(data)
    assert features.shape == (6, model.feature_dim) and targets.shape == (6,)
    model.eval()
    images = torch.cat([x for x, _ in data])
    assert torch.allclose(model(images), model(features), atol=1e-5)
    trainer(tmp_path, max_steps=1).fit(model, DataLoader(TensorDataset(features, targets), batch_size=3))
    with pytest.raises(TypeError, match="transform"):
        model.extract_features([(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2))])


class Record(Callback):
    """Trainable parameters, optimiser groups and BatchNorm modes of the base at the end of every training epoch."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        groups = trainer.optimizers[0].param_groups
        modules = pl_module.net.base.named_modules()
        self.epochs.append(
            {
                "trainable": trainable(pl_module),
                "lrs": [g["lr"] for g in groups],
                "group_sizes": [len(g["params"]) for g in groups],
                "bn_training": {n for n, m in modules if isinstance(m, BATCH_NORM) and m.training},
            }
        )


def param_names(model: TransferClassifier, prefix: str, batch_norm: bool = False) -> set[str]:
    """Names of the parameters under ``prefix``, BatchNorm ones only with ``batch_norm``."""
    names = set()
    for module_name, module in model.named_modules():
        if module_name.startswith(prefix) and (batch_norm or not isinstance(module, BATCH_NORM)):
            names |= {f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)}
    return names


def finetune_model(**kwargs) -> TransferClassifier:
    """ResNet18 up to layer2: fine-tuning unfreezes layer2 from epoch 1 at 0.1 x the lr of Adam (default 1e-3)."""
    options = dict(backbone="resnet18", weights="random", truncate_after="layer2", mode="finetune", unfreeze_at_epoch=1,
                   unfreeze_blocks=1, finetune_lr_factor=0.1)  # fmt: skip
    return TransferClassifier(**{**options, **kwargs})


def test_finetune_unfreezes_the_last_block_with_a_lower_lr(tmp_path):
    model = finetune_model()
    assert isinstance(model.configure_callbacks()[0], TransferFinetuning)
    assert model.finetune_block_names == ["layer2"]
    before = base_state(model)
    record = Record()
    trainer(tmp_path, [record], max_epochs=2, limit_train_batches=2).fit(model, loader())
    head, layer2 = param_names(model, "net.head"), param_names(model, "net.base.layer2")
    assert len(layer2) == 5  # 4 convs + the downsample conv; the BatchNorm layers stay frozen without train_bn
    first, second = record.epochs
    assert first["trainable"] == head and first["lrs"] == [1e-3]
    assert second["trainable"] == head | layer2
    assert second["lrs"] == pytest.approx([1e-3, 1e-4]) and second["group_sizes"][1] == 5
    assert first["bn_training"] == set() == second["bn_training"]  # frozen and unfrozen BN: eval mode
    after = model.net.base.state_dict()
    assert not torch.equal(before["layer2.1.conv2.weight"], after["layer2.1.conv2.weight"])
    unchanged = [k for k in before if not ((k.startswith("layer2.") and "conv" in k) or "layer2.0.downsample.0" in k)]
    assert all(torch.equal(before[k], after[k]) for k in unchanged)  # other blocks, all BN weights and statistics


def test_finetune_with_train_bn_trains_the_block_batch_norm(tmp_path):
    model = finetune_model(unfreeze_at_epoch=0, train_bn=True)
    record = Record()
    trainer(tmp_path, [record], max_epochs=1, limit_train_batches=1).fit(model, loader())
    (epoch,) = record.epochs
    assert epoch["trainable"] == param_names(model, "net.head") | param_names(model, "net.base.layer2", True)
    assert epoch["bn_training"] and all(n.startswith("layer2.") for n in epoch["bn_training"])


class RecordFirstBatch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "seen"):
            groups = trainer.optimizers[0].param_groups
            self.seen = (trainer.current_epoch, batch_idx, trainable(pl_module), [len(g["params"]) for g in groups])


def test_finetune_resumes_after_the_unfreeze_epoch(tmp_path):
    """Checkpoints of the unfreeze epoch (at its end, in its middle) resume with the block trainable, in its group."""
    every_step = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer(tmp_path, [every_step], max_epochs=2, limit_train_batches=2, enable_checkpointing=True).fit(
        finetune_model(), loader()
    )
    for step, epoch, batch in [(4, 2, 0), (3, 1, 1)]:  # after the unfreeze epoch, in its middle
        model, record = finetune_model(), RecordFirstBatch()
        resumed = trainer(tmp_path, [record], max_epochs=3, limit_train_batches=2)
        resumed.fit(model, loader(), ckpt_path=tmp_path / f"step={step}.ckpt", weights_only=False)  # hparams: Adam
        expected = param_names(model, "net.head") | param_names(model, "net.base.layer2")
        assert record.seen == (epoch, batch, expected, [4, 5])


def test_scheduler_follows_the_new_param_group():
    model = finetune_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
    added = model.start_finetuning(optimizer, [lambda_lr, plateau])
    assert len(added) == 5 and model.start_finetuning(optimizer) == []  # idempotent
    optimizer.step()
    lambda_lr.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.005])
    assert lambda_lr.get_last_lr() == pytest.approx([0.05, 0.005])
    plateau.step(1.0)
    plateau.step(2.0)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.005, 0.0005])


# ---- configs ------------------------------------------------------------------------------------------------------


def test_configs_instantiate_without_downloading(tmp_path, monkeypatch):
    """The configs name IMAGENET1K_V1: instantiating reads and downloads nothing (prepare_data/setup do)."""
    monkeypatch.chdir(tmp_path)
    model = main(["-c", str(CONFIGS[0])], run=False).model
    assert model.hparams.weights == "IMAGENET1K_V1" and not model.base_weights_ready
    assert model.hparams.mode == "feature_extraction"
    assert model.block_names == ["block1", "block2", "block3", "block4", "block5"]  # Keras' VGG16 block names
    assert model.feature_map_shape == (512, 4, 4)  # resize 128, like the book's 150x150 inputs
    assert trainable(model) == param_names(model, "net.head")


def test_finetune_config_with_random_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = main(["-c", str(CONFIGS[1]), "--model.init_args.weights", "random"], run=False).model
    assert model.base_weights_ready and model.hparams.mode == "finetune"
    assert model.finetune_block_names == ["block5"]  # the book fine-tunes VGG16's block5
    assert model.blocks["block5"] == [f"features.{i}" for i in range(24, 31)]
    conv = model.net.base.features[28]  # built without VGG's dense classifier, initialised as torchvision does
    assert conv.weight.std().item() == pytest.approx((2 / (512 * 3 * 3)) ** 0.5, rel=0.02)
    assert not conv.bias.any()
    assert trainable(model) == param_names(model, "net.head")


# ---- DDP ----------------------------------------------------------------------------------------------------------


class AssertSameWeights(Callback):
    def on_train_end(self, trainer, pl_module):
        weight = pl_module.net.base.layer2[1].conv2.weight.detach()
        gathered = trainer.strategy.all_gather(weight)
        assert torch.equal(gathered[0], gathered[1]), "ranks disagree on the unfrozen block's weights"


def test_gradient_averaging_puts_each_mean_back_into_its_own_tensor(tmp_path):
    """One process stands for ``world_size`` identical ones: the mean is the tensor itself; / 4 shows each slice's
    way back (shapes, non-contiguous tensors, two dtypes in one call)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        grads = [torch.randn(3, 4, generator=g).t(), torch.randn(5, generator=g, dtype=torch.float64), torch.ones(2, 2)]
        before = [t.clone() for t in grads]
        average_across_processes_(grads, world_size=1)
        assert all(torch.equal(t, b) for t, b in zip(grads, before, strict=True))
        average_across_processes_(grads, world_size=4)
        assert all(t.dtype == b.dtype and torch.allclose(t, b / 4) for t, b in zip(grads, before, strict=True))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_blocks_unfrozen_under_ddp_stay_in_sync(tmp_path, monkeypatch):
    """DDP's reducer ignores parameters frozen when it wrapped the model: the module averages their gradients."""
    from lightning_fabric.plugins.environments.lightning import find_free_network_port

    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))
    model = finetune_model(unfreeze_at_epoch=0)
    run = trainer(tmp_path, [AssertSameWeights()], max_epochs=1, limit_train_batches=2, strategy="ddp_spawn",
                  devices=2)  # fmt: skip
    run.fit(model, loader(n=16))  # each rank trains on its own half of the data
