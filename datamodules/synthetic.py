"""Tiny datasets in each dataset's real on-disk layout, for tests and benchmarks (no downloads, no mocked loaders).

Every writer puts files where the datamodule (or torchvision) looks for them, in the format it decodes, so that the
real reading code runs; the contents are seeded random data, learnable where a test trains on them:

- MNIST: :func:`write_mnist` (IDX files in ``<root>/MNIST/raw``, plain or gzipped; :func:`write_idx` for one file).
- CIFAR-10: :func:`write_cifar10` (torchvision's pickles in ``<root>/cifar-10-batches-py``); they cannot match the
  real md5 sums, so read them under :func:`cifar10_md5_ignored`.
- IMDB: :func:`write_imdb` (``<root>/aclImdb``) and :func:`write_glove` (a GloVe text file).
- Omniglot: :func:`write_omniglot_tree` (one extracted tree), :func:`write_omniglot_torchvision_layout` (both trees as
  torchvision extracts them) and :func:`zip_omniglot_tree` (the official zips' layout).

It imports nothing from the template itself, only the standard library, NumPy and (when a writer needs them)
Pillow and torchvision: the tests' fixtures and the benchmark scripts share it.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# ---- MNIST ------------------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` (uint8) as an IDX file: magic 0x0000 08 <ndim>, big-endian dims, raw bytes; with ``compress``
    gzipped as ``<path>.gz``. Returns the path written."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def fake_digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 images: class k lights up a bar at row 2k (plus noise)."""
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    rows = 2 * labels[:, None].astype(np.intp) + 4 + np.arange(2)  # (n, 2): rows 2k + 4 and 2k + 5
    images[np.arange(n)[:, None], rows, 4:24] = 255
    return images, labels


def write_mnist(root: Path, n_train: int = 256, n_test: int = 64, compress: bool = False) -> Path:
    """A tiny MNIST in torchvision's raw layout ``root/MNIST/raw/*-ubyte[.gz]``; returns ``root``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = fake_digits(n, rng)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return root


# ---- CIFAR-10 ---------------------------------------------------------------------------------------------------


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30) -> Path:
    """Tiny ``cifar-10-batches-py``: 5 training batches of ``per_batch`` images, a test batch of ``n_test`` and the
    meta file, in the real pickle layout; returns ``root``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in batches:
        n = n_test if name == "test_batch" else per_batch
        labels = rng.integers(0, 10, n).tolist()
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


@contextmanager
def cifar10_md5_ignored() -> Iterator[None]:
    """Within the block, torchvision's CIFAR-10 integrity check asks only that each file exists: the fake pickles
    cannot match the real md5 sums (torchvision's own tests skip the hash the same way)."""
    from torchvision.datasets import cifar

    check = cifar.check_integrity
    cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
    try:
        yield
    finally:
        cifar.check_integrity = check


# ---- IMDB -------------------------------------------------------------------------------------------------------

IMDB_POSITIVE = ["great", "wonderful", "superb", "moving", "brilliant"]
IMDB_NEGATIVE = ["awful", "boring", "dull", "terrible", "waste"]
IMDB_FILLER = ["the", "film", "movie", "a", "plot", "actor", "scene", "and", "it", "was"]
IMDB_TEST_ONLY_WORD = "zyzzogeton"  # appears in test reviews only: must be out of vocabulary


def fake_review(label: int, rng: np.random.Generator, length: int, extra: list[str] = ()) -> str:
    """A learnable review: filler words plus several words of its sentiment, with an HTML line break."""
    sentiment = IMDB_POSITIVE if label else IMDB_NEGATIVE
    words = list(rng.choice(IMDB_FILLER, length)) + list(rng.choice(sentiment, 4)) + list(extra)
    rng.shuffle(words)
    half = len(words) // 2
    return " ".join(words[:half]).capitalize() + ".<br /><br />" + " ".join(words[half:]) + "!"


