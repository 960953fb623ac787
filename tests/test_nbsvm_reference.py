"""scripts/nbsvm_reference.py: the published NBSVM, the fast IMDB recipe's reference, on any aclImdb split."""

from __future__ import annotations

import numpy as np
import pytest
from nbsvm_reference import main, nbsvm_accuracy, normalise

from datamodules.base import DataNotFoundError
from datamodules.synthetic import write_imdb


def test_normalise_splits_off_punctuation_and_line_breaks():
    assert normalise("Great film.<br />Really (truly) GOOD!").split() == [
        "great", "film", ".", "really", "(", "truly", ")", "good", "!",
    ]  # fmt: skip


def test_bigrams_separate_what_single_words_cannot():
    """Both classes use the same words; only their order ("not bad" against "not good") tells them apart."""
    rng = np.random.default_rng(0)

    def reviews(n):
        labels = rng.integers(0, 2, n)
        filler = ["the film was", "a movie that is", "this one is"]
        texts = [f"{rng.choice(filler)} {'good not bad' if y else 'bad not good'}" for y in labels]
        return [normalise(t) for t in texts], labels

    train, test = reviews(200), reviews(100)
    assert nbsvm_accuracy(train, test, ngrams=2) == 1.0
    assert nbsvm_accuracy(train, test, ngrams=1) < 0.75


def test_the_command_learns_an_aclimdb_split(tmp_path, capsys):
    write_imdb(tmp_path, n_train=60, n_test=40)
    assert main(["--data-dir", str(tmp_path), "--ngrams", "2"]) == 1.0
    assert "test accuracy 1.0000 on 40 reviews (trained on 60)" in capsys.readouterr().out


def test_a_split_without_test_reviews_names_the_missing_folders(tmp_path):
    write_imdb(tmp_path)
    for label in ("pos", "neg"):
        for path in (tmp_path / "aclImdb" / "test" / label).iterdir():
            path.unlink()
        (tmp_path / "aclImdb" / "test" / label).rmdir()
    with pytest.raises(DataNotFoundError, match=r"aclImdb lacks test/neg/, test/pos/: give --data-dir"):
        main(["--data-dir", str(tmp_path)])
