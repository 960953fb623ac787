"""The book's CIFAR-10 ResNet v1/v2 and DenseNet-BC: shapes, parameter counts, Keras details, the L2 penalty."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.densenet import DenseNetClassifier
from lightning_modules.layers import TRUNCATED_NORMAL_STD, Conv2dSame, he_normal_
from lightning_modules.resnet import ResNetClassifier, ResNetLayer, create_resnet


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bn_channels(module: nn.Module) -> int:
    return sum(m.num_features for m in module.modules() if isinstance(m, nn.BatchNorm2d))


def conv(k: int, c_in: int, c_out: int) -> int:
    return k * k * c_in * c_out + c_out  # Keras Conv2D has a bias by default


def bn(c: int) -> int:
    return 2 * c  # trainable gamma, beta (moving mean/var are Keras non-trainable params, PyTorch buffers)


def resnet20_v1_params() -> int:
    """The book's resnet_v1(depth=20) counted by hand, layer by layer."""
    stem = conv(3, 3, 16) + bn(16)
    stage1 = 3 * 2 * (conv(3, 16, 16) + bn(16))
    stage2 = conv(3, 16, 32) + bn(32) + conv(3, 32, 32) + bn(32) + conv(1, 16, 32) + 4 * (conv(3, 32, 32) + bn(32))
    stage3 = conv(3, 32, 64) + bn(64) + conv(3, 64, 64) + bn(64) + conv(1, 32, 64) + 4 * (conv(3, 64, 64) + bn(64))
    return stem + stage1 + stage2 + stage3 + 64 * 10 + 10


def book_densenet_params(k: int = 12, layers: int = 16, blocks: int = 3, compression: float = 0.5) -> int:
    """The book's densenet-cifar10-2.4.1.py loop, counting trainable params instead of building layers."""
    channels, total = 3 + 2 * k, bn(3) + conv(3, 3, 2 * k)
    num_filters_bef_dense_block = 2 * k
    for i in range(blocks):
        for _ in range(layers):
            total += bn(channels) + conv(1, channels, 4 * k) + bn(4 * k) + conv(3, 4 * k, k)
            channels += k
        if i == blocks - 1:
            continue
        num_filters_bef_dense_block += layers * k
        num_filters_bef_dense_block = int(num_filters_bef_dense_block * compression)
        total += bn(channels) + conv(1, channels, num_filters_bef_dense_block)
        channels = num_filters_bef_dense_block
    return total + channels * 10 + 10


# ---- shapes and parameter counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "trainable", "keras_total"),
    [
        (dict(version=1, depth=20), 273_066, 274_442),  # Keras summary of ResNet20v1: 274,442 total, 0.27 M
        (dict(version=2, depth=56), 1_663_338, 1_673_738),  # ResNet56v2: ~1.67 M in Keras
    ],
)
def test_resnet_shapes_and_param_counts(kwargs, trainable, keras_total):
    model = ResNetClassifier(**kwargs)
    assert model.input_shape == (3, 32, 32)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert n_params(model) == trainable
    assert n_params(model) + 2 * bn_channels(model) == keras_total  # + BN moving mean/var, as Keras counts


def test_resnet20_v1_matches_the_hand_count():
    model = ResNetClassifier()
    assert n_params(model) == resnet20_v1_params() == 273_066
    assert round(n_params(model) / 1e6, 2) == 0.27


def test_densenet_shape_and_param_count():
    model = DenseNetClassifier()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert n_params(model) == book_densenet_params() == 774_376
    assert model.net.fc.in_features == 342


