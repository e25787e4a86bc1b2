"""Split a document's text into chunks that the embedding model sees whole.

Sizes are counted in the embedding model's own tokens: a chunk longer than the model's window
would be silently truncated when embedded, and its tail could never be retrieved.
"""

from __future__ import annotations

from typing import Any

from langchain_text_splitters import RecursiveCharacterTextSplitter

from shared.embeddings import Embedder
from shared.settings import Settings


class Chunker:
    def __init__(
        self, tokenizer: Any, max_tokens: int, chunk_tokens: int, overlap_tokens: int
    ) -> None:
        # The model's window includes its special tokens ([CLS], [SEP] for MiniLM).
        window = max_tokens - tokenizer.num_special_tokens_to_add()
        self.tokenizer = tokenizer
        self.chunk_tokens = max(1, min(chunk_tokens, window))
        # Capped so that a chunk size capped by the window still makes progress.
        self.overlap_tokens = min(overlap_tokens, self.chunk_tokens // 2)
        self._splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            tokenizer, chunk_size=self.chunk_tokens, chunk_overlap=self.overlap_tokens
        )

    @classmethod
    def for_embedder(cls, embedder: Embedder, settings: Settings) -> Chunker:
        return cls(
            embedder.tokenizer,
            embedder.max_tokens,
            settings.chunk_tokens,
            settings.chunk_overlap_tokens,
        )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.tokenize(text))

    def split(self, text: str) -> list[str]:
        """The chunks in document order (a chunk's position is its index), none empty."""
        chunks: list[str] = []
        for chunk in self._splitter.split_text(text):
            chunks.extend(self._fit(chunk))
        return [c for c in chunks if c.strip()]

    def _fit(self, chunk: str) -> list[str]:
        """The splitter adds up token counts of pieces, which can undercount the joined text;
        cut any chunk that still overflows at token boundaries."""
        if self.count_tokens(chunk) <= self.chunk_tokens:
            return [chunk]
        spans = self.tokenizer(
            chunk, add_special_tokens=False, return_offsets_mapping=True
        ).offset_mapping
        step = self.chunk_tokens
        return [
            chunk[spans[i][0] : spans[min(i + step, len(spans)) - 1][1]]
            for i in range(0, len(spans), step)
        ]
