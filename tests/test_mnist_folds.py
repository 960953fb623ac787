"""scripts/mnist_folds.py: K folds of a small labelled set, every image tested once, each fold one CLI fit."""

from __future__ import annotations

import numpy as np
import pytest
from mnist_folds import main, pooled, write_folds

from datamodules.base import CorruptDataError, DataNotFoundError
from datamodules.mnist import MNIST_FILES, read_idx_ubyte
from datamodules.synthetic import fake_digits, write_idx


def numbered_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Image i is filled with the value i, its label is i % 10: a fold's files show which images they hold."""
    return np.arange(n, dtype=np.uint8)[:, None, None].repeat(28, 1).repeat(28, 2), np.arange(n, dtype=np.uint8) % 10


def read_fold(folder, split):
    images, labels = MNIST_FILES[split]
    raw = folder / "MNIST" / "raw"
    return read_idx_ubyte(raw / images, 3).numpy(), read_idx_ubyte(raw / labels, 1).numpy()


def test_every_image_is_tested_once_and_the_others_train_in_order(tmp_path):
    x, y = numbered_digits(23)
    stale = tmp_path / "fold0" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older copy")
    dirs = write_folds(x, y, tmp_path, folds=4)
    assert [d.name for d in dirs] == ["fold0", "fold1", "fold2", "fold3"]
    assert not stale.exists() and not list(tmp_path.rglob("*.part"))
    tested = []
    for folder in dirs:
        test_x, test_y = read_fold(folder, "test")
        train_x, train_y = read_fold(folder, "train")
        test_ids, train_ids = test_x[:, 0, 0].tolist(), train_x[:, 0, 0].tolist()
        assert (test_y == test_x[:, 0, 0] % 10).all() and (train_y == train_x[:, 0, 0] % 10).all()
        assert train_ids == sorted(set(range(23)) - set(test_ids))  # every other image, in order
        tested += test_ids
    assert tested == list(range(23))  # consecutive blocks, each image once
    assert [len(read_fold(d, "test")[1]) for d in dirs] == [6, 6, 6, 5]


def test_bad_input_is_explained(tmp_path):
    x, y = numbered_digits(10)
    for folds in (1, 11):
        with pytest.raises(ValueError, match=f"--folds {folds}: choose between 2 and the number of images"):
            write_folds(x, y, tmp_path, folds)
    images, labels = write_idx(tmp_path / "images", x), write_idx(tmp_path / "labels", y[:9])
    with pytest.raises(CorruptDataError, match=r"holds 10 images but .* holds 9 labels"):
        main(["--images", str(images), "--labels", str(labels), "--data_only"])
    with pytest.raises(DataNotFoundError, match=r"--labels .*missing: no such file"):
        main(["--images", str(images), "--labels", str(tmp_path / "missing"), "--data_only"])
    with pytest.raises(SystemExit):  # nothing to fit: argparse's usage error, exit code 2
        main(["--images", str(images), "--labels", str(images)])
    labels = write_idx(tmp_path / "labels", y)
    with pytest.raises(ValueError, match=r"--first 11: .* holds 10 images; choose 1 to 10"):
        main(["--images", str(images), "--labels", str(labels), "--first", "11", "--data_only"])


def test_first_keeps_the_first_images_and_data_only_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_DIR", raising=False)
    x, y = numbered_digits(10)
    images, labels = write_idx(tmp_path / "images", x, compress=True), write_idx(tmp_path / "labels", y)
    args = ["--images", str(images), "--labels", str(labels), "--first", "8", "--folds", "2", "--data_only"]
    assert main(args) == []
    assert not (tmp_path / "runs").exists()
    folds = tmp_path / "data" / "mnist_folds"  # the default: ./data without $DATA_DIR
    assert read_fold(folds / "fold1", "test")[0][:, 0, 0].tolist() == [4, 5, 6, 7]
    assert read_fold(folds / "fold1", "train")[0][:, 0, 0].tolist() == [0, 1, 2, 3]


def test_each_fold_is_a_cli_fit_and_the_table_pools_every_test_image(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    x, y = fake_digits(80, np.random.default_rng(0))
    images, labels = write_idx(tmp_path / "images", x, compress=True), write_idx(tmp_path / "labels", y)
    rows = main(
        [
            "--images",
            str(images),
            "--labels",
            str(labels),
            "--folds",
            "2",
            "--out",
            str(tmp_path / "folds"),
            "-c",
            "configs/mnist/fast.yaml",
            "--trainer.max_epochs",
            "1",
        ]
    )
    assert [(r["fold"], r["images"]) for r in rows] == [(0, 40), (1, 40)]
    assert (tmp_path / "runs" / "mnist_fast_fold0").is_dir() and (tmp_path / "runs" / "mnist_fast_fold1").is_dir()
    acc, errors, total, half = pooled(rows)
    assert total == 80 and errors == round((1 - rows[0]["acc"]) * 40) + round((1 - rows[1]["acc"]) * 40)
    assert acc == pytest.approx((rows[0]["acc"] + rows[1]["acc"]) / 2)
    assert half == pytest.approx(1.96 * (acc * (1 - acc) / 80) ** 0.5)
    out = capsys.readouterr().out
    assert f"| all | 80 | **{100 * acc:.2f} ± {100 * half:.2f} %** | {errors} |" in out
