"""What a vector store must do for Sluice: keep chunks with their vectors and metadata, replace a
document's chunks without leaving old ones behind, and search densely (and lexically, if it can).

Filters are the same on every backend: `{field: value}` or `{field: [v1, v2]}` (any of), ANDed,
where field is `doc_id`, `source`, or a key of the document's user metadata.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Filters = dict[str, Any]
FILTER_COLUMNS = {"doc_id", "source"}  # filterable as themselves; other keys are user metadata
FILTER_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def filter_values(key: str, value: Any) -> list[str | int | float | bool]:
    """The values one filter entry accepts (one, or any of a list), checked the same way for
    every backend: a ValueError names the key and what is wrong with it."""
    if not FILTER_KEY.match(key):
        raise ValueError(f"filter key {key!r}: letters, digits and _ only")
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"filter {key!r}: empty list")
    for v in values:
        if key in FILTER_COLUMNS and not isinstance(v, str):
            raise ValueError(f"filter {key!r}: must be a string, not {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"filter {key!r}: {v} is not a finite number")
        if not isinstance(v, (str, int, float, bool)):
            raise ValueError(
                f"filter {key!r}: only str, int, float and bool, not {type(v).__name__}"
            )
    return values


@dataclass(frozen=True)
class Chunk:
    id: str  # f"{doc_id}#{position}": re-ingesting a document overwrites its chunks in place
    doc_id: str
    position: int
    text: str
    source: str
    title: str
    content_hash: str  # of the whole document: tells a changed document from an unchanged one
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # higher is better; cosine similarity for dense search


class LexicalSearchUnsupported(NotImplementedError):
    """The backend has no BM25; retrieval falls back to dense search alone."""


class VectorStore(Protocol):
    name: str
    dim: int

    def upsert(self, chunks: Sequence[Chunk], vectors: Sequence[Sequence[float]]) -> None: ...

    def delete_stale(self, doc_id: str, keep_hash: str) -> None:
        """Remove the chunks of `doc_id` whose content hash is not `keep_hash`."""
        ...

    def delete_document(self, doc_id: str) -> None: ...

    def document_hash(self, doc_id: str) -> str | None:
        """The content hash stored with the document's chunks, None if it has none."""
        ...

    def count(self, doc_id: str | None = None) -> int: ...

    def search(
        self, vector: Sequence[float], top_k: int, filters: Filters | None = None
    ) -> list[Hit]: ...

    def search_text(self, query: str, top_k: int, filters: Filters | None = None) -> list[Hit]:
        """BM25 over the chunk texts; raises LexicalSearchUnsupported where there is none."""
        ...

    def close(self) -> None: ...
