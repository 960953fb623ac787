"""Prefetch datasets into one folder, md5-checked, so that jobs on offline compute nodes never download.

    python scripts/download_data.py --datasets mnist cifar10 imdb omniglot --data-dir /cluster/datasets
    python scripts/download_data.py --data-dir /cluster/datasets --offline   # only verify what is there

Run it where there is network (a login node), then point every job at the folder with ``DATA_DIR`` (the
datamodules' default ``data_dir``). The layout is the one the datamodules read:

    mnist     <data-dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte   torchvision's MNIST
    cifar10   <data-dir>/cifar-10-batches-py/                                     torchvision's CIFAR10
    imdb      <data-dir>/aclImdb/{train,test}/{pos,neg}/*.txt                      Stanford's aclImdb_v1.tar.gz
    omniglot  <data-dir>/omniglot-py/images_{background,evaluation}[.zip]         torchvision's Omniglot

Downloads go through torchvision, which checks the md5 sum of every downloaded archive. A dataset already in
place is verified without network (decoded, or md5 sums of its files or archives) and skipped. A dataset that
cannot be fetched gets one paragraph saying what failed and what to do; the others still run, and the exit
status is 1 when any dataset is not ready at the end.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets import CIFAR10, MNIST, Omniglot
from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive

from datamodules.base import CorruptDataError, DataNotFoundError, default_data_dir
from datamodules.mnist import MNIST_FILES, MNISTDataModule

IMDB_URL = "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"
IMDB_FILES_PER_FOLDER = 12_500  # reviews in each of aclImdb/{train,test}/{pos,neg} of the official release
OMNIGLOT_SETS = ("images_background", "images_evaluation")


@dataclass
class Check:
    """Whether a dataset is complete on disk, and what was verified (or what is missing or damaged)."""

    ok: bool
    detail: str
    fetch_helps: bool = True  # False: files are there but damaged, and fetching would not replace them


@dataclass
class Spec:
    """One dataset: its folder in the layout, where it comes from, how to verify and how to fetch it."""

    folder: str
    source: str
    check: Callable[[Path], Check]
    fetch: Callable[[Path], None]


# ---- MNIST -----------------------------------------------------------------------------------------------
def check_mnist(root: Path) -> Check:
    """Decode the four IDX files with the datamodule's own reader; md5-check the official .gz archives present."""
    datamodule = MNISTDataModule(data_dir=str(root))
    names = [name for pair in MNIST_FILES.values() for name in pair]
    missing = [n for n in names if not any((datamodule.raw_dir / f).is_file() for f in (n, f"{n}.gz"))]
    if missing:
        return Check(False, f"missing {', '.join(missing)}")
    try:
        counts = [len(datamodule.load_split(split)[0]) for split in ("train", "test")]
    except DataNotFoundError as err:
        return Check(False, str(err))
    except CorruptDataError as err:  # torchvision keeps files that exist: it would not replace this one
        return Check(False, str(err), fetch_helps=False)
    archives = [(datamodule.raw_dir / name, md5) for name, md5 in MNIST.resources]
    present = [(path, md5) for path, md5 in archives if path.is_file()]
    damaged = [path.name for path, md5 in present if not check_integrity(str(path), md5)]
    if damaged:
        return Check(
            False,
            f"{', '.join(damaged)} in {datamodule.raw_dir} fail their md5 check (damaged, or not the official "
            f"files): delete {datamodule.raw_dir} and run this script again.",
            fetch_helps=False,
        )
    md5 = f"{len(present)} archives md5-verified" if present else "no .gz archives kept, so no md5 check"
    return Check(True, f"{counts[0]} train + {counts[1]} test images decoded; {md5}")


def fetch_mnist(root: Path) -> None:
    for train in (True, False):
        MNIST(str(root), train=train, download=True)


# ---- CIFAR-10 --------------------------------------------------------------------------------------------
def _cifar_files() -> list[tuple[str, str]]:
    return [
        *map(tuple, CIFAR10.train_list),
        *map(tuple, CIFAR10.test_list),
        (CIFAR10.meta["filename"], CIFAR10.meta["md5"]),
    ]


def check_cifar10(root: Path) -> Check:
    """md5 of the seven files of cifar-10-batches-py (torchvision's list, as the datamodule checks them)."""
    folder = root / CIFAR10.base_folder
    if not folder.is_dir():
        return Check(False, "folder not found")
    missing = [name for name, _ in _cifar_files() if not (folder / name).is_file()]
    damaged = [
        name for name, md5 in _cifar_files() if name not in missing and not check_integrity(str(folder / name), md5)
    ]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    problems += [f"failing their md5 check: {', '.join(damaged)}"] if damaged else []
    if problems:
        return Check(False, "; ".join(problems))
    return Check(True, f"{len(_cifar_files())} files md5-verified")


def fetch_cifar10(root: Path) -> None:
    CIFAR10(str(root), train=True, download=True)  # one archive holds both splits


# ---- Omniglot --------------------------------------------------------------------------------------------
def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def check_omniglot(root: Path) -> Check:
    """Both zips md5-checked (torchvision's Omniglot insists on them) and both image folders extracted."""
    folder = root / Omniglot.folder
    if not folder.is_dir():
        return Check(False, "folder not found")
    problems = []
    for name in OMNIGLOT_SETS:
        if not check_integrity(str(folder / f"{name}.zip"), Omniglot.zips_md5[name]):
            problems.append(f"{name}.zip missing or failing its md5 check")
        elif not _has_files(folder / name):
            problems.append(f"{name}/ not extracted")
    if problems:
        return Check(False, "; ".join(problems))
    return Check(True, "background + evaluation zips md5-verified, both extracted")


