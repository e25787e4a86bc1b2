"""`sluice ingest PATH...`: put files (and every supported file under folders) on `sluice.ingest`.

A client, like `POST /documents`: it reads and sends; the ingestion process parses, chunks and
embeds. Doc ids come from paths relative to the folder given, so re-running the command replaces
documents instead of duplicating them (and unchanged ones cost no embedding).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

from redis.asyncio import Redis
from tqdm import tqdm

from shared import kafka
from shared import redis as sredis
from shared.documents import (
    CONTENT_TYPES,
    DocumentStatus,
    document_from_file,
    get_status,
    set_status,
)
from shared.settings import Settings


def files_under(paths: list[Path]) -> Iterator[tuple[Path, Path | None]]:
    """(file, the root its doc id is relative to) for every supported file: a folder's files
    are named from the folder itself (`data/README.md`), a file given directly by its name."""
    for path in paths:
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix.lower() in CONTENT_TYPES:
                    yield f, path.absolute().parent
        elif path.is_file():
            yield path, None
        else:
            raise FileNotFoundError(path)


async def submit(settings: Settings, paths: list[Path], wait_s: float = 0.0) -> dict[str, str]:
    """Enqueue the files; with `wait_s`, wait up to that long for ingestion to finish them.
    Returns doc id -> status (`queued` for those not finished)."""
    await kafka.ensure_topics(settings)
    redis = sredis.connect(settings)
    producer = kafka.make_producer(settings)
    await producer.start()
    statuses: dict[str, str] = {}
    try:
        for f, root in tqdm(list(files_under(paths)), desc="sending", unit="file"):
            if f.stat().st_size > settings.max_document_bytes:
                tqdm.write(f"skipped {f}: larger than {settings.max_document_bytes} bytes")
                continue
            try:
                doc = document_from_file(f, root)
            except ValueError as e:
                tqdm.write(f"skipped {f}: {e}")
                continue
            queued = DocumentStatus(doc_id=doc.doc_id, status="queued", source=doc.source)
            await set_status(redis, settings, queued)
            await producer.send_and_wait(
                settings.ingest_topic, doc.model_dump_json().encode(), key=doc.doc_id.encode()
            )
            statuses[doc.doc_id] = "queued"
        if wait_s:
            statuses = await _wait_indexed(redis, settings, statuses, wait_s)
    finally:
        await producer.stop()
        await redis.aclose()
    return statuses


async def _wait_indexed(
    redis: Redis, settings: Settings, statuses: dict[str, str], wait_s: float
) -> dict[str, str]:
    deadline = time.monotonic() + wait_s
    with tqdm(total=len(statuses), desc="indexing", unit="doc") as bar:
        pending = set(statuses)
        while pending and time.monotonic() < deadline:
            for doc_id in list(pending):
                status = await get_status(redis, settings, doc_id)
                if status is not None and status.status != "queued":
                    statuses[doc_id] = status.status
                    if status.status == "failed":
                        tqdm.write(f"{doc_id}: failed: {status.error}")
                    pending.discard(doc_id)
                    bar.update()
            await asyncio.sleep(0.2)
    return statuses
