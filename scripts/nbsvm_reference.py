"""NBSVM as published: the reference the fast IMDB recipe (``configs/imdb/fast.yaml``) is measured against.

Wang and Manning's NB-weighted linear model, in the form of Mesnil et al.'s public NBSVM code, whose README reports
91.55 % (bigrams) and 91.82 % (trigrams) on the official test split after training on the 25,000 official training
reviews. The steps are theirs, written here with scikit-learn: every review lower-cased, ``<br />`` removed and the
punctuation ``. " , ( ) ! ? ; :`` split off; the n-grams of its whitespace tokens; the Naive-Bayes log-count ratio of
each n-gram from its counts in each class (add-one smoothing); each review a 0/1 vector of its n-grams scaled by that
ratio; an L2-regularised logistic regression with ``C = 1`` and no intercept (liblinear). Running it on the same
split as the recipe tells how the recipe compares with the published method where the official test split is not
at hand (docs/fast_recipes.md#imdb-configsimdbfastyaml)::

    python scripts/nbsvm_reference.py --data-dir data/imdb_split --ngrams 3

It reads ``<data-dir>/aclImdb/{train,test}/{pos,neg}/*.txt`` as the IMDB datamodule does, and prints the held-out
accuracy and the wall time of the whole run (reading included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from datamodules.base import DataNotFoundError
from datamodules.imdb_corpus import IMDBCorpus

PUNCTUATION = '.",()!?;:'


def normalise(text: str) -> str:
    """Mesnil et al.'s normalisation: lower case, ``<br />`` removed, each punctuation mark a token of its own."""
    text = text.lower().replace("<br />", " ")
    for mark in PUNCTUATION:
        text = text.replace(mark, f" {mark} ")
    return text


def read_split(corpus: IMDBCorpus, split: str) -> tuple[list[str], np.ndarray]:
    files = corpus.files(split)
    if not files:
        raise DataNotFoundError(f"{corpus.root / split} holds no reviews ({split}/pos/*.txt, {split}/neg/*.txt).")
    texts = [normalise(path.read_text(encoding="utf-8", errors="replace")) for path, _ in files]
    return texts, np.array([label for _, label in files])


def nbsvm_accuracy(train: tuple[list[str], np.ndarray], test: tuple[list[str], np.ndarray], ngrams: int) -> float:
    """Fit NBSVM on ``train`` (texts, 0/1 labels) and return its accuracy on ``test``."""
    (train_texts, y), (test_texts, test_y) = train, test
    counter = CountVectorizer(ngram_range=(1, ngrams), tokenizer=str.split, token_pattern=None, lowercase=False)
    counts = counter.fit_transform(train_texts)
    positive = 1 + np.asarray(counts[y == 1].sum(0)).ravel()
    negative = 1 + np.asarray(counts[y == 0].sum(0)).ravel()
    ratio = np.log(positive / positive.sum()) - np.log(negative / negative.sum())

    def features(matrix):
        matrix = matrix.astype(np.float64)  # a copy
        matrix.data[:] = 1.0  # presence, not counts
        return matrix.multiply(ratio).tocsr()

    model = LogisticRegression(C=1.0, solver="liblinear", fit_intercept=False, max_iter=1000)
    model.fit(features(counts), y)
    return float((model.predict(features(counter.transform(test_texts))) == test_y).mean())


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="holds aclImdb/train and aclImdb/test")
    parser.add_argument("--ngrams", type=int, choices=(1, 2, 3), default=3, help="longest n-gram (default 3)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    corpus = IMDBCorpus(args.data_dir)
    if corpus.missing():
        raise DataNotFoundError(
            f"{corpus.root} lacks {', '.join(corpus.missing())}: give --data-dir a folder holding aclImdb/train/pos, "
            "train/neg, test/pos and test/neg (docs/fast_recipes.md shows how to hold test reviews out of the "
            "training reviews when the official test split is not at hand)."
        )
    train, test = read_split(corpus, "train"), read_split(corpus, "test")
    accuracy = nbsvm_accuracy(train, test, args.ngrams)
    print(
        f"NBSVM, n-grams 1-{args.ngrams}: test accuracy {accuracy:.4f} on {len(test[1])} reviews "
        f"(trained on {len(train[1])}); {time.perf_counter() - start:.1f} s in all"
    )
    return accuracy


if __name__ == "__main__":
    from cli_errors import run_command  # errors as one paragraph (TEMPLATE_TRACEBACK=1: the traceback)

    sys.exit(run_command(main))