def test_factories_by_name():
    assert create_resnet("ResNet56v2").name == "ResNet56v2"
    assert create_resnet("resnet110").blocks_per_stage == 18
    with pytest.raises(ValueError, match="resnet20"):
        create_resnet("resnet18")


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (ResNetClassifier, dict(version=1, depth=21), "6n\\+2"),
        (ResNetClassifier, dict(version=1, depth=2), "6n\\+2"),
        (ResNetClassifier, dict(version=2, depth=32), "9n\\+2"),
        (ResNetClassifier, dict(version=3), "version"),
        (ResNetClassifier, dict(l2=-1.0), "l2"),
        (ResNetClassifier, dict(input_shape=(3, 16, 16)), "8x8 average pooling"),
        (DenseNetClassifier, dict(depth=99), "6m\\+4"),
        (DenseNetClassifier, dict(depth=4), "6m\\+4"),
        (DenseNetClassifier, dict(compression=0.0), "compression"),
    ],
)
def test_invalid_configurations_are_rejected(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# ---- ResNet structure --------------------------------------------------------------------------------------------


def test_resnet_v1_structure():
    net = ResNetClassifier(version=1, depth=20).net
    assert isinstance(net.head_act, nn.Identity)  # v1: no BN after the last addition
    assert list(dict(net.stem.named_children())) == ["conv", "bn", "act"]  # Conv-BN-ReLU
    for stage, channels in zip(net.stages, (16, 32, 64), strict=True):
        assert len(stage) == 3
        for i, block in enumerate(stage):
            assert list(dict(block.layer2.named_children())) == ["conv", "bn"]  # no ReLU before the addition
            assert block.layer2.conv.out_channels == channels
            if i == 0 and channels > 16:
                assert block.layer1.conv.stride == (2, 2) and block.layer1.conv.dynamic_padding
                assert list(dict(block.shortcut.named_children())) == ["conv"]  # 1x1 projection, no BN
                assert block.shortcut.conv.kernel_size == (1, 1) and block.shortcut.conv.stride == (2, 2)
            else:
                assert block.layer1.conv.stride == (1, 1)
                assert isinstance(block.shortcut, nn.Identity)
    block = net.stages[1][0].eval()
    assert (block(torch.randn(2, 16, 32, 32)) >= 0).all()  # ReLU after the addition


def test_resnet_v2_structure():
    net = ResNetClassifier(version=2, depth=29).net  # n = 3
    assert list(dict(net.stem.named_children())) == ["conv", "bn", "act"]
    first = net.stages[0][0]
    assert list(dict(first.layer1.named_children())) == ["conv"]  # follows the stem's BN-ReLU directly
    widths = [(16, 16, 64), (64, 64, 128), (128, 128, 256)]  # (block input, bottleneck, output)
    for s, (stage, (c_in, mid, c_out)) in enumerate(zip(net.stages, widths, strict=True)):
        for i, block in enumerate(stage):
            if not (s == 0 and i == 0):
                assert list(dict(block.layer1.named_children())) == ["bn", "act", "conv"]  # pre-activation
                assert block.layer1.bn.num_features == block.layer1.conv.in_channels
            for layer in (block.layer2, block.layer3):
                assert list(dict(layer.named_children())) == ["bn", "act", "conv"]
            assert block.layer1.conv.kernel_size == (1, 1) and block.layer3.conv.kernel_size == (1, 1)
            assert block.layer2.conv.kernel_size == (3, 3) and block.layer2.conv.stride == (1, 1)
            assert block.layer1.conv.in_channels == (c_in if i == 0 else c_out)
            assert block.layer1.conv.out_channels == block.layer2.conv.out_channels == mid
            assert block.layer3.conv.out_channels == c_out
            stride = 2 if s > 0 and i == 0 else 1
            assert block.layer1.conv.stride == (stride, stride)
            if i == 0:  # every stage's first block: 1x1 projection with the block's stride, no BN
                assert isinstance(block.shortcut, ResNetLayer)
                assert list(dict(block.shortcut.named_children())) == ["conv"]
                assert block.shortcut.conv.stride == (stride, stride)
                assert (block.shortcut.conv.in_channels, block.shortcut.conv.out_channels) == (c_in, c_out)
            else:
                assert isinstance(block.shortcut, nn.Identity)
    assert list(dict(net.head_act.named_children())) == ["0", "1"]
    assert isinstance(net.head_act[0], nn.BatchNorm2d) and isinstance(net.head_act[1], nn.ReLU)
    assert net.fc.in_features == 256


def batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_batch_norm_is_pytorchs_unless_keras_is_asked_for():
    for cls, kwargs in ((ResNetClassifier, dict(version=2, depth=11)), (DenseNetClassifier, dict(depth=10))):
        assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in batch_norms(cls(**kwargs)))
        keras = batch_norms(cls(batch_norm="keras", **kwargs))
        assert keras and all(m.momentum == 0.01 and m.eps == 1e-3 for m in keras)  # Keras' momentum 0.99
    with pytest.raises(ValueError, match="batch_norm='tf'"):
        ResNetClassifier(depth=8, batch_norm="tf")


