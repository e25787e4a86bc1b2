"""Milvus as Sluice's vector store: a server (`http://host:19530`) or embedded Milvus Lite (a
`.db` file), through the same MilvusClient code.

One collection holds every chunk. Besides the dense vector, Milvus derives a sparse BM25 vector
from `text` itself (a BM25 Function), so lexical search needs no second system and no
client-side vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pymilvus import CollectionSchema, DataType, Function, FunctionType, MilvusClient
from pymilvus.exceptions import MilvusException
from pymilvus.milvus_client.index import IndexParams

from shared.settings import Settings
from shared.vectorstores.base import FILTER_COLUMNS, Chunk, Filters, Hit, filter_values

FIELDS = ["id", "doc_id", "position", "text", "source", "title", "content_hash", "metadata"]
# Ingestion and tests read right after writing: every request waits for all earlier writes.
STRONG = "Strong"
UPSERT_BATCH = 256  # rows per request, well under the gRPC message limit for 384-d vectors
# Lengths: Milvus Lite counts VARCHAR characters, some servers bytes; room for 4-byte UTF-8.
TITLE_CHARS = 1000


class MilvusStore:
    name = "milvus"

    def __init__(self, client: MilvusClient, collection: str, dim: int) -> None:
        self._client = client
        self._collection = collection
        self.dim = dim

    @classmethod
    def open(cls, settings: Settings, dim: int) -> MilvusStore:
        client = connect(settings.milvus_uri, settings.milvus_token.get_secret_value())
        name = settings.collection
        if client.has_collection(name):
            check_dim(client, name, dim)
            client.load_collection(name)  # a server may hold it released; a no-op if loaded
        else:
            client.create_collection(
                name,
                schema=make_schema(dim),
                index_params=make_index_params(client),
                consistency_level=STRONG,
            )
        return cls(client, name, dim)

    def upsert(self, chunks: Sequence[Chunk], vectors: Sequence[Sequence[float]]) -> None:
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        rows = [to_row(chunk, vector) for chunk, vector in zip(chunks, vectors, strict=True)]
        for start in range(0, len(rows), UPSERT_BATCH):
            self._client.upsert(self._collection, rows[start : start + UPSERT_BATCH])

    def delete_stale(self, doc_id: str, keep_hash: str) -> None:
        expr = f"doc_id == {quote(doc_id)} and content_hash != {quote(keep_hash)}"
        self._client.delete(self._collection, filter=expr)

    def delete_document(self, doc_id: str) -> None:
        self._client.delete(self._collection, filter=f"doc_id == {quote(doc_id)}")

    def document_hash(self, doc_id: str) -> str | None:
        rows = self._client.query(
            self._collection,
            filter=f"doc_id == {quote(doc_id)}",
            output_fields=["content_hash"],
            limit=1,
            consistency_level=STRONG,
        )
        return rows[0]["content_hash"] if rows else None

    def count(self, doc_id: str | None = None) -> int:
        expr = f"doc_id == {quote(doc_id)}" if doc_id is not None else ""
        rows = self._client.query(
            self._collection, filter=expr, output_fields=["count(*)"], consistency_level=STRONG
        )
        return int(rows[0]["count(*)"])

    def search(
        self, vector: Sequence[float], top_k: int, filters: Filters | None = None
    ) -> list[Hit]:
        # COSINE "distance" is the similarity itself: higher is better.
        return self._search([list(vector)], "dense", "COSINE", top_k, filters)

    def search_text(self, query: str, top_k: int, filters: Filters | None = None) -> list[Hit]:
        if not query.strip():
            return []
        # Milvus Lite reports BM25 as a negated distance, a server as the positive score; BM25 is
        # never negative, so the magnitude is the score either way. (Not for cosine, which can be.)
        hits = self._search([query], "sparse", "BM25", top_k, filters)
        return [Hit(h.chunk, abs(h.score)) for h in hits]

    def _search(
        self, data: list[Any], field: str, metric: str, top_k: int, filters: Filters | None
    ) -> list[Hit]:
        results = self._client.search(
            self._collection,
            data=data,
            anns_field=field,
            search_params={"metric_type": metric},
            limit=top_k,
            filter=filter_expr(filters),
            output_fields=FIELDS,
            consistency_level=STRONG,
        )
        return [Hit(to_chunk(r["entity"]), float(r["distance"])) for r in results[0]]

    def close(self) -> None:
        self._client.close()


def connect(uri: str, token: str = "") -> MilvusClient:
    if uri.startswith(("http://", "https://", "tcp://", "unix:")):
        return MilvusClient(uri=uri, token=token)
    path = Path(uri).expanduser().resolve()
    if path.suffix != ".db":
        raise ValueError(f"milvus_uri {uri!r}: a Milvus Lite file must end in .db")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=str(path))
    except MilvusException as e:
        raise RuntimeError(
            f"cannot open Milvus Lite at {path}: a Lite file serves one process at a time; "
            "for several processes point SLUICE_MILVUS_URI at a Milvus server"
        ) from e


def make_schema(dim: int) -> CollectionSchema:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=512)
    schema.add_field("position", DataType.INT64)
    schema.add_field("text", DataType.VARCHAR, max_length=65535, enable_analyzer=True)
    schema.add_field("source", DataType.VARCHAR, max_length=4096)
    schema.add_field("title", DataType.VARCHAR, max_length=4 * TITLE_CHARS)
    schema.add_field("content_hash", DataType.VARCHAR, max_length=128)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(
        Function(
            name="text_bm25",
            function_type=FunctionType.BM25,
            input_field_names=["text"],
            output_field_names=["sparse"],
        )
    )
    return schema


def make_index_params(client: MilvusClient) -> IndexParams:
    params = client.prepare_index_params()
    params.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
    params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    return params


def check_dim(client: MilvusClient, collection: str, dim: int) -> None:
    fields = {f["name"]: f for f in client.describe_collection(collection)["fields"]}
    if "dense" not in fields or "sparse" not in fields:
        raise RuntimeError(f"Milvus collection {collection!r} exists but is not a Sluice one")
    found = int(fields["dense"]["params"]["dim"])
    if found != dim:
        raise RuntimeError(
            f"Milvus collection {collection!r} holds {found}-d vectors but the embedding model "
            f"makes {dim}-d ones: use another collection or re-ingest into a new one"
        )


def to_row(chunk: Chunk, vector: Sequence[float]) -> dict[str, Any]:
    return {
        "id": chunk.id,
        "doc_id": chunk.doc_id,
        "position": chunk.position,
        "text": chunk.text,
        "source": chunk.source,
        # Display-only and from arbitrary HTML: clipped rather than failing the document.
        "title": chunk.title[:TITLE_CHARS],
        "content_hash": chunk.content_hash,
        "metadata": chunk.metadata,
        "dense": list(vector),
    }


def to_chunk(entity: dict[str, Any]) -> Chunk:
    return Chunk(
        id=entity["id"],
        doc_id=entity["doc_id"],
        position=int(entity["position"]),
        text=entity["text"],
        source=entity["source"],
        title=entity["title"],
        content_hash=entity["content_hash"],
        metadata=entity.get("metadata") or {},
    )


def filter_expr(filters: Filters | None) -> str:
    """`{key: value | [values]}`, ANDed, as a Milvus boolean expression ("" for none)."""
    return " and ".join(condition(k, v) for k, v in (filters or {}).items())


def condition(key: str, value: Any) -> str:
    values = filter_values(key, value)
    field = key if key in FILTER_COLUMNS else f'metadata["{key}"]'
    # Milvus Lite's parser rejects `in` on a JSON path, so "any of" is ORed equalities.
    return "(" + " or ".join(f"{field} == {literal(key, v)}" for v in values) + ")"


def literal(key: str, value: str | int | float | bool) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    try:
        return quote(value)
    except ValueError as e:
        raise ValueError(f"filter {key!r}: {e}") from None


def quote(text: str) -> str:
    # JSON string escapes (\" \\ \n \t \r) are what Milvus parses; its parser has no \u escape,
    # so the control characters JSON would write that way are refused instead.
    if any(ord(c) < 0x20 and c not in "\n\r\t" for c in text):
        raise ValueError("control characters are not allowed")
    return json.dumps(text, ensure_ascii=False)
