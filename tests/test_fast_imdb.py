"""The IMDB fast recipe: n-gram bags (train-only vocabulary), the NB log-count ratio, NGramClassifier training, and
configs/imdb/fast.yaml through the CLI with its checkpoint reloaded."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from imdb_fakes import NEGATIVE, POSITIVE, TEST_ONLY_WORD, write_imdb
from train import main

from datamodules.imdb import IMDBDataModule
from datamodules.ngrams import BagDataset, NGramVocabulary, ngram_keys
from datamodules.text import OOV
from lightning_modules.ngram import NGramClassifier, nb_log_count_ratio

ROOT = Path(__file__).resolve().parents[1]
FAST = str(ROOT / "configs/imdb/fast.yaml")


def vocabulary_of(documents: list[list[str]], train_rows: list[int], ngram_range=(1, 2), size=100):
    words: dict[str, int] = {}
    ids = torch.tensor([words.setdefault(t, len(words)) for doc in documents for t in doc])
    lengths = torch.tensor([len(doc) for doc in documents])
    rows = torch.tensor(train_rows)
    return NGramVocabulary.from_corpus(ids, lengths, list(words), rows, ngram_range, size, "toy"), ids, lengths, words


def bag_texts(vocabulary: NGramVocabulary, flat, offsets, row: int) -> list[str]:
    return [vocabulary.ngram(i) if i != OOV else "<unk>" for i in flat[offsets[row] : offsets[row + 1]].tolist()]


# ---- n-gram bags --------------------------------------------------------------------------------------------


def test_ngrams_come_from_the_training_documents_only():
    documents = [["not", "good", "at", "all"], ["very", "good"], ["not", "bad"]]  # the third is not training data
    vocabulary, ids, lengths, words = vocabulary_of(documents, train_rows=[0, 1])
    known = {vocabulary.ngram(i) for i in range(2, len(vocabulary))}
    assert known == {"not", "good", "at", "all", "very", "not good", "good at", "at all", "very good"}
    # "not bad" (and "bad") occur only outside the training rows: one unknown n-gram, once (binary bags).
    flat, offsets = vocabulary.encode(ids, lengths, list(words), binary=True)
    assert sorted(bag_texts(vocabulary, flat, offsets, 2)) == ["<unk>", "not"]
    # n-grams never span two documents: "all very" and "good not" exist nowhere.
    keys, doc = ngram_keys(ids, lengths, (2, 2), len(words) + 1)
    assert len(keys) == 3 + 1 + 1 and doc.tolist() == [0, 0, 0, 1, 2]


def test_binary_bags_keep_presence_and_count_bags_keep_counts():
    vocabulary, ids, lengths, words = vocabulary_of([["a", "b", "a", "b"]], train_rows=[0])
    flat, offsets = vocabulary.encode(ids, lengths, list(words), binary=True)
    assert sorted(bag_texts(vocabulary, flat, offsets, 0)) == ["a", "a b", "b", "b a"]
    flat, offsets = vocabulary.encode(ids, lengths, list(words), binary=False)
    assert sorted(bag_texts(vocabulary, flat, offsets, 0)) == ["a", "a", "a b", "a b", "b", "b", "b a"]
    # New text goes through the portable vocabulary to the same indices as the corpus did.
    raw_flat, raw_offsets = vocabulary.encode_tokens([["a", "b", "a", "b"]], binary=False)
    assert torch.equal(raw_flat, flat) and torch.equal(raw_offsets, offsets)
    # The most frequent n-grams win when the index space is small: size 4 keeps 2 n-grams, the rest are unknown.
    small, *_ = vocabulary_of([["a", "b", "a", "b"]], train_rows=[0], size=4)
    assert [small.ngram(i) for i in (2, 3)] == ["a", "b"]


def test_bag_batches_are_zero_padded_rows():
    dataset = BagDataset(
        torch.tensor([5, 6, 7, 8, 9], dtype=torch.int32), torch.tensor([0, 2, 2, 5]), torch.tensor([1, 0, 1])
    )
    x, y = dataset.__getitems__([2, 0, 1])
    assert x.tolist() == [[7, 8, 9], [5, 6, 0], [0, 0, 0]] and y.tolist() == [1, 1, 0]
    part = dataset.select(torch.tensor([2, 0]))
    assert (
        part.flat.tolist() == [7, 8, 9, 5, 6] and part.offsets.tolist() == [0, 3, 5] and part.targets.tolist() == [1, 1]
    )


def test_bad_ngram_options_are_explained(tmp_path):
    with pytest.raises(ValueError, match="ngram_range"):
        IMDBDataModule(data_dir=str(tmp_path), representation="ngrams", ngram_range=(2, 1))
    with pytest.raises(ValueError, match="overflow"):
        ngram_keys(torch.tensor([0, 1]), torch.tensor([2]), (1, 5), base=10**5)
    with pytest.raises(ValueError, match="binary classifier"):
        NGramClassifier(input_shape=[10], task="multiclass", num_classes=3)


# ---- the NB ratio -------------------------------------------------------------------------------------------


def test_nb_ratio_matches_a_hand_computation():
    documents = [["great", "fun"], ["great", "plot"], ["dull", "plot", "plot"]]  # positive, positive, negative
    vocabulary, ids, lengths, words = vocabulary_of(documents, train_rows=[0, 1, 2], ngram_range=(1, 1))
    flat, offsets = vocabulary.encode(ids, lengths, list(words), binary=False)
    ratio = nb_log_count_ratio(flat, offsets, torch.tensor([1, 1, 0]), len(vocabulary), alpha=1.0)
    # alpha + counts over the index space [pad, unknown, great, plot, fun, dull] (most frequent first):
    # p = 1 + [0, 0, 2, 1, 1, 0] -> |p| = 10,  q = 1 + [0, 0, 0, 2, 0, 1] -> |q| = 9.
    expected = {"great": (3 / 10) / (1 / 9), "plot": (2 / 10) / (3 / 9), "fun": (2 / 10) / (1 / 9)}
    expected["dull"] = (1 / 10) / (2 / 9)
    for word, odds in expected.items():
        index = vocabulary.encode_tokens([[word]])[0].item()
        assert ratio[index].item() == pytest.approx(math.log(odds), rel=1e-6), word
    assert ratio[0] == 0  # padding carries nothing


# ---- training and the CLI -----------------------------------------------------------------------------------


def test_nb_logistic_regression_learns_the_fake_reviews(tmp_path):
    torch.manual_seed(0)
    data = write_imdb(tmp_path / "data", n_train=64)
    dm = IMDBDataModule(data_dir=str(data), representation="ngrams", max_ngrams=300, val_size=16, batch_size=16)
    model = NGramClassifier(input_shape=[300], optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    trainer = quiet_trainer(tmp_path, max_epochs=4, num_sanity_val_steps=0)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert after["val/loss"] < 0.5 * before and after["val/acc"] >= 0.9
    # The ratio was counted on the 48 training reviews: sentiment words point their way, test-only words are unknown.
    vocabulary = dm.vocabulary
    ratio = {w: model.nb_ratio[vocabulary.encode_tokens([[w]])[0]].item() for w in POSITIVE[:2] + NEGATIVE[:2]}
    assert min(ratio[w] for w in POSITIVE[:2]) > 0 > max(ratio[w] for w in NEGATIVE[:2])
    assert vocabulary.encode_tokens([[TEST_ONLY_WORD]])[0].tolist() == [OOV]
    # A review from the files encodes as its raw text does (the corpus path and the new-text path agree).
    path, _ = dm.files("test")[3]
    row = dm.encode_texts([path.read_text()])[0]
    test_bags = dm.encoded("test")
    assert torch.equal(row[row > 0], test_bags.flat[test_bags.offsets[3] : test_bags.offsets[4]].long())


def test_fast_config_trains_reloads_and_predicts_new_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_imdb(tmp_path / "data")
    common = ["-c", FAST, "--data.init_args.data_dir", str(data), "--data.init_args.max_ngrams", "500"]
    common += ["--model.init_args.input_shape", "[500]", "--data.init_args.val_size", "8"]
    common += ["--data.init_args.batch_size", "8", "--test_after_fit", "false"]
    fit = main(["fit", *common, "--trainer.max_epochs", "3"])
    assert fit.trainer.callback_metrics["val/acc"] >= 0.75

    best = fit.trainer.checkpoint_callback.best_model_path
    model = NGramClassifier.load_from_checkpoint(best)
    assert model.hparams.nb_weighting and torch.equal(model.nb_ratio, fit.model.nb_ratio)
    assert model.nb_ratio.abs().sum() > 0  # the fitted ratio, not the ones it starts with

    shutil.rmtree(data)  # the checkpoint alone (its n-gram vocabulary) scores new sentences
    sentences = tmp_path / "reviews.txt"
    sentences.write_text(f"the film was {' '.join(POSITIVE)}\nthe film was {' '.join(NEGATIVE)}\n")
    predict = main(["predict", *common, "--data.init_args.predict_file", str(sentences), "--ckpt_path", str(best)])
    probabilities = torch.cat(predict.trainer.predict_loop.predictions)
    assert probabilities[0] > 0.5 > probabilities[1]


def test_a_word_checkpoint_does_not_load_into_ngrams(tmp_path):
    data = write_imdb(tmp_path / "data")
    words = IMDBDataModule(data_dir=str(data), num_words=40, val_size=8)
    words.setup("fit")
    ngrams = IMDBDataModule(data_dir=str(data), representation="ngrams", max_ngrams=500, val_size=8)
    with pytest.raises(ValueError, match="representation='ngrams'"):
        ngrams.load_state_dict(words.state_dict())
