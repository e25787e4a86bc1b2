"""Handlers of /documents: put documents on `sluice.ingest` and report their status.

The API neither parses nor embeds documents: the ingestion process does, off the request path.
A document is `queued` once it is on Kafka; ingestion moves it to indexed, deleted or failed.
"""

from __future__ import annotations

import hashlib
import json
import time

from aiokafka import AIOKafkaProducer
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from redis.asyncio import Redis
from starlette.datastructures import UploadFile

from api.errors import invalid_field, unavailable
from api.schemas import DocumentAccepted, DocumentBody
from shared.documents import DocumentStatus, document_from_bytes, get_status, set_status
from shared.messages import IngestDocument
from shared.settings import Settings


class DocumentsHandler:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer, redis: Redis) -> None:
        self.settings = settings
        self.producer = producer
        self.redis = redis

    async def add(self, request: Request) -> DocumentAccepted:
        """JSON (`DocumentBody`) or a multipart upload, by the request's content type."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise invalid_field("file", "a multipart upload needs a 'file' part")
            fields = {k: form.get(k) for k in ("doc_id", "title", "metadata")}
            strings = {k: v if isinstance(v, str) else None for k, v in fields.items()}
            return await self.add_upload(file, **strings)
        try:
            body = DocumentBody.model_validate(await request.json())
        except ValueError as e:
            raise RequestValidationError(_errors(e)) from e
        return await self.add_json(body)

    async def add_json(self, body: DocumentBody) -> DocumentAccepted:
        if len(body.text.encode()) > self.settings.max_document_bytes:
            raise _too_large(self.settings)
        doc_id = body.doc_id or "doc-" + hashlib.sha256(body.text.encode()).hexdigest()[:16]
        message = IngestDocument(
            doc_id=doc_id,
            source=body.source,
            title=body.title,
            content_type=body.content_type,
            text=body.text,
            metadata=body.metadata,
            enqueued_at=time.time(),
        )
        return await self._enqueue(message)

    async def add_upload(
        self, file: UploadFile, doc_id: str | None, title: str | None, metadata: str | None
    ) -> DocumentAccepted:
        data = await file.read(self.settings.max_document_bytes + 1)
        if len(data) > self.settings.max_document_bytes:
            raise _too_large(self.settings)
        try:
            meta = json.loads(metadata) if metadata else {}
            if not isinstance(meta, dict):
                raise ValueError("must be a JSON object")
        except ValueError as e:
            raise invalid_field("metadata", f"is not a JSON object: {e}") from e
        try:
            message = document_from_bytes(file.filename or "", data, doc_id, title, meta)
        except ValidationError as e:
            field = str(e.errors()[0]["loc"][0]) if e.errors()[0]["loc"] else "file"
            raise invalid_field(field, e.errors()[0]["msg"]) from e
        except ValueError as e:
            raise invalid_field("file", str(e)) from e
        return await self._enqueue(message)

    async def delete(self, doc_id: str) -> DocumentAccepted:
        # Enqueued even without a status record (Redis keeps none across restarts): deleting
        # a document's chunks is idempotent, and the store, not Redis, knows what exists.
        message = IngestDocument(action="delete", doc_id=doc_id, enqueued_at=time.time())
        return await self._enqueue(message)

    async def status(self, doc_id: str) -> DocumentStatus:
        status = await get_status(self.redis, self.settings, doc_id)
        if status is None:
            days = self.settings.document_status_ttl_s / 86400
            raise HTTPException(
                404, f"no ingestion status for {doc_id!r} (statuses are kept {days:g} days)"
            )
        return status

    async def _enqueue(self, message: IngestDocument) -> DocumentAccepted:
        # Status first: if ingestion is fast, its `indexed` must not be overwritten by `queued`.
        queued = DocumentStatus(doc_id=message.doc_id, status="queued", source=message.source)
        await set_status(self.redis, self.settings, queued)
        try:
            await self.producer.send_and_wait(
                self.settings.ingest_topic,
                value=message.model_dump_json().encode(),
                key=message.doc_id.encode(),
            )
        except Exception as e:
            failed = queued.model_copy(update={"status": "failed", "error": f"not enqueued: {e}"})
            await set_status(self.redis, self.settings, failed)
            raise unavailable("could not enqueue the document (Kafka unavailable)", e) from e
        return DocumentAccepted(doc_id=message.doc_id, status="queued")


def _too_large(settings: Settings) -> HTTPException:
    limit = settings.max_document_bytes
    return HTTPException(413, f"document is larger than {limit} bytes (SLUICE_MAX_DOCUMENT_BYTES)")


def _errors(e: ValueError) -> list[dict]:
    """A body that is not JSON or fails DocumentBody, in FastAPI's 422 shape."""
    if isinstance(e, ValidationError):
        return [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
    return [{"type": "json_invalid", "loc": ("body",), "msg": f"not JSON: {e}", "input": None}]
