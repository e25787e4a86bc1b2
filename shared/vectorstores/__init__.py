"""Vector stores behind one small interface (base.py); one file per backend."""

from __future__ import annotations

from shared.settings import Settings
from shared.vectorstores.base import VectorStore


def open_store(settings: Settings, dim: int) -> VectorStore:
    # Imported here: each backend pulls in its own client library.
    if settings.vector_store == "pinecone":
        from shared.vectorstores.pinecone import PineconeStore

        return PineconeStore.open(settings, dim)
    from shared.vectorstores.milvus import MilvusStore

    return MilvusStore.open(settings, dim)