def test_checkpoint_from_before_the_batch_norm_option_predicts_as_it_did(tmp_path):
    """Such checkpoints were trained with Keras' BatchNorm (then the only one); eps 1e-3 vs 1e-5 changes outputs."""
    import pytorch_lightning as pl

    torch.manual_seed(0)
    trained = ResNetClassifier(depth=8, batch_norm="keras").eval()
    with torch.no_grad():
        for m in batch_norms(trained):
            m.running_var.uniform_(0.0, 0.01)  # small variances: where eps matters
    hparams = {k: v for k, v in trained.hparams.items() if k != "batch_norm"}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": pl.__version__}, path)  # fmt: skip
    restored = ResNetClassifier.load_from_checkpoint(path, weights_only=False).eval()
    x = torch.rand(2, 3, 32, 32)
    assert restored.hparams.batch_norm == "keras"
    assert torch.allclose(restored(x), trained(x), atol=1e-6)
    new = torch.load(path, weights_only=False)
    new["hyper_parameters"]["batch_norm"] = "torch"  # a checkpoint that states its choice keeps it
    torch.save(new, path)
    assert all(m.eps == 1e-5 for m in batch_norms(ResNetClassifier.load_from_checkpoint(path, weights_only=False)))


# ---- Keras 'same' padding and he_normal ---------------------------------------------------------------------------


def test_stride_2_same_padding_is_bottom_right():
    conv3 = Conv2dSame(1, 1, 3, stride=2, bias=False)
    nn.init.ones_(conv3.weight)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    # Keras pads one row at the bottom and one column at the right: windows start at rows/cols 0 and 2.
    expected = torch.tensor([[0 + 1 + 2 + 4 + 5 + 6 + 8 + 9 + 10, 2 + 3 + 6 + 7 + 10 + 11], [66, 10 + 11 + 14 + 15]])
    assert torch.equal(conv3(x)[0, 0], expected.float())
    symmetric = nn.functional.conv2d(x, conv3.weight, stride=2, padding=1)  # PyTorch's padding=1 differs
    assert not torch.equal(symmetric, conv3(x))
    # Odd sizes: TF pads evenly when the total is even (5 -> 3 outputs, one pixel each side).
    x5 = torch.randn(1, 1, 5, 5)
    assert torch.allclose(conv3(x5), nn.functional.conv2d(x5, conv3.weight, stride=2, padding=1))
    # 1x1 stride 2 on an even map: no padding at all, samples rows/cols 0, 2, ...
    conv1 = Conv2dSame(1, 1, 1, stride=2, bias=False)
    nn.init.ones_(conv1.weight)
    assert torch.equal(conv1(x)[0, 0], x[0, 0, ::2, ::2])


def test_resnet_feature_map_sizes():
    net = ResNetClassifier().net
    sizes = []
    for stage in net.stages:
        stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
    net(torch.rand(2, 3, 32, 32))
    assert sizes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_he_normal_statistics():
    torch.manual_seed(0)
    for shape, fan_in in (((512, 64, 3, 3), 576), ((1000, 400), 400)):
        w = he_normal_(torch.empty(shape))
        target = math.sqrt(2 / fan_in)
        assert w.std().item() == pytest.approx(target, rel=0.02)  # std after truncation = sqrt(2 / fan_in)
        assert abs(w.mean().item()) < 0.02 * target
        limit = 2 * target / TRUNCATED_NORMAL_STD  # truncated at 2 std of the untruncated normal
        assert w.abs().max().item() <= limit and w.abs().max().item() > 0.97 * limit


@pytest.mark.parametrize("cls", [ResNetClassifier, DenseNetClassifier])
def test_book_init_is_he_normal_with_zero_biases(cls):
    torch.manual_seed(0)
    model = cls(init="keras", **({"depth": 8} if cls is ResNetClassifier else {"depth": 10}))
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            fan_in = m.weight[0].numel()
            assert m.weight.abs().max() <= 2 * math.sqrt(2 / fan_in) / TRUNCATED_NORMAL_STD
    torch_init = cls(**({"depth": 8} if cls is ResNetClassifier else {"depth": 10}))
    assert torch.count_nonzero(torch_init.net.fc.bias) > 0  # the default: PyTorch's own init kept