def write_imdb(root: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> Path:
    """``root/aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`` plus ``imdb.vocab``; returns ``root``."""
    rng = np.random.default_rng(seed)
    base = root / "aclImdb"
    for split, n in (("train", n_train), ("test", n_test)):
        for label, folder in enumerate(("neg", "pos")):
            directory = base / split / folder
            directory.mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                rating = int(rng.integers(7, 11) if label else rng.integers(1, 5))
                extra = [IMDB_TEST_ONLY_WORD] if split == "test" else []
                text = fake_review(label, rng, int(rng.integers(6, 30)), extra)
                (directory / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    (base / "imdb.vocab").write_text("\n".join(IMDB_FILLER + IMDB_POSITIVE + IMDB_NEGATIVE) + "\n")
    return root


def write_glove(path: Path, words: list[str], dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A GloVe-format text file: one word then ``dim`` floats per line; returns the vectors written."""
    rng = np.random.default_rng(seed)
    vectors = {w: rng.normal(size=dim).round(4).astype(np.float32) for w in words}
    path.write_text("".join(f"{w} {' '.join(f'{v:.4f}' for v in vec)}\n" for w, vec in vectors.items()))
    return vectors


# ---- Omniglot ---------------------------------------------------------------------------------------------------

OMNIGLOT_BACKGROUND = {"Alpha": 6, "Beta": 6, "Gamma": 6, "Delta": 6, "Epsilon": 6}  # 30 characters
OMNIGLOT_EVALUATION = {"Zeta": 5, "Eta": 5}  # 10 characters


def write_omniglot_tree(
    root: Path,
    alphabets: dict[str, int],
    drawings: int = 20,
    size: int = 105,
    seed: int = 0,
) -> Path:
    """Write ``{alphabet: number of characters}`` as an extracted Omniglot tree,
    ``root/<Alphabet>/character<NN>/<id>_<nn>.png``; returns ``root``.

    Like the real drawings, every PNG is a 1-bit image of black strokes on white. Each character is a few random
    strokes; each of its drawings moves the strokes by a few pixels, so drawings of one character resemble each
    other and differ from other characters' (a learnable few-shot problem), and no two drawings are identical.
    """
    from PIL import Image, ImageDraw

    for a, (alphabet, characters) in enumerate(sorted(alphabets.items())):
        for c in range(characters):
            rng = np.random.default_rng([seed, a, c])
            strokes = rng.uniform(0.15, 0.85, (3, 2, 2)) * size  # 3 strokes, 2 end points, (x, y)
            folder = root / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for d in range(drawings):
                image = Image.new("1", (size, size), 1)
                draw = ImageDraw.Draw(image)
                shift = rng.uniform(-0.04, 0.04, 2) * size
                for stroke in strokes:
                    points = stroke + shift + rng.normal(0, 0.02 * size, (2, 2))
                    draw.line([tuple(p) for p in points], fill=0, width=max(2, size // 15))
                image.save(folder / f"{a * 100 + c:04d}_{d + 1:02d}.png")
    return root


def write_omniglot_torchvision_layout(data_dir: Path, size: int = 105, drawings: int = 20) -> Path:
    """``data_dir/omniglot-py/images_background`` and ``images_evaluation``, as torchvision extracts them, with the
    alphabets of :data:`OMNIGLOT_BACKGROUND` and :data:`OMNIGLOT_EVALUATION`; returns ``data_dir``."""
    base = data_dir / "omniglot-py"
    write_omniglot_tree(base / "images_background", OMNIGLOT_BACKGROUND, drawings=drawings, size=size, seed=1)
    write_omniglot_tree(base / "images_evaluation", OMNIGLOT_EVALUATION, drawings=drawings, size=size, seed=2)
    return data_dir


def zip_omniglot_tree(tree: Path, archive: Path) -> Path:
    """Zip ``tree`` so that it extracts to ``<tree name>/<Alphabet>/...`` (the official zips' layout)."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*.png")):
            zf.write(path, path.relative_to(tree.parent).as_posix())
    return archive


def write_image_folder(
    root: Path, splits: dict[str, int], size: tuple[int, int] = (20, 24), classes=("cats", "dogs", "owls")
) -> Path:
    """``root/<split>/<class>/NNN.{jpg,png}``: class ``i`` images have mean brightness ~ 60 + 60 i."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in splits.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(rng.normal(60 + 60 * label, 5, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root