def fetch_omniglot(root: Path) -> None:
    folder = root / Omniglot.folder
    for name in OMNIGLOT_SETS:
        archive = folder / f"{name}.zip"
        if check_integrity(str(archive), Omniglot.zips_md5[name]) and not _has_files(folder / name):
            extract_archive(str(archive), str(folder))  # torchvision skips extraction when the zip is intact
        else:
            Omniglot(str(root), background=name == "images_background", download=True)


# ---- IMDB ------------------------------------------------------------------------------------------------
def check_imdb(root: Path) -> Check:
    """Every review folder holds the official number of files; the archive, when kept, is md5-checked."""
    folder = root / "aclImdb"
    if not folder.is_dir():
        return Check(False, "folder not found")
    problems = []
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            path = folder / split / label
            count = sum(1 for _ in path.glob("*.txt")) if path.is_dir() else 0
            if count != IMDB_FILES_PER_FOLDER:
                problems.append(f"{split}/{label} holds {count} of {IMDB_FILES_PER_FOLDER} reviews")
    archive = root / Path(IMDB_URL).name
    if archive.is_file() and not check_integrity(str(archive), IMDB_MD5):
        problems.append(f"{archive.name} fails its md5 check (it will be downloaded again)")
    if problems:
        return Check(False, "; ".join(problems))
    md5 = "archive md5-verified" if archive.is_file() else "archive not kept, so no md5 check"
    return Check(True, f"4 x {IMDB_FILES_PER_FOLDER} reviews; {md5}")


def fetch_imdb(root: Path) -> None:
    # Skips the download when the archive is already there and passes its md5 check, then (re-)extracts it.
    download_and_extract_archive(IMDB_URL, str(root), filename=Path(IMDB_URL).name, md5=IMDB_MD5)


DATASETS: dict[str, Spec] = {
    "mnist": Spec("MNIST/raw", MNIST.mirrors[0], check_mnist, fetch_mnist),
    "cifar10": Spec(CIFAR10.base_folder, CIFAR10.url, check_cifar10, fetch_cifar10),
    "imdb": Spec("aclImdb", IMDB_URL, check_imdb, fetch_imdb),
    "omniglot": Spec(Omniglot.folder, Omniglot.download_url_prefix, check_omniglot, fetch_omniglot),
}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no details"
    return f"{type(err).__name__}: {text[:400]}{' ...' if len(text) > 400 else ''}"


def _report(paragraph: str) -> None:
    """One paragraph on stderr, after whatever stdout holds (so a log file keeps the order)."""
    sys.stdout.flush()
    print(f"\n{paragraph}\n", file=sys.stderr, flush=True)


def prepare(name: str, root: Path, offline: bool = False) -> tuple[bool, str]:
    """Verify dataset ``name`` under ``root`` and fetch it when needed; returns (ready, short status)."""
    spec = DATASETS[name]
    where = root / spec.folder
    before = spec.check(root)
    if before.ok:
        return True, f"already present, verified: {before.detail}"
    if not before.fetch_helps:
        _report(f"{name}: FAILED. {where} is not usable: {before.detail}")
        return False, "damaged (see above)"
    if offline:
        _report(
            f"{name}: not ready in {where} ({before.detail}), and --offline forbids downloading it. Run this "
            "script without --offline, with the same --data-dir, on a machine with network access (a login node)."
        )
        return False, "not ready (--offline)"
    print(f"{name}: not ready in {where} ({before.detail}); fetching it from {spec.source} ...", flush=True)
    try:
        spec.fetch(root)
    except Exception as err:  # URLError, OSError, RuntimeError (md5 mismatch, all mirrors failed), archive errors
        _report(
            f"{name}: FAILED. It is not ready in {where} ({before.detail}), and fetching it from {spec.source} "
            f"failed ({_one_line(err)}). If this machine has no network access (compute nodes usually have "
            "none), run this script with the same --data-dir on one that has, e.g. a login node; otherwise "
            f"retry later, or copy an intact {spec.folder}/ from another machine into {root}."
        )
        return False, f"download failed ({type(err).__name__})"
    after = spec.check(root)
    if not after.ok:
        _report(f"{name}: FAILED. Fetched, but {where} is still not usable: {after.detail}")
        return False, "not usable after fetching"
    return True, f"downloaded, verified: {after.detail}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Prefetch datasets (md5-checked) into one folder, for compute nodes without network.",
        epilog="Jobs then read the folder through $DATA_DIR (or --data.init_args.data_dir).",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=list(DATASETS),
        default=list(DATASETS),
        metavar="NAME",
        help=f"Datasets to prepare, any of: {', '.join(DATASETS)} (default: all).",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Folder to fill (default: $DATA_DIR, else ./data); each dataset goes where its datamodule reads it.",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="Never download, only verify what is there (e.g. on a compute node before training).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="Seconds a connection may stay silent before a download counts as failed (default: 60).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    socket.setdefaulttimeout(args.timeout)  # a firewall that drops packets must not hang the script for ever
    root = (args.data_dir or Path(default_data_dir())).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = {name: prepare(name, root, args.offline) for name in dict.fromkeys(args.datasets)}
    print(f"\nSummary ({root}):")
    for name, (ready, status) in results.items():
        print(f"  {name:<9} {'ok' if ready else 'NOT READY':<10} {status}")
    failed = [name for name, (ready, _) in results.items() if not ready]
    if failed:
        print(f"{len(failed)} of {len(results)} not ready: {', '.join(failed)} (see the messages above).")
        return 1
    print(f"All ready. Point the jobs at it: export DATA_DIR={root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
