"""Pinecone (serverless) as Sluice's vector store: one index, one namespace per collection.

Pinecone keeps metadata flat, so a chunk's record is its fixed fields (doc_id, position, text,
source, title, content_hash), `metadata_json` (the user metadata as JSON, returned as it was
given), and a copy of each scalar user metadata value under `m_<key>` for filtering. The prefix
keeps user keys from clashing with the fixed ones. Only str/int/float/bool values are copied:
Pinecone would match a list value by membership, which Milvus does not, and the two backends
must filter alike.

Pinecone has no BM25 over stored text: `search_text` raises LexicalSearchUnsupported. Reads are
eventually consistent: a write shows up in searches and counts after a short delay.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from pinecone import Pinecone, ServerlessSpec

from shared.settings import Settings
from shared.vectorstores.base import (
    FILTER_COLUMNS,
    FILTER_KEY,
    Chunk,
    Filters,
    Hit,
    LexicalSearchUnsupported,
    filter_values,
)

META_PREFIX = "m_"
UPSERT_BATCH = 100  # a request is capped at 2 MB; 100 chunks of text plus 384 floats stay under
CREATE_TIMEOUT_S = 300


class PineconeStore:
    name = "pinecone"

    def __init__(self, client: Pinecone, index: Any, namespace: str, dim: int) -> None:
        self._client = client
        self._index = index
        self._namespace = namespace
        self.dim = dim

    @classmethod
    def open(cls, settings: Settings, dim: int) -> PineconeStore:
        if not settings.pinecone_api_key:
            raise ValueError("vector_store=pinecone needs SLUICE_PINECONE_API_KEY")
        client = Pinecone(api_key=settings.pinecone_api_key)
        name = settings.pinecone_index
        if not client.has_index(name):
            # Blocks until the index is ready (or raises after the timeout).
            client.create_index(
                name=name,
                dimension=dim,
                metric="cosine",
                spec=ServerlessSpec(cloud=settings.pinecone_cloud, region=settings.pinecone_region),
                timeout=CREATE_TIMEOUT_S,
            )
        index = client.Index(name)
        found = index.describe_index_stats().dimension
        if found is not None and int(found) != dim:
            raise RuntimeError(
                f"Pinecone index {name!r} holds {found}-d vectors but the embedding model makes "
                f"{dim}-d ones: set SLUICE_PINECONE_INDEX to another index"
            )
        return cls(client, index, settings.collection, dim)

    def upsert(self, chunks: Sequence[Chunk], vectors: Sequence[Sequence[float]]) -> None:
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        records = [
            {"id": c.id, "values": list(v), "metadata": to_metadata(c)}
            for c, v in zip(chunks, vectors, strict=True)
        ]
        # Batched here rather than with upsert(batch_size=...): that reports a failed batch in
        # its response instead of raising, and a half-written document must not pass silently.
        for start in range(0, len(records), UPSERT_BATCH):
            batch = records[start : start + UPSERT_BATCH]
            self._index.upsert(vectors=batch, namespace=self._namespace, show_progress=False)

    def delete_stale(self, doc_id: str, keep_hash: str) -> None:
        stale = {"doc_id": {"$eq": doc_id}, "content_hash": {"$ne": keep_hash}}
        self._index.delete(filter=stale, namespace=self._namespace)

    def delete_document(self, doc_id: str) -> None:
        self._index.delete(filter={"doc_id": {"$eq": doc_id}}, namespace=self._namespace)

    def document_hash(self, doc_id: str) -> str | None:
        # Every indexed document has a chunk at position 0, and a fetch by id is one cheap call.
        first = f"{doc_id}#0"
        vectors = self._index.fetch(ids=[first], namespace=self._namespace).vectors
        return vectors[first].metadata["content_hash"] if first in vectors else None

    def count(self, doc_id: str | None = None) -> int:
        if doc_id is None:
            stats = self._index.describe_index_stats()
            summary = stats.namespaces.get(self._namespace)
            return int(summary.vector_count) if summary else 0
        return sum(1 for _ in self._chunk_ids(doc_id))

    def search(
        self, vector: Sequence[float], top_k: int, filters: Filters | None = None
    ) -> list[Hit]:
        response = self._index.query(
            vector=list(vector),
            top_k=top_k,
            namespace=self._namespace,
            filter=metadata_filter(filters) or None,
            include_metadata=True,
        )
        # With the cosine metric the score is the cosine similarity: higher is better.
        return [Hit(to_chunk(m.id, m.metadata), float(m.score)) for m in response.matches]

    def search_text(self, query: str, top_k: int, filters: Filters | None = None) -> list[Hit]:
        raise LexicalSearchUnsupported("Pinecone dense indexes have no BM25 over stored text")

    def close(self) -> None:
        self._index.close()
        self._client.close()

    def _chunk_ids(self, doc_id: str) -> Iterator[str]:
        # Ids are f"{doc_id}#{position}"; the digits check keeps doc "a" from counting "a#b#0".
        prefix = f"{doc_id}#"
        for page in self._index.list(prefix=prefix, namespace=self._namespace):
            for item in page.vectors:
                if item.id and item.id[len(prefix) :].isdigit():
                    yield item.id


def to_metadata(chunk: Chunk) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "doc_id": chunk.doc_id,
        "position": chunk.position,
        "text": chunk.text,
        "source": chunk.source,
        "title": chunk.title,
        "content_hash": chunk.content_hash,
        "metadata_json": json.dumps(chunk.metadata, ensure_ascii=False),
    }
    for key, value in chunk.metadata.items():
        if FILTER_KEY.match(key) and isinstance(value, (str, int, float, bool)):
            metadata[META_PREFIX + key] = value
    return metadata


def to_chunk(chunk_id: str, metadata: dict[str, Any]) -> Chunk:
    return Chunk(
        id=chunk_id,
        doc_id=metadata["doc_id"],
        position=int(metadata["position"]),  # Pinecone stores numbers as floats
        text=metadata["text"],
        source=metadata["source"],
        title=metadata["title"],
        content_hash=metadata["content_hash"],
        metadata=json.loads(metadata.get("metadata_json") or "{}"),
    )


def metadata_filter(filters: Filters | None) -> dict[str, Any]:
    """`{key: value | [values]}`, ANDed, in Pinecone's filter language ({} for none)."""
    result: dict[str, Any] = {}
    for key, value in (filters or {}).items():
        values = filter_values(key, value)
        field = key if key in FILTER_COLUMNS else META_PREFIX + key
        is_list = isinstance(value, (list, tuple))
        result[field] = {"$in": values} if is_list else {"$eq": values[0]}
    return result
