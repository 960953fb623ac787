"""Convnet visualisation: Grad-CAM finds the evidence for a class where it is, filter patterns raise their
filter's activation, neither leaves a trace on the model, the callbacks write PNGs during a real fit, and
scripts/visualize.py turns a CLI checkpoint and an image file into pictures (or a clear error)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from PIL import Image
from torch import nn
from train import main as train_main
from visualize import main as visualize_main
from visualize import normalization

from callbacks.activations import ActivationMaps
from callbacks.filters import FilterPatterns, filter_patterns, pattern_grid
from callbacks.gradcam import GradCAM, activated, grad_cam, last_conv, overlay_figure
from callbacks.images import to_rgb_array
from datamodules import DigitsDataModule
from datamodules.digits import digits_as_mnist
from lightning_modules import CNNClassifier
from lightning_modules.checkpoints import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


# ---- a hand-built detector network: solid blobs are class 1, checkerboards class 0 ------------------------------
def detector_net(binary: bool = False) -> nn.Sequential:
    """Conv channel 0 fires on solid bright areas only, channel 1 on checkerboard texture only; after a ReLU and
    global average pooling the head reads class 1 from channel 0 and class 0 from channel 1 (binary: one logit
    ``z = mean(ch0) - mean(ch1)``, positive for class 1)."""
    conv = nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1 / 9  # local mean: 1 on a solid area, at most 5/9 on a checkerboard
        conv.bias[0] = -0.6
        conv.weight[1, 0, 1, 1] = 1.0  # centre minus mean of the 4 neighbours: 1 on a checkerboard, 0 on solid
        for i, j in ((0, 1), (1, 0), (1, 2), (2, 1)):
            conv.weight[1, 0, i, j] = -0.25
        conv.bias[1] = -0.5
    head = nn.Linear(2, 1 if binary else 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -1.0]]) if binary else torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def two_patterns(flip: bool = False) -> torch.Tensor:
    """16x16: a solid square in the top-left quadrant and a checkerboard in the bottom-right (or swapped)."""
    image = torch.zeros(1, 16, 16)
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    solid, checker = (slice(2, 6), slice(2, 6)), (slice(9, 15), slice(9, 15))
    if flip:
        solid, checker = (slice(10, 14), slice(10, 14)), (slice(1, 7), slice(1, 7))
    image[0, solid[0], solid[1]] = 1.0
    image[0, checker[0], checker[1]] = ((rows + cols) % 2).float()
    return image


def peak_quadrant(heatmap: torch.Tensor) -> str:
    row, col = divmod(int(heatmap.flatten().argmax()), heatmap.shape[-1])
    half = heatmap.shape[-1] // 2
    return ("top" if row < half else "bottom") + "-" + ("left" if col < half else "right")


def test_grad_cam_peaks_where_the_class_evidence_is():
    model = detector_net()
    images = torch.stack([two_patterns(), two_patterns(flip=True)])
    for target, quadrants in ((1, ["top-left", "bottom-right"]), (0, ["bottom-right", "top-left"])):
        heatmaps = grad_cam(model, images, "1", target)  # "1": the ReLU, i.e. the conv's feature maps
        assert heatmaps.shape == (2, 16, 16)
        assert heatmaps.min() >= 0 and torch.allclose(heatmaps.amax(dim=(1, 2)), torch.ones(2))
        assert [peak_quadrant(h) for h in heatmaps] == quadrants
    # A class per image; None explains the predicted class (the checkerboard scores higher here: class 0).
    mixed = grad_cam(model, images, "1", [1, 0])
    assert [peak_quadrant(h) for h in mixed] == ["top-left", "top-left"]
    assert model(images).argmax(dim=1).tolist() == [0, 0]
    assert torch.equal(grad_cam(model, images, model[1]), grad_cam(model, images, "1", 0))


def test_grad_cam_binary_head():
    model = detector_net(binary=True)
    image = two_patterns()[None]
    assert peak_quadrant(grad_cam(model, image, "1", 1)[0]) == "top-left"  # score z
    assert peak_quadrant(grad_cam(model, image, "1", 0)[0]) == "bottom-right"  # score -z
    assert model(image).item() < 0  # predicted class 0
    assert torch.equal(grad_cam(model, image, "1"), grad_cam(model, image, "1", 0))
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(model, image, "1", 2)


def test_grad_cam_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = CNNClassifier(filters=(4, 4))
    model.net[2].eval()  # a module in eval mode on purpose stays so
    frozen = model.net[0][0].bias
    frozen.requires_grad_(False)
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.5)
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in model.named_parameters()}
    images = torch.rand(3, 1, 28, 28)
    layer = activated(model, last_conv(model))
    assert layer == "net.0.4"

    heatmaps = grad_cam(model, images, layer)
    with torch.inference_mode():  # a callback may run under inference mode, with an inference-tensor input
        inference_images = images.clone()
        assert inference_images.is_inference()
        inference_heatmaps = grad_cam(model, inference_images, layer)
    assert not inference_heatmaps.is_inference() and torch.allclose(inference_heatmaps, heatmaps)
    with torch.no_grad():
        assert torch.allclose(grad_cam(model, images, layer), heatmaps)

    for name, param in model.named_parameters():
        assert torch.equal(param, before[name][0]) and torch.equal(param.grad, before[name][1]), name
    assert not frozen.requires_grad and all(p.requires_grad for p in model.parameters() if p is not frozen)
    assert model.training and model.net.training and not model.net[2].training
    assert no_hooks(model)


def test_grad_cam_removes_its_hook_when_the_forward_fails():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), Boom())
    with pytest.raises(RuntimeError, match="boom"):
        grad_cam(model, torch.rand(1, 1, 8, 8), "0")
    assert no_hooks(model) and model.training and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"no module 'nope'.*'0'"):
        grad_cam(model, torch.rand(1, 1, 8, 8), "nope")


def test_activated_follows_batch_norm_and_activation():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3)),
        nn.Flatten(),
    )
    assert activated(model, "0.0") == "0.2"
    assert activated(model, "0.4") == "0.4"  # nothing pointwise follows it
    assert last_conv(model) == "0.4"
    with pytest.raises(ValueError, match=r"no nn\.Conv2d"):
        last_conv(nn.Linear(2, 2))


# ---- filter patterns ----------------------------------------------------------------------------------------
def channel_means(model: nn.Module, layer: str, x: torch.Tensor, channels: list[int]) -> torch.Tensor:
    out = ActivationMaps().feature_maps(model, x, [layer])[layer]
    return out[torch.arange(len(channels)), channels].mean(dim=(1, 2))


def test_filter_patterns_raise_their_filter_activation():
    torch.manual_seed(0)
    model = CNNClassifier(filters=(4, 4))
    channels = [0, 1, 2, 3]
    rng_state = torch.get_rng_state()
    for layer in ("net.0.0", "net.0.3"):
        start = filter_patterns(model, layer, channels, (1, 28, 28), steps=0)  # deprocessed gray + noise
        patterns = filter_patterns(model, layer, channels, (1, 28, 28), steps=20)
        assert patterns.shape == (4, 1, 28, 28) and patterns.min() >= 0 and patterns.max() <= 1
        assert (channel_means(model, layer, patterns, channels) > channel_means(model, layer, start, channels)).all()
    assert torch.equal(torch.get_rng_state(), rng_state)  # a local generator: training's random state untouched
    again = filter_patterns(model, "net.0.3", channels, (1, 28, 28), steps=20)
    assert torch.equal(again, patterns)
    assert pattern_grid(patterns, min_size=56).shape == (3, 2 * 56 + 3 * 2, 2 * 56 + 3 * 2)


def test_filter_patterns_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = CNNClassifier(filters=(4, 4))
    model.net[0][0].weight.grad = torch.ones_like(model.net[0][0].weight)  # others have no .grad
    frozen = model.net[3].bias
    frozen.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.inference_mode():
        patterns = filter_patterns(model, "net.0.4", [1, 3], (1, 28, 28), steps=5)
    assert patterns.shape == (2, 1, 28, 28) and not patterns.is_inference()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None if name != "net.0.0.weight" else torch.equal(param.grad, torch.ones_like(param))
    assert not frozen.requires_grad and all(p.requires_grad for p in model.parameters() if p is not frozen)
    assert model.training and no_hooks(model)
    with pytest.raises(ValueError, match="4 filters"):
        filter_patterns(model, "net.0.4", [4], (1, 28, 28), steps=2)
    assert model.training and no_hooks(model)


# ---- the callbacks in a real fit ----------------------------------------------------------------------------
def test_callbacks_write_pngs_during_fit(tmp_path):
    model = CNNClassifier(filters=(4, 4))
    gradcam = GradCAM(num_images=2)
    at_end = FilterPatterns(num_filters=3, steps=5)
    every = FilterPatterns(num_filters=2, steps=5, every_n_epochs=1, filename_prefix="filters_every")
    trainer = quiet_trainer(
        tmp_path,
        devices=1,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[gradcam, at_end, every],
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))

    assert gradcam._layer == "net.0.4" and gradcam._sample.shape == (2, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / "gradcam").iterdir()) == ["epoch000.png", "epoch001.png"]
    assert sorted(p.name for p in (tmp_path / "filters").iterdir()) == ["net.0.1_epoch001.png", "net.0.4_epoch001.png"]
    assert sorted(p.name for p in (tmp_path / "filters_every").iterdir()) == [
        f"{layer}_epoch{epoch:03d}.png" for layer in ("net.0.1", "net.0.4") for epoch in (0, 1)
    ]  # the end of training does not draw the last epoch twice
    for path in tmp_path.rglob("*.png"):
        assert_png(path)
    assert model.training and no_hooks(model) and all(p.requires_grad for p in model.parameters())

    # Called under inference mode (as hooks of evaluation loops are), the callback still gets its gradients.
    with torch.inference_mode():
        gradcam.on_train_epoch_end(trainer, model)
    assert_png(tmp_path / "gradcam" / f"epoch{trainer.current_epoch:03d}.png")


def test_overlay_figure_of_rgb_images():
    figure = overlay_figure(torch.randn(3, 3, 8, 8), torch.rand(3, 8, 8), ["a", "b", "c"])
    assert len(figure.axes) == 6 and [ax.get_title() for ax in figure.axes[:3]] == ["a", "b", "c"]
    assert to_rgb_array(figure).shape[2] == 3


# ---- scripts/visualize.py -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the book CNN (4 and 4 filters) on the offline digits, made through the CLI."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(tmp_path_factory.mktemp("cli"))  # runs/ lands there
        return _fit_through_cli()


def _fit_through_cli() -> Path:
    cli = train_main(
        [
            "fit",
            "-c",
            str(ROOT / "configs/mnist/cnn.yaml"),
            "--data",
            "datamodules.DigitsDataModule",
            "--data.init_args.val_size",
            "0.1",
            "--model.init_args.filters",
            "[4, 4]",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ]
    )
    return Path(cli.trainer.checkpoint_callback.best_model_path).resolve()


def test_visualize_end_to_end(cnn_checkpoint, tmp_path, capsys):
    checkpoint = read_checkpoint(cnn_checkpoint)
    mean, std = normalization(checkpoint)  # DigitsDataModule's statistics, stored under its class name
    assert "DigitsDataModule" in checkpoint and mean.tolist() == [0.0] and std.tolist() == [255.0]

    digit = digits_as_mnist()[0][0, 0].numpy()
    Image.fromarray(digit).resize((56, 56)).convert("RGB").save(tmp_path / "digit.png")  # RGB, 56x56: converted
    out = tmp_path / "vis"
    written = visualize_main(["--ckpt", str(cnn_checkpoint), "--image", str(tmp_path / "digit.png"), "--out", str(out)])
    expected = [
        "activations/net.0.0.png",
        "activations/net.0.3.png",
        "filters/net.0.1.png",
        "filters/net.0.4.png",
        "gradcam.png",
    ]
    assert sorted(str(p.relative_to(out)) for p in written) == expected
    for name in expected:
        assert_png(out / name)
    printed = capsys.readouterr().out
    assert "Predicted class: " in printed and printed.count(": 0.") + printed.count(": 1.") >= 10

    shutil.rmtree(out)
    options = ["--layers", "net.0.3", "--filters", "2", "--class-index", "7"]
    visualize_main(["--ckpt", str(cnn_checkpoint), "--image", str(tmp_path / "digit.png"), "--out", str(out), *options])
    assert sorted(p.name for p in (out / "filters").iterdir()) == ["net.0.3.png"]
    assert "Grad-CAM explains class 7" in capsys.readouterr().out
    assert_png(out / "gradcam.png")


def test_visualize_errors_are_explained(cnn_checkpoint, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    image = tmp_path / "digit.png"
    Image.fromarray(digits_as_mnist()[0][0, 0].numpy()).save(image)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(cnn_checkpoint.read_bytes()[:2000])
    cases = [
        (["--ckpt", str(cnn_checkpoint), "--image", str(tmp_path / "broken.png")], r"broken\.png cannot be read"),
        (["--ckpt", str(cnn_checkpoint), "--image", str(tmp_path / "missing.png")], r"missing\.png cannot be read"),
        (["--ckpt", str(tmp_path / "none.ckpt"), "--image", str(image)], r"none\.ckpt does not exist"),
        (["--ckpt", str(truncated), "--image", str(image)], r"damaged or incomplete.*--ckpt "),
        (["--ckpt", str(cnn_checkpoint), "--image", str(image), "--class-index", "10"], "out of range"),
        (["--ckpt", str(cnn_checkpoint), "--image", str(image), "--layers", "net.nope"], r"no module 'net\.nope'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            visualize_main([*argv, "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


# ---- DDP ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_callbacks_under_ddp(tmp_path, monkeypatch):
    """Two CPU processes (gloo): both compute (no hang), rank zero alone writes one set of files."""
    from lightning_fabric.plugins.environments.lightning import find_free_network_port

    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))
    trainer = quiet_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[GradCAM(num_images=2), FilterPatterns(num_filters=2, steps=3, every_n_epochs=1)],
    )
    trainer.fit(CNNClassifier(filters=(4,)), datamodule=DigitsDataModule(batch_size=32))
    assert sorted(p.name for p in (tmp_path / "gradcam").iterdir()) == ["epoch000.png", "epoch001.png"]
    assert sorted(p.name for p in (tmp_path / "filters").iterdir()) == ["net.0.1_epoch000.png", "net.0.1_epoch001.png"]
