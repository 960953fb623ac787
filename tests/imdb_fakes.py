"""A tiny aclImdb tree in the real layout, and a tiny GloVe text file, written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

POSITIVE = ["great", "wonderful", "superb", "moving", "brilliant"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "waste"]
FILLER = ["the", "film", "movie", "a", "plot", "actor", "scene", "and", "it", "was"]
TEST_ONLY_WORD = "zyzzogeton"  # appears in test reviews only: must be out of vocabulary


def fake_review(label: int, rng: np.random.Generator, length: int, extra: list[str] = ()) -> str:
    """A learnable review: filler words plus several words of its sentiment, with an HTML line break."""
    sentiment = POSITIVE if label else NEGATIVE
    words = list(rng.choice(FILLER, length)) + list(rng.choice(sentiment, 4)) + list(extra)
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
                extra = [TEST_ONLY_WORD] if split == "test" else []
                text = fake_review(label, rng, int(rng.integers(6, 30)), extra)
                (directory / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    (base / "imdb.vocab").write_text("\n".join(FILLER + POSITIVE + NEGATIVE) + "\n")
    return root


def write_glove(path: Path, words: list[str], dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A GloVe-format text file: one word then ``dim`` floats per line; returns the vectors written."""
    rng = np.random.default_rng(seed)
    vectors = {w: rng.normal(size=dim).round(4).astype(np.float32) for w in words}
    path.write_text("".join(f"{w} {' '.join(f'{v:.4f}' for v in vec)}\n" for w, vec in vectors.items()))
    return vectors