# ---- L2 penalty --------------------------------------------------------------------------------------------------


def test_l2_penalty_is_the_conv_kernels_only_and_added_to_the_training_loss():
    torch.manual_seed(0)
    model = ResNetClassifier(depth=8)  # v1, n = 1: stem + 2 per block x 3 + 2 projections = 9 convs
    plain = ResNetClassifier(depth=8, l2=0.0)
    plain.load_state_dict(model.state_dict())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9
    expected = 1e-4 * sum(m.weight.square().sum() for m in convs)
    assert torch.allclose(model.regularization_loss(), expected)
    assert plain.regularization_loss() == 0
    with torch.no_grad():  # biases, BN and the Dense head carry no penalty
        model.net.fc.weight.fill_(100.0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(100.0)
            if isinstance(m, nn.Conv2d):
                m.bias.fill_(100.0)
        plain.load_state_dict(model.state_dict())
    assert torch.allclose(model.regularization_loss(), expected)

    batch = (torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = model.training_step(batch, 0)
        data_loss = plain.training_step(batch, 0)
    assert torch.allclose(loss - data_loss, expected, rtol=1e-4)  # added exactly once
    model.zero_grad()
    model.regularization_loss().backward()
    stem = model.net.stem.conv
    assert torch.allclose(stem.weight.grad, 2e-4 * stem.weight)
    assert stem.bias.grad is None or torch.count_nonzero(stem.bias.grad) == 0


# ---- DenseNet ----------------------------------------------------------------------------------------------------


def test_densenet_channel_flow():
    model = DenseNetClassifier().eval()
    net = model.net
    assert net.num_layers == 16
    assert net.channel_flow() == [27, 219, 108, 300, 150, 342]
    assert list(dict(net.features.named_children())) == [
        "stem",
        "denseblock1",
        "transition1",
        "denseblock2",
        "transition2",
        "denseblock3",
    ]
    seen = []
    for child in net.features:
        child.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
    x = torch.rand(2, 3, 32, 32)
    net.features.stem.register_forward_hook(lambda m, i, o: seen.append(torch.equal(o[:, :3], i[0])))
    model(x)
    stem_keeps_image = seen.pop(1)
    assert stem_keeps_image  # concat([image, conv features])
    assert seen == [(27, 32, 32), (219, 32, 32), (108, 16, 16), (300, 16, 16), (150, 8, 8), (342, 8, 8)]


def test_densenet_layers():
    net = DenseNetClassifier().net
    layer = net.features.denseblock1[0]
    first, second = layer.layers
    assert list(dict(first.named_children())) == ["bn", "act", "conv"] and first.conv.out_channels == 48
    assert first.conv.kernel_size == (1, 1) and second.conv.kernel_size == (3, 3) and second.conv.out_channels == 12
    x = torch.randn(2, 27, 8, 8)
    assert torch.equal(layer.eval()(x)[:, :27], x)  # output concatenated onto the input
    transition = net.features.transition1
    assert list(dict(transition.named_children())) == ["bn", "conv", "pool"]  # no ReLU
    assert transition.conv.in_channels == 219 and transition.conv.out_channels == 108
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    dropout = DenseNetClassifier(depth=10, dropout=0.2).net  # 1 layer per block: 2 + 2 + 2 + 2 transitions
    assert sum(isinstance(m, nn.Dropout) for m in dropout.modules()) == 8
    plain = DenseNetClassifier(depth=16, bottleneck=False).net  # (16 - 4) / 3 = 4 single-conv layers per block
    assert plain.num_layers == 4 and len(plain.features.denseblock1[0].layers) == 1


# ---- training ----------------------------------------------------------------------------------------------------


def test_resnet_trains_and_reloads(tmp_path):
    pl.seed_everything(0)
    data = TensorDataset(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    model = ResNetClassifier(version=2, depth=11)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert math.isfinite(trainer.callback_metrics["train/loss"])
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = ResNetClassifier.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=False)
    assert (restored.hparams.version, restored.hparams.depth, restored.input_shape) == (2, 11, (3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(restored.eval()(x), model.eval()(x))
