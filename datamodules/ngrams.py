"""Bags of word n-grams for linear text models (NB-weighted logistic regression, fastText-style EmbeddingBag).

A tokenised corpus (word ids stored back to back, ``lengths`` per document) becomes, per document, the indices of
its n-grams in an :class:`NGramVocabulary`: the ``size - 2`` most frequent n-grams of the TRAINING documents
(index 0 pads, 1 stands for every other n-gram, as :class:`~datamodules.text.Vocabulary` does for words). Every
step is vectorised (no Python loop over documents or tokens): an n-gram is one int64 key
``(id_1 + 1) * B**(n-1) + ... + (id_n + 1)`` in base ``B = number of words + 1``, so n-grams of different orders
never collide, counting is ``torch.unique`` and lookup is ``torch.searchsorted``.

Documents are stored as bags with offsets (CSR: ``flat[offsets[i]:offsets[i + 1]]``), the input of
``nn.EmbeddingBag``; :class:`BagDataset` cuts a batch into a zero-padded ``(B, L)`` index matrix, ``L`` the longest
bag of the batch, which ``nn.EmbeddingBag(padding_idx=0)`` sums directly. Never a dense documents x n-grams matrix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.text import OOV, RESERVED

INT64_MAX = 2**63 - 1


def ngram_keys(ids: Tensor, lengths: Tensor, ngram_range: Sequence[int], base: int) -> tuple[Tensor, Tensor]:
    """``(keys, doc)``: one int64 key per n-gram (``n`` in ``ngram_range``, inclusive) of documents stored back to
    back as word ids in ``[0, base - 1)``, and the document of each. n-grams never span two documents."""
    low, high = ngram_range
    if not 1 <= low <= high:
        raise ValueError(f"ngram_range={list(ngram_range)}: need 1 <= min <= max, e.g. [1, 2] for uni+bigrams.")
    if base**high > INT64_MAX:
        raise ValueError(
            f"ngram_range={list(ngram_range)}: {high}-grams over {base - 1} distinct words overflow int64 keys; "
            "use a shorter maximum n-gram."
        )
    ids = ids.long() + 1
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    keys, docs = [], []
    for n in range(low, high + 1):
        m = len(ids) - n + 1
        if m <= 0:
            continue
        key = torch.zeros(m, dtype=torch.int64)
        for k in range(n):
            key = key * base + ids[k : k + m]
        inside = doc[n - 1 :] == doc[:m]  # documents are contiguous: first and last token in the same one
        keys.append(key[inside])
        docs.append(doc[:m][inside])
    if not keys:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(keys), torch.cat(docs)


def bags(index: Tensor, doc: Tensor, num_docs: int, binary: bool) -> tuple[Tensor, Tensor]:
    """``(flat, offsets)``: the n-gram indices of each document (``index[doc == i]``), sorted; ``binary`` keeps
    each index once per document (presence), else repeats it as often as it occurs (counts)."""
    width = int(index.max()) + 1 if len(index) else 1
    keys = doc * width + index
    keys = torch.unique(keys) if binary else torch.sort(keys).values
    doc, flat = keys // width, keys % width
    offsets = torch.zeros(num_docs + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(doc, minlength=num_docs), 0)
    return flat.to(torch.int32), offsets


class NGramVocabulary:
    """The most frequent n-grams of the training documents; n-gram ``i`` of :attr:`table` has index ``i + 2``.

    Portable (no corpus needed): :attr:`words` are the words the n-grams use, and ``table[i]`` holds n-gram ``i``
    as positions in :attr:`words`, left-padded with -1 (``[-1, 4, 7]`` is the bigram ``words[4] words[7]`` when the
    longest n-gram is a trigram). It travels in checkpoints (:meth:`state`) and as ``vocab.json``.
    """

    def __init__(self, words: list[str], table: Tensor, ngram_range: Sequence[int]) -> None:
        self.words, self.table, self.ngram_range = list(words), table.to(torch.int64), tuple(ngram_range)

    def __len__(self) -> int:
        """Size of the index space, reserved indices (padding, unknown n-gram) included."""
        return len(self.table) + RESERVED

    @classmethod
    def from_corpus(
        cls,
        ids: Tensor,
        lengths: Tensor,
        words: Sequence[str],
        train_rows: Tensor,
        ngram_range: Sequence[int],
        size: int,
        source: str,
    ) -> NGramVocabulary:
        """The ``size - 2`` n-grams most frequent in documents ``train_rows`` (ties: shorter, then first-seen
        words first) of a corpus of word ids into ``words``; ``source`` names the documents in errors."""
        base = len(words) + 1
        keys, doc = ngram_keys(ids, lengths, ngram_range, base)
        in_train = torch.zeros(len(lengths), dtype=torch.bool)
        in_train[train_rows] = True
        unique, counts = torch.unique(keys[in_train[doc]], return_counts=True)
        if len(unique) == 0:
            raise ValueError(f"No {list(ngram_range)}-gram in {source}: are the training reviews empty?")
        chosen = unique[torch.sort(counts, descending=True, stable=True).indices[: max(size - RESERVED, 0)]]
        digits = torch.full((len(chosen), ngram_range[1]), -1, dtype=torch.int64)
        for column in range(ngram_range[1] - 1, -1, -1):  # last word first
            digits[:, column] = chosen % base - 1
            chosen = chosen // base
        used, table = torch.unique(digits[digits >= 0], return_inverse=True)  # keep only the words n-grams use
        compact = torch.full_like(digits, -1)
        compact[digits >= 0] = table
        return cls([words[i] for i in used.tolist()], compact, ngram_range)

    # ---- lookup -------------------------------------------------------------------------------------------
    def _sorted_keys(self, words: Sequence[str]) -> tuple[Tensor, Tensor]:
        """The vocabulary's keys in the id space of ``words`` (base ``len(words) + 1``), sorted, and their
        indices; n-grams with a word outside ``words`` cannot occur there and are left out."""
        position = {w: i for i, w in enumerate(words)}
        to_space = torch.tensor([position.get(w, -1) for w in self.words] + [-1], dtype=torch.int64)
        mapped = torch.where(self.table >= 0, to_space[self.table], -1)
        absent = ((self.table >= 0) & (mapped < 0)).any(dim=1)
        base, keys = len(words) + 1, torch.zeros(len(self.table), dtype=torch.int64)
        for column in mapped.T:
            keys = torch.where(column >= 0, keys * base + column + 1, keys)
        index = torch.arange(len(self.table)) + RESERVED
        keys, index = keys[~absent], index[~absent]
        order = torch.argsort(keys)
        return keys[order], index[order]

    def encode(self, ids: Tensor, lengths: Tensor, words: Sequence[str], binary: bool = True) -> tuple[Tensor, Tensor]:
        """Documents of word ids into ``words`` -> their bags ``(flat, offsets)`` of n-gram indices (OOV for
        n-grams outside the vocabulary)."""
        keys, doc = ngram_keys(ids, lengths, self.ngram_range, len(words) + 1)
        known, index = self._sorted_keys(words)
        if len(known) == 0:  # no vocabulary n-gram can occur in these words
            return bags(torch.full_like(keys, OOV), doc, len(lengths), binary)
        position = torch.searchsorted(known, keys).clamp(max=len(known) - 1)
        return bags(torch.where(known[position] == keys, index[position], OOV), doc, len(lengths), binary)

    def encode_tokens(self, documents: Sequence[Sequence[str]], binary: bool = True) -> tuple[Tensor, Tensor]:
        """Tokenised documents (new text) -> bags ``(flat, offsets)``."""
        words: dict[str, int] = {}
        ids = [words.setdefault(t, len(words)) for tokens in documents for t in tokens]
        lengths = torch.tensor([len(tokens) for tokens in documents], dtype=torch.int64)
        return self.encode(torch.tensor(ids, dtype=torch.int64), lengths, list(words), binary)

    def ngram(self, index: int) -> str:
        """The n-gram of vocabulary ``index`` as text (``"not good"``)."""
        return " ".join(self.words[i] for i in self.table[index - RESERVED].tolist() if i >= 0)

    # ---- persistence --------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"words": self.words, "table": self.table.to(torch.int32), "ngram_range": list(self.ngram_range)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> NGramVocabulary:
        return cls(state["words"], state["table"], state["ngram_range"])

    def save(self, path: Path) -> None:
        """``vocab.json``: ``{"words": [...], "ngrams": [[word positions], ...]}``; n-gram ``i`` has index
        ``i + 2`` (0 pads, 1 is the unknown n-gram). Readable without this project."""
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [[i for i in row if i >= 0] for row in self.table.tolist()]
        content = {"pad": 0, "oov": OOV, "ngram_range": list(self.ngram_range), "words": self.words, "ngrams": rows}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(content, ensure_ascii=False, separators=(",", ":")))
        os.replace(tmp, path)


def ragged_rows(flat: Tensor, offsets: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(values, lengths)``: the bags of documents ``rows``, back to back, and their lengths."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    total = int(lengths.sum())
    first = torch.cumsum(lengths, 0) - lengths  # where each bag starts in the output
    position = torch.arange(total) - torch.repeat_interleave(first, lengths, output_size=total)
    return flat[torch.repeat_interleave(starts, lengths, output_size=total) + position], lengths


def pad_bags(values: Tensor, lengths: Tensor) -> Tensor:
    """Bags stored back to back -> ``(B, L)`` zero-padded rows, ``L`` the longest bag (at least 1)."""
    out = torch.zeros(len(lengths), max(int(lengths.max()) if len(lengths) else 0, 1), dtype=values.dtype)
    row = torch.repeat_interleave(torch.arange(len(lengths)), lengths, output_size=len(values))
    first = torch.cumsum(lengths, 0) - lengths
    out[row, torch.arange(len(values)) - first[row]] = values
    return out


class BagDataset(Dataset):
    """Documents as bags of n-gram indices (``flat``, ``offsets``) with labels; a batch (``__getitems__``) is a
    zero-padded ``(B, L)`` int32 matrix, ``L`` the longest bag of the batch."""

    def __init__(self, flat: Tensor, offsets: Tensor, targets: Tensor) -> None:
        if len(offsets) != len(targets) + 1:
            raise ValueError(f"{len(offsets) - 1} bags but {len(targets)} labels")
        self.flat, self.offsets, self.targets = flat, offsets, targets

    def __len__(self) -> int:
        return len(self.targets)

    def select(self, rows: Tensor) -> BagDataset:
        """The documents ``rows`` as a dataset of their own (e.g. the training part of a split)."""
        values, lengths = ragged_rows(self.flat, self.offsets, rows)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        return BagDataset(values, offsets, self.targets[rows])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.flat[self.offsets[index] : self.offsets[index + 1]], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.int64)
        return pad_bags(*ragged_rows(self.flat, self.offsets, rows)), self.targets[rows]
