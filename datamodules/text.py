"""Text preprocessing shared by the text datamodules: tokeniser, vocabulary, padding, multi-hot, on-disk cache.

The notes (*Preprocess Text data*): lower-case, tokenise, optionally drop stop words, keep the top N words, and
take every statistic, the vocabulary included, from the training split only, then apply it unchanged to
validation, test and new sentences. The pieces here are small functions so that a new text dataset reuses them:

- :func:`tokenize` turns a review into tokens (HTML line breaks removed, lower-cased, punctuation split off);
- :class:`Vocabulary` keeps the ``num_words`` most frequent training words; index 0 pads, index 1 is the
  out-of-vocabulary word (Keras ``oov_token``), words take indices ``2 .. num_words - 1``;
- :func:`pad_pre` pads and truncates at the front like Keras ``pad_sequences`` (the last ``maxlen`` tokens stay);
- :func:`multi_hot` is the book's ``vectorize_sequences``;
- :func:`options_hash` keys a tokenised cache by its options (written with ``datamodules.base.atomic_save``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import CorruptDataError

PAD, OOV = 0, 1
"""Reserved indices: 0 pads sequences, 1 stands for every word outside the vocabulary."""
RESERVED = 2

TOKENIZER_VERSION = 1
"""Bump when :func:`tokenize` changes: every cache keyed with the old version is then rebuilt."""

_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]{0,40}>")
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # words and numbers, inner apostrophes kept (don't, it's)


def stop_words() -> frozenset[str]:
    """scikit-learn's English stop-word list (318 words), a dependency already."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def tokenize(
    text: str, lowercase: bool = True, strip_html: bool = True, stop: frozenset[str] = frozenset()
) -> list[str]:
    """``"A <br />GREAT film, isn't it?"`` -> ``["a", "great", "film", "isn't", "it"]``.

    IMDB reviews hold ``<br />`` line breaks (and a few other tags); they are removed, not read as words.
    """
    if strip_html:
        text = remove_html(text)
    if lowercase:
        text = text.lower()
    tokens = _TOKEN.findall(text)
    return [t for t in tokens if t not in stop] if stop else tokens


def remove_html(text: str) -> str:
    """``<br />`` line breaks and other short HTML tags replaced by spaces."""
    return _HTML_TAG.sub(" ", _HTML_BREAK.sub(" ", text))


def read_text_file(path: Path) -> str:
    """The UTF-8 text of one document, or a :class:`CorruptDataError` naming the file (undecodable or empty)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptDataError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}). Re-extract the archive, or convert the "
            "file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or delete it."
        ) from None
    if not text.strip():
        raise CorruptDataError(f"{path} is empty: a review needs some text. Re-extract the archive or delete it.")
    return text


def options_hash(options: dict[str, Any]) -> str:
    """A short stable hash of JSON-able ``options`` (key order does not matter)."""
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Vocabulary:
    """The top words of a training corpus, most frequent first; ``words[i]`` has index ``i + 2``.

    Built by :meth:`from_counts` from training counts only. ``encode`` maps a word outside the vocabulary
    (a rarer word, or one that appears only in validation/test data) to :data:`OOV`.
    """

    words: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {w: i + RESERVED for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        """Size of the index space, reserved indices included (``num_words`` of Keras)."""
        return len(self.words) + RESERVED

    @classmethod
    def from_counts(cls, words: Sequence[str], counts: Tensor, num_words: int, source: str) -> Vocabulary:
        """Keep the ``num_words - 2`` most frequent of ``words`` (ties: first seen first); ``counts[i]`` counts
        ``words[i]`` in the training split. ``source`` names the data for the error message."""
        order = torch.sort(counts, descending=True, stable=True).indices[: max(num_words - RESERVED, 0)]
        order = order[counts[order] > 0]
        if len(order) == 0:
            raise ValueError(
                f"The vocabulary built from {source} is empty: no token survived preprocessing (are the training "
                "files empty, or every word a stop word?). Check the data folder, or set remove_stop_words false."
            )
        return cls([words[i] for i in order.tolist()])

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.index.get(t, OOV) for t in tokens]

    def save(self, path: Path) -> None:
        """A JSON file ``{"words": [...]}`` (index = position + 2), readable without this project."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"pad": PAD, "oov": OOV, "words": self.words}, ensure_ascii=False))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls(json.loads(Path(path).read_text())["words"])


def pad_pre(sequences: Sequence[Tensor], maxlen: int) -> Tensor:
    """Keras ``pad_sequences(padding='pre', truncating='pre')``: ``(N, maxlen)``, each row's LAST ``maxlen``
    tokens, zeros in front of shorter rows."""
    out = torch.zeros(len(sequences), maxlen, dtype=torch.int32)
    for row, seq in zip(out, sequences, strict=True):
        seq = seq[-maxlen:] if maxlen else seq[:0]
        if len(seq):
            row[maxlen - len(seq) :] = seq
    return out


def multi_hot(indices: Tensor, num_words: int) -> Tensor:
    """``(B, L)`` word indices (0 = padding) -> ``(B, num_words)`` float rows with 1 at every index present.

    The book's ``vectorize_sequences``, done per batch on the batch's device (a dense 25k x 10k matrix would
    take 1 GB). Index 0 only pads and is cleared.
    """
    out = torch.zeros(indices.shape[0], num_words, device=indices.device)
    out.scatter_(1, indices.long(), 1.0)
    out[:, PAD] = 0.0
    return out


def ragged_select(flat: Tensor, offsets: Tensor, rows: Tensor) -> list[Tensor]:
    """The token slices of documents ``rows`` of a corpus stored as one flat tensor with ``offsets``."""
    starts, ends = offsets[rows].tolist(), offsets[rows + 1].tolist()
    return [flat[s:e] for s, e in zip(starts, ends, strict=True)]


class TokenDataset(Dataset):
    """Encoded documents ``(N, L)`` (any integer dtype) with labels, batched by slicing like the image sets.

    For a multi-hot representation the rows hold each document's distinct word indices, zero-padded; the
    datamodule expands them per batch on the device (:func:`multi_hot`).
    """

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} documents but {len(targets)} labels")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices)
        return self.inputs[index], self.targets[index]
