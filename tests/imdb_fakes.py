"""The IMDB fakes under the names the IMDB tests import: a tiny aclImdb tree and GloVe file (see
:mod:`datamodules.synthetic`, which the benchmarks share)."""

from datamodules.synthetic import IMDB_FILLER as FILLER
from datamodules.synthetic import IMDB_NEGATIVE as NEGATIVE
from datamodules.synthetic import IMDB_POSITIVE as POSITIVE
from datamodules.synthetic import IMDB_TEST_ONLY_WORD as TEST_ONLY_WORD
from datamodules.synthetic import fake_review, write_glove, write_imdb

__all__ = ["FILLER", "NEGATIVE", "POSITIVE", "TEST_ONLY_WORD", "fake_review", "write_glove", "write_imdb"]
