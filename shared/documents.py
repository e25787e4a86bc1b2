"""A document's ingestion status, kept in Redis: written by ingestion, read by the API.

queued  -> the API (or `sluice ingest`) put it on sluice.ingest
indexed -> its chunks are in the vector store (`chunks` of them)
deleted -> its chunks were removed
failed  -> it could not be ingested (`error` says why); earlier chunks, if any, are untouched

Each status expires SLUICE_DOCUMENT_STATUS_TTL_S (a week) after its last change: a receipt,
not a catalogue, so the keyspace does not grow with every document ever sent.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import unicodedata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from redis.asyncio import Redis

from shared.messages import DOC_ID_MAX, ContentType, IngestDocument, MetadataValue
from shared.settings import Settings

Status = Literal["queued", "indexed", "deleted", "failed"]


class DocumentStatus(BaseModel):
    doc_id: str
    status: Status
    chunks: int = 0
    error: str | None = None
    source: str = ""
    updated_at: float = 0.0


async def set_status(redis: Redis, settings: Settings, status: DocumentStatus) -> None:
    status = status.model_copy(update={"updated_at": time.time()})
    key, ttl = settings.document_key(status.doc_id), settings.document_status_ttl_s
    await redis.set(key, status.model_dump_json(), ex=ttl)


async def get_status(redis: Redis, settings: Settings, doc_id: str) -> DocumentStatus | None:
    raw = await redis.get(settings.document_key(doc_id))
    return DocumentStatus.model_validate_json(raw) if raw else None


# --- Building the ingest message from a file: used by `POST /documents` uploads and by
# `sluice ingest PATH...`, so both name and type documents the same way.

CONTENT_TYPES: dict[str, ContentType] = {
    ".txt": "text/plain",
    ".text": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
}

# Characters outside IngestDocument.doc_id's alphabet (DOC_ID_PATTERN)
_NOT_ID_CHAR = re.compile(r"[^A-Za-z0-9._:/@-]+")

# --- building documents --------------------------------------------------------------------


def content_type_for(name: str) -> ContentType:
    suffix = Path(name).suffix.lower()
    try:
        return CONTENT_TYPES[suffix]
    except KeyError:
        known = ", ".join(sorted(CONTENT_TYPES))
        raise ValueError(f"unsupported file type {suffix or '(none)'!r}; known: {known}") from None


def sanitize_doc_id(name: str) -> str:
    """A valid doc_id for `name`: accents dropped, other characters outside the allowed set
    replaced by '_'. Too long or empty results get a hash of `name` so ids stay distinct."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    doc_id = _NOT_ID_CHAR.sub("_", ascii_name).strip("_")
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    if not doc_id:
        return f"doc-{digest}"
    if len(doc_id) > DOC_ID_MAX:
        return f"{doc_id[: DOC_ID_MAX - len(digest) - 1]}-{digest}"
    return doc_id


def document_from_bytes(
    name: str,
    data: bytes,
    doc_id: str | None = None,
    title: str | None = None,
    metadata: dict[str, MetadataValue] | None = None,
) -> IngestDocument:
    """An upsert of the file `name` (its extension gives the content type) holding `data`.
    Raises ValueError for an unknown type, pydantic's ValidationError for a bad doc_id/title."""
    content_type = content_type_for(name)
    body: dict[str, str] = {}
    if content_type == "application/pdf":
        body["data_b64"] = base64.b64encode(data).decode("ascii")
    else:
        # Tolerant: one stray byte should not cost a whole document.
        body["text"] = data.decode("utf-8-sig", errors="replace")
    return IngestDocument(
        doc_id=doc_id or sanitize_doc_id(name),
        source=name[:1000],
        title=title,
        content_type=content_type,
        metadata=dict(metadata or {}),
        enqueued_at=time.time(),
        **body,
    )


def document_from_file(
    path: str | Path,
    root: str | Path | None = None,
    metadata: dict[str, MetadataValue] | None = None,
) -> IngestDocument:
    """An upsert of the file at `path`; its doc_id is its path relative to `root` (the file
    name when no root is given), so ingesting a folder again replaces the same documents.
    Symbolic links keep the name they were found under (not resolved)."""
    path = Path(path)
    if root is None:
        name = path.name
    else:
        try:
            name = path.absolute().relative_to(Path(root).absolute()).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not inside {root}") from None
    content_type_for(path.name)  # fail on an unknown type before reading the file
    return document_from_bytes(name, path.read_bytes(), metadata=metadata)
