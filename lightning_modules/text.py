"""Text topics on IMDB (notes: *Preprocess Text data*, *RNN*, *RNN Tips*, *Words Embedding*, *Dropout*).

- :class:`MultiHotMLPClassifier`: top-N words multi-hot -> Dense 16 ReLU -> Dense 16 ReLU -> Dense 1 sigmoid,
  RMSprop 1e-3, BCE, batch 512; 4 epochs -> 88.5 % test in the book. The overfitting study (4-4, 512-512,
  L2 1e-3, dropout .5) are configs of the same class.
- :class:`SequenceClassifier`: Embedding -> [Conv1D front end] -> SimpleRNN / LSTM / GRU, stacked and/or
  bidirectional, with Keras' ``dropout`` and ``recurrent_dropout`` done right (:class:`VariationalRNN`), or a
  Conv1D-only model with global max pooling; optionally GloVe-format pretrained word vectors, frozen or not.

Every model emits one logit; ``task="binary"`` of the base module gives the sigmoid/BCE recipe, and
``predict`` returns P(positive review).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_modules.base import SupervisedModule
from lightning_modules.layers import LockedDropout
from lightning_modules.losses import Task
from lightning_modules.mlp import MLPClassifier

CellName = Literal["rnn", "lstm", "gru"]


class MultiHotMLPClassifier(MLPClassifier):
    """The book's IMDB MLP on multi-hot review vectors: an :class:`~lightning_modules.mlp.MLPClassifier` with
    the text defaults (16-16, no dropout, binary output) whose L1/L2 penalties spare the output layer, as
    the book's ``kernel_regularizer`` sits on the hidden Dense layers only (the notes: "no need to be used in
    the last layer").

    Args:
        hidden_units: Widths of the hidden Dense layers (the overfitting study: 4-4, 16-16, 512-512).
        dropout: Dropout after each hidden layer (the study's 0.5).
        **kwargs: See :class:`~lightning_modules.mlp.MLPClassifier` and the base module (``l2`` etc.).
    """

    def __init__(
        self,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.0,
        task: Task = "binary",
        num_classes: int = 2,
        input_shape: Sequence[int] = (10000,),
        **kwargs,
    ) -> None:
        super().__init__(
            hidden_units=hidden_units,
            dropout=dropout,
            task=task,
            num_classes=num_classes,
            input_shape=input_shape,
            **kwargs,
        )

    def regularized_weights(self) -> Iterator[Tensor]:
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        return (m.weight for m in linears[:-1])


# ---- variational (Keras-style) recurrent dropout ------------------------------------------------------------


class VariationalRNN(nn.Module):
    """Stacked, optionally bidirectional SimpleRNN/LSTM/GRU with Keras' ``dropout`` and ``recurrent_dropout``.

    Both dropouts draw ONE mask per sequence (and per layer and direction) and apply it at every time step:
    ``dropout`` to the layer's inputs, ``recurrent_dropout`` to the hidden state fed back into the recurrent
    kernel (Gal & Ghahramani's variational dropout; the notes: a mask that changes from step to step disrupts
    the error signal through time). ``nn.LSTM(dropout=...)`` is something else: a fresh mask between stacked
    layers only.

    The weights live in one single-layer ``nn.RNN``/``nn.LSTM``/``nn.GRU`` per stacked layer. Without recurrent
    dropout (or in eval mode, where dropout is off) those fused modules run as they are (cuDNN on a GPU); with it,
    a Python loop over time uses the same weights and PyTorch's gate equations (GRU: reset gate after the
    matmul, Keras' ``reset_after=True``), so both paths compute the same function. In a bidirectional layer the
    two directions share the input mask. Input and output are batch-first.

    Args:
        input_size: Features per time step.
        hidden_size: Units per direction.
        cell: ``rnn`` (SimpleRNN), ``lstm`` or ``gru``.
        num_layers: Stacked layers; all but the last return sequences (Keras ``return_sequences=True``).
        bidirectional: Run each layer forward and backward and concatenate (Keras ``Bidirectional``).
        dropout: Input dropout rate of every layer, one mask per sequence.
        recurrent_dropout: Dropout rate of the recurrent state, one mask per sequence.
        nonlinearity: ``tanh`` or ``relu`` for the SimpleRNN cell.
        return_sequences: Return all steps ``(B, T, D*H)`` instead of the final state ``(B, D*H)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        cell: CellName = "lstm",
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        nonlinearity: Literal["tanh", "relu"] = "tanh",
        return_sequences: bool = False,
    ) -> None:
        super().__init__()
        if cell not in ("rnn", "lstm", "gru"):
            raise ValueError(f"cell={cell!r}: choose 'rnn' (SimpleRNN), 'lstm' or 'gru'.")
        if not 0.0 <= recurrent_dropout < 1.0:
            raise ValueError(f"recurrent_dropout must be in [0, 1), got {recurrent_dropout}")
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers}: a recurrent network needs at least one layer.")
        self.cell, self.hidden_size, self.recurrent_dropout = cell, hidden_size, recurrent_dropout
        self.directions = 2 if bidirectional else 1
        self.return_sequences = return_sequences
        self.nonlinearity = nonlinearity
        self.input_dropout = nn.ModuleList(LockedDropout(dropout) for _ in range(num_layers))
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            size = input_size if i == 0 else hidden_size * self.directions
            if cell == "rnn":
                layer = nn.RNN(
                    size, hidden_size, nonlinearity=nonlinearity, batch_first=True, bidirectional=bidirectional
                )
            else:
                layer = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](
                    size, hidden_size, batch_first=True, bidirectional=bidirectional
                )
            self.layers.append(layer)

    @property
    def out_features(self) -> int:
        return self.hidden_size * self.directions

    def forward(self, x: Tensor) -> Tensor:
        fused = self.recurrent_dropout == 0.0 or not self.training
        for dropout, layer in zip(self.input_dropout, self.layers, strict=True):
            x = dropout(x)
            if fused:
                x, _ = layer(x)
            else:
                suffixes = ["", "_reverse"][: self.directions]
                x = torch.cat([self._loop(layer, x, s, reverse=s == "_reverse") for s in suffixes], dim=-1)
        if self.return_sequences:
            return x
        last = x[:, -1, : self.hidden_size]  # the forward direction ends at the last step ...
        if self.directions == 2:  # ... the backward one at the first
            last = torch.cat([last, x[:, 0, self.hidden_size :]], dim=-1)
        return last

    def _loop(self, layer: nn.RNNBase, x: Tensor, suffix: str, reverse: bool) -> Tensor:
        """One direction of one layer, step by step, with a recurrent mask drawn once for the sequence."""
        w_ih, w_hh = getattr(layer, f"weight_ih_l0{suffix}"), getattr(layer, f"weight_hh_l0{suffix}")
        b_ih, b_hh = getattr(layer, f"bias_ih_l0{suffix}"), getattr(layer, f"bias_hh_l0{suffix}")
        batch, steps, _ = x.shape
        x_proj = F.linear(x, w_ih, b_ih)  # every step's input projection at once
        p = self.recurrent_dropout
        mask = x.new_empty(batch, self.hidden_size).bernoulli_(1.0 - p).div_(1.0 - p)
        h = x.new_zeros(batch, self.hidden_size)
        c = x.new_zeros(batch, self.hidden_size)
        act = torch.tanh if self.nonlinearity == "tanh" else torch.relu
        outputs = []
        for t in range(steps - 1, -1, -1) if reverse else range(steps):
            gi, gh = x_proj[:, t], F.linear(h * mask, w_hh, b_hh)
            if self.cell == "lstm":
                i, f, g, o = (gi + gh).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            elif self.cell == "gru":
                ir, iz, in_ = gi.chunk(3, dim=1)
                hr, hz, hn = gh.chunk(3, dim=1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                h = (1 - z) * torch.tanh(in_ + r * hn) + z * h
            else:
                h = act(gi + gh)
            outputs.append(h)
        if reverse:
            outputs.reverse()
        return torch.stack(outputs, dim=1)


# ---- pretrained word vectors ------------------------------------------------------------------------------


def load_word_vectors(path: str | Path, words: Sequence[str], dim: int) -> tuple[Tensor, Tensor]:
    """Vectors for ``words`` from a GloVe-format text file (``word v1 ... v_dim`` per line, optionally ``.gz``).

    Returns ``(vectors (len(words), dim), found (len(words),) bool)``; words the file lacks get zero rows (the
    book's recipe). A word2vec-style first line ``<count> <dim>`` is skipped. A line with another number of
    values is a ``ValueError`` naming the file, the line and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Word-vector file {path} not found. Download GloVe (e.g. glove.6B.100d.txt from the Stanford GloVe "
            "page) and set --model.init_args.embedding_file to its path."
        )
    wanted = {w: i for i, w in enumerate(words)}
    vectors = torch.zeros(len(words), dim)
    found = torch.zeros(len(words), dtype=torch.bool)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            parts = line.rstrip().split(" ")
            if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec text header
            if len(parts) - 1 != dim:
                raise ValueError(
                    f"{path}, line {number}: {len(parts) - 1} values after the word {parts[0]!r}, but the embedding "
                    f"has embedding_dim={dim}. Set --model.init_args.embedding_dim to the file's dimension (e.g. "
                    "100 for glove.6B.100d.txt), or use a file of that dimension."
                )
            index = wanted.get(parts[0])
            if index is not None and not found[index]:
                try:
                    vectors[index] = torch.tensor([float(v) for v in parts[1:]])
                except ValueError:
                    raise ValueError(f"{path}, line {number}: non-numeric values after {parts[0]!r}.") from None
                found[index] = True
    return vectors, found


# ---- the sequence classifier ------------------------------------------------------------------------------


class SequenceNet(nn.Module):
    """Embedding -> [Conv1D (ReLU), max pooling between convs] -> recurrent last state or global max pool -> Dense."""

    def __init__(
        self,
        num_words: int,
        embedding_dim: int,
        cell: CellName | Literal["none"],
        units: int,
        num_layers: int,
        bidirectional: bool,
        dropout: float,
        recurrent_dropout: float,
        conv_filters: Sequence[int],
        conv_kernel_size: int,
        pool_size: int,
        out_features: int,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_words, embedding_dim)
        convs: list[nn.Module] = []
        channels = embedding_dim
        for i, filters in enumerate(conv_filters):
            if i:
                convs.append(nn.MaxPool1d(pool_size))  # Keras MaxPooling1D: 'valid', stride = pool size
            convs += [nn.Conv1d(channels, filters, conv_kernel_size), nn.ReLU()]
            channels = filters
        self.conv = nn.Sequential(*convs)
        self.rnn = None
        if cell != "none":
            self.rnn = VariationalRNN(
                channels, units, cell, num_layers, bidirectional, dropout, recurrent_dropout, nonlinearity="tanh"
            )
            channels = self.rnn.out_features
        self.head = nn.Linear(channels, out_features)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embedding(x.long())  # (B, T, E)
        if len(self.conv):
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)  # Conv1d wants (B, C, T)
        h = self.rnn(h) if self.rnn is not None else h.amax(dim=1)  # last state, or GlobalMaxPooling1D
        return self.head(h)


class SequenceClassifier(SupervisedModule):
    """Reviews as word-index sequences -> Embedding -> RNN family / Conv1D -> one logit.

    Book recipes (``configs/imdb``): Embedding 32 -> SimpleRNN 32 (~85 % val), -> LSTM 32 (~89 %),
    Bidirectional LSTM 32 (~88.6 %); Embedding 128 -> Conv1D 32 k7 -> MaxPool 5 -> Conv1D 32 k7 -> GlobalMaxPool
    (~84 %); Conv1D front end before a GRU (the notes' cheap way through long sequences); GloVe 100-d vectors in
    a frozen embedding.

    Args:
        num_words: Embedding rows; must equal the datamodule's ``num_words``.
        embedding_dim: Width of the word vectors (100 for glove.6B.100d).
        cell: ``rnn`` (SimpleRNN), ``lstm``, ``gru``, or ``none`` for a Conv1D-only model.
        units: Recurrent units per direction.
        num_layers: Stacked recurrent layers (all but the last return sequences).
        bidirectional: Keras ``Bidirectional`` around each recurrent layer.
        dropout: Keras recurrent ``dropout``: input dropout, one mask per sequence.
        recurrent_dropout: Keras ``recurrent_dropout``: one mask per sequence on the recurrent state (runs a
            Python loop over time steps; 0 keeps the fused cuDNN path).
        conv_filters: Filters of each Conv1D layer before the recurrent part (empty: none).
        conv_kernel_size: Conv1D kernel size.
        pool_size: Max-pooling size between consecutive Conv1D layers.
        embedding_file: GloVe-format text file loaded into the embedding at the start of ``fit`` (coverage is
            reported); ``None`` learns the embedding from scratch.
        freeze_embedding: Keep the embedding fixed during training (the book freezes pretrained vectors).
        **kwargs: See :class:`~lightning_modules.base.SupervisedModule`.
    """

    def __init__(
        self,
        num_words: int = 10000,
        embedding_dim: int = 32,
        cell: CellName | Literal["none"] = "lstm",
        units: int = 32,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        conv_filters: Sequence[int] = (),
        conv_kernel_size: int = 7,
        pool_size: int = 5,
        embedding_file: str | None = None,
        freeze_embedding: bool = False,
        task: Task = "binary",
        num_classes: int = 2,
        input_shape: Sequence[int] = (500,),
        **kwargs,
    ) -> None:
        super().__init__(task=task, num_classes=num_classes, input_shape=input_shape, **kwargs)
        if len(self.input_shape) != 1:
            raise ValueError(f"input_shape={list(input_shape)}: a sequence model takes [maxlen].")
        self.net = SequenceNet(
            num_words,
            embedding_dim,
            cell,
            units,
            num_layers,
            bidirectional,
            dropout,
            recurrent_dropout,
            conv_filters,
            conv_kernel_size,
            pool_size,
            self.out_features,
        )
        steps = self.input_shape[0]
        for i, _ in enumerate(conv_filters):  # 'valid' convs and pools shorten the sequence
            steps = (steps // pool_size if i else steps) - conv_kernel_size + 1
        if steps < 1:
            raise ValueError(
                f"input_shape={list(input_shape)}: {len(conv_filters)} Conv1D layers of kernel {conv_kernel_size} with "
                f"max pooling {pool_size} between them need longer sequences. Raise maxlen (data and input_shape) "
                "or use fewer/smaller convolutions."
            )
        self.example_input_array = torch.zeros(2, *self.input_shape, dtype=torch.long)
        self.init_weights()
        if self.hparams.init == "keras":
            nn.init.uniform_(self.net.embedding.weight, -0.05, 0.05)  # Keras Embedding default
        self.net.embedding.weight.requires_grad_(not freeze_embedding)
        self.embedding_coverage: float | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        hparams = getattr(datamodule, "hparams", None)
        data_words = hparams.get("num_words") if hparams is not None else None
        if data_words is not None and data_words != self.hparams.num_words:
            raise ValueError(
                f"{type(datamodule).__name__} indexes {data_words} words but the model's embedding has num_words="
                f"{self.hparams.num_words} rows. Set --model.init_args.num_words {data_words}."
            )
        if stage == "fit" and self.hparams.embedding_file and datamodule is not None:
            self.load_embedding(datamodule.vocabulary.words)

    @torch.no_grad()
    def load_embedding(self, words: Sequence[str]) -> float:
        """Copy ``embedding_file`` vectors into the rows of ``words`` (row ``i + 2`` for ``words[i]``, rows 0 and 1
        being padding and OOV); rows of words the file lacks become zero, as in the book. Returns the coverage."""
        weight = self.net.embedding.weight
        vectors, found = load_word_vectors(self.hparams.embedding_file, words, weight.shape[1])
        weight.zero_()
        weight[2 : 2 + len(words)] = vectors.to(weight)
        self.embedding_coverage = float(found.float().mean()) if len(words) else 0.0
        rank_zero_info(
            f"{self.hparams.embedding_file}: vectors for {int(found.sum())} of {len(words)} vocabulary words "
            f"({100 * self.embedding_coverage:.1f} % coverage); the others start at zero"
            + (" and stay there (frozen)." if self.hparams.freeze_embedding else ".")
        )
        return self.embedding_coverage
