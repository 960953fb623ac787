"""scripts/download_data.py offline: present datasets are verified and skipped, failures are explained one by one.

No test reaches the network: every connection to a host other than this machine fails at once, the way DNS
fails on a compute node without network (and the closed-port test points a URL at this machine).
"""

from __future__ import annotations

import socket

import download_data
import pytest
from conftest import write_mnist
from download_data import DATASETS, main
from torchvision.datasets import CIFAR10, MNIST

from datamodules import CIFAR10DataModule, MNISTDataModule

LOCAL = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def no_network(monkeypatch) -> list[str]:
    """Refuse name lookups and connections to anything but this machine; returns the hosts that were tried."""
    tried: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL:
            tried.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (network disabled in tests)")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOCAL:
            tried.append(address[0])
            raise OSError("network disabled in tests")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return tried


def closed_port() -> str:
    """A local URL that refuses connections at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def test_layout_is_the_datamodules(tmp_path):
    assert tmp_path / DATASETS["mnist"].folder == MNISTDataModule(data_dir=str(tmp_path)).raw_dir
    assert tmp_path / DATASETS["cifar10"].folder == CIFAR10DataModule(data_dir=str(tmp_path)).folder
    assert (DATASETS["imdb"].folder, DATASETS["omniglot"].folder) == ("aclImdb", "omniglot-py")


def test_present_mnist_is_verified_and_skipped_without_network(tmp_path, capsys, no_network):
    write_mnist(tmp_path)
    assert main(["--datasets", "mnist", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mnist     ok         already present, verified: 256 train + 64 test images decoded" in out
    assert f"export DATA_DIR={tmp_path}" in out
    assert no_network == []  # nothing was even looked up


def test_data_dir_defaults_to_the_DATA_DIR_variable(tmp_path, monkeypatch, capsys):
    write_mnist(tmp_path / "shared")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "shared"))
    assert main(["--datasets", "mnist"]) == 0
    assert f"Summary ({tmp_path / 'shared'})" in capsys.readouterr().out


def test_without_network_each_dataset_fails_with_its_own_paragraph(tmp_path, capsys, no_network):
    write_mnist(tmp_path)  # present: still verified and reported ok between the failures
    folder = tmp_path / CIFAR10.base_folder
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not the official file")
    assert main(["--datasets", "cifar10", "mnist", "imdb", "omniglot", "--data-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    paragraphs = [p for p in captured.err.split("\n\n") if "FAILED" in p]
    assert [p.strip().split(":")[0] for p in paragraphs] == ["cifar10", "imdb", "omniglot"]
    cifar, imdb, omniglot = paragraphs
    assert "failing their md5 check: data_batch_1" in cifar and "missing data_batch_2" in cifar
    assert CIFAR10.url in cifar and "login node" in cifar and "Name or service not known" in cifar
    assert download_data.IMDB_URL in imdb and str(tmp_path / "aclImdb") in imdb
    assert "omniglot-py" in omniglot and "folder not found" in omniglot
    summary = captured.out[captured.out.index("Summary") :]
    assert "mnist     ok" in summary and "cifar10   NOT READY" in summary
    assert "3 of 4 not ready: cifar10, imdb, omniglot" in summary
    assert {"www.cs.toronto.edu", "ai.stanford.edu", "raw.githubusercontent.com"} <= set(no_network)


def test_a_refused_connection_is_reported_and_the_rest_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MNIST, "mirrors", [closed_port()])  # the real torchvision download code runs and fails
    monkeypatch.setattr(download_data, "IMDB_URL", closed_port() + "aclImdb_v1.tar.gz")
    assert main(["--datasets", "mnist", "imdb", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("Connection refused") >= 2
    assert "mnist: FAILED" in err and "missing train-images-idx3-ubyte" in err
    assert "imdb: FAILED" in err


def test_offline_flag_only_verifies(tmp_path, capsys, no_network):
    assert main(["--datasets", "imdb", "--data-dir", str(tmp_path), "--offline"]) == 1
    assert "--offline forbids downloading it" in capsys.readouterr().err
    assert no_network == []


def test_damaged_mnist_is_not_skipped(tmp_path, capsys):
    raw = write_mnist(tmp_path) / "MNIST" / "raw"
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])  # truncated copy
    assert main(["--datasets", "mnist", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "mnist: FAILED" in err and "truncated" in err and str(path) in err


def test_imdb_is_counted_and_its_archive_md5_checked(tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.setattr(download_data, "IMDB_FILES_PER_FOLDER", 2)  # the official release has 12,500
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            folder = tmp_path / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                (folder / f"{i}_7.txt").write_text("A review.")
    assert main(["--datasets", "imdb", "--data-dir", str(tmp_path)]) == 0
    assert "archive not kept, so no md5 check" in capsys.readouterr().out

    (tmp_path / "aclImdb_v1.tar.gz").write_bytes(b"damaged download")
    assert main(["--datasets", "imdb", "--data-dir", str(tmp_path)]) == 1  # damaged archive -> fetch again -> no net
    assert "aclImdb_v1.tar.gz fails its md5 check" in capsys.readouterr().err
    assert no_network == ["ai.stanford.edu"]
